"""Bad input to the adapter-file tools: one table of bad inputs x commands, plus races, permissions and start-up time.

Every row of :data:`CASES` is run against each command it lists, through the command line (in process) and through
the library function. Each run asserts exit code 1 and a message naming the problem (or, where the row says so, a
report or a warning and success), that SRC is byte for byte unchanged, and that nothing was left in the working
directory: no DST, no temporary or backup folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import tiny_model
from peft import PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from peft_prefix_plus import (
    AdapterFileError,
    PrefixPlusConfig,
    export_to_peft,
    import_from_peft,
    inspect_adapter,
    merge_mlp_files,
)
from peft_prefix_plus.cli import main
from peft_prefix_plus.files import atomic_directory

REPO = Path(__file__).resolve().parents[1]
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
COMMANDS = ("merge", "inspect", "export-peft", "import-peft")
WITH_DST = ("merge", "export-peft", "import-peft")
PLUS_ONLY = ("merge", "inspect", "export-peft")  # commands that read a PrefixPlus adapter
FUNCTIONS = {
    "merge": merge_mlp_files,
    "inspect": lambda src, dst, overwrite=False: inspect_adapter(src),
    "export-peft": export_to_peft,
    "import-peft": import_from_peft,
}


# ---------------------------------------------------------------------------------------------------- helpers
def tree_hash(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def listing(directory: Path) -> list[str]:
    """Every path under ``directory``, hidden ones included (temporary and backup folders start with a dot)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def edit_config(src: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((src / CONFIG).read_text())
    change(config)
    (src / CONFIG).write_text(json.dumps(config))


def edit_tensors(src: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(src / WEIGHTS)
    change(tensors)
    save_file(tensors, src / WEIGHTS, metadata={"format": "pt"})


def embedding_key(tensors: dict[str, torch.Tensor]) -> str:
    """The embedding of a PrefixPlus adapter (``...self.embedding.weight``) or a stock one (``prompt_embeddings``)."""
    return next(key for key in tensors if "embedding" in key)


def is_stock(src: Path) -> bool:
    return json.loads((src / CONFIG).read_text())["peft_type"] == "PREFIX_TUNING"


# ---------------------------------------------------------------------------------------------------- arrangements
# Each takes (work, src, monkeypatch), may break SRC (a fresh copy) or prepare the work directory, and returns
# (DST, extra command-line arguments).
Arranged = tuple[Path, list[str]]


def poison(value: float) -> Callable:
    def arrange(work: Path, src: Path, monkeypatch) -> Arranged:
        def change(tensors):
            tensors[embedding_key(tensors)][0, 0] = value

        edit_tensors(src, change)
        return work / "out", []

    return arrange


def retype(dtype: torch.dtype) -> Callable:
    def arrange(work: Path, src: Path, monkeypatch) -> Arranged:
        def change(tensors):
            key = embedding_key(tensors)
            tensors[key] = (tensors[key] != 0) if dtype == torch.bool else (tensors[key] * 10).to(dtype)

        edit_tensors(src, change)
        return work / "out", []

    return arrange


def configure(**changes) -> Callable:
    def arrange(work: Path, src: Path, monkeypatch) -> Arranged:
        edit_config(src, lambda config: config.update(changes))
        return work / "out", []

    return arrange


def num_layers(value: int) -> Callable:
    def arrange(work: Path, src: Path, monkeypatch) -> Arranged:
        def change(config):
            if config["peft_type"] == "PREFIX_TUNING":
                config["num_layers"] = value
            else:
                config["site_shapes"]["self"]["num_layers"] = value

        edit_config(src, change)
        return work / "out", []

    return arrange


def nested_config(work: Path, src: Path, monkeypatch) -> Arranged:
    depth = 200_000
    (src / CONFIG).write_text('{"peft_type": "PREFIX_PLUS", "x": ' + "[" * depth + "]" * depth + "}")
    return work / "out", []


def bin_only(work: Path, src: Path, monkeypatch) -> Arranged:
    torch.save(load_file(src / WEIGHTS), src / "adapter_model.bin")
    (src / WEIGHTS).unlink()
    return work / "out", []


def mixed_dtypes(work: Path, src: Path, monkeypatch) -> Arranged:
    def change(tensors):
        key = embedding_key(tensors)
        tensors[key] = tensors[key].half()

    edit_tensors(src, change)
    return work / "out", []


def invalid_yaml_card(work: Path, src: Path, monkeypatch) -> Arranged:
    (src / "README.md").write_text("---\nlicense: [apache-2.0\ntags: {{\n---\n# My adapter\n")
    return work / "out", []


def dst_parent_of_src(work: Path, src: Path, monkeypatch) -> Arranged:
    return src.parent, ["--overwrite"]


def dst_is_src(work: Path, src: Path, monkeypatch) -> Arranged:
    return src, ["--overwrite"]


def dst_inside_src(work: Path, src: Path, monkeypatch) -> Arranged:
    return src / "inner", []


def dst_link_to_parent_of_src(work: Path, src: Path, monkeypatch) -> Arranged:
    (work / "link").symlink_to(src.parent, target_is_directory=True)
    return work / "link", ["--overwrite"]


def dst_not_an_adapter(work: Path, src: Path, monkeypatch) -> Arranged:
    (work / "photos").mkdir()
    (work / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    (work / "photos" / "notes.txt").write_text("keep me")
    return work / "photos", ["--overwrite"]


def dst_exists(work: Path, src: Path, monkeypatch) -> Arranged:
    (work / "out").mkdir()
    (work / "out" / CONFIG).write_text("{}")
    return work / "out", []


def dst_is_a_file(work: Path, src: Path, monkeypatch) -> Arranged:
    (work / "out").write_text("a file")
    return work / "out", ["--overwrite"]


def dst_is_cwd(work: Path, src: Path, monkeypatch) -> Arranged:
    (work / "here").mkdir()
    monkeypatch.chdir(work / "here")
    return Path("."), ["--overwrite"]


def dst_contains_cwd(work: Path, src: Path, monkeypatch) -> Arranged:
    (work / "project" / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "project" / "sub")
    return work / "project", ["--overwrite"]


def dst_is_a_mount_point(work: Path, src: Path, monkeypatch) -> Arranged:
    return Path("/proc"), ["--overwrite"]


def dst_in_read_only_dir(work: Path, src: Path, monkeypatch) -> Arranged:
    read_only = work / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: make the OS refuse as it would for a user
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == read_only:
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    return read_only / "out", []


@dataclass(frozen=True)
class Bad:
    """One bad input: how to arrange it, the commands it applies to, and what each must say.

    ``message`` is a regular expression the error must match. ``reports`` maps a command to a pattern it prints on
    success instead of failing (inspect reports NaN; merge warns about a broken card and carries it over).
    """

    arrange: Callable
    message: str
    commands: tuple[str, ...] = COMMANDS
    reports: Optional[dict[str, str]] = None
    fast: bool = False


NONFINITE = r"non-finite values \(NaN or Inf\) in \S*embedding\S*: 1 of"
CASES: dict[str, Bad] = {
    # silently broken adapters
    "nan-in-embedding": Bad(poison(float("nan")), NONFINITE, reports={"inspect": r"holds 1 non-finite values"}),
    "inf-in-embedding": Bad(poison(float("inf")), NONFINITE, reports={"inspect": r"holds 1 non-finite values"}),
    "int8-tensor": Bad(retype(torch.int8), r"dtype I8; adapter tensors must be floating point"),
    "int32-tensor": Bad(retype(torch.int32), r"dtype I32; adapter tensors must be floating point"),
    "bool-tensor": Bad(retype(torch.bool), r"dtype BOOL; adapter tensors must be floating point"),
    "mixed-dtypes": Bad(mixed_dtypes, r"mixes dtypes \['torch.float16', 'torch.float32'\]", PLUS_ONLY),
    "edited-mlp-depth-2": Bad(
        configure(mlp_depth=2), r"mlp_depth is 2, but the file holds an MLP of depth 1", PLUS_ONLY
    ),
    "edited-prefix-projection-false": Bad(
        configure(prefix_projection=False), r"prefix_projection is false, but the file holds MLP tensors", PLUS_ONLY
    ),
    "edited-peft-type-lora": Bad(
        configure(peft_type="LORA"), r"says peft_type 'LORA', but \S+ holds PrefixPlus tensors", PLUS_ONLY
    ),
    # exhaustion: refused from the header, in milliseconds
    "num-layers-1e8": Bad(num_layers(10**8), r"calls for .* values|'prompt_embeddings' has shape", fast=True),
    "num-layers-1e9": Bad(num_layers(10**9), r"calls for .* values|'prompt_embeddings' has shape", fast=True),
    "mlp-depth-1e6": Bad(configure(mlp_depth=10**6), r"mlp_depth is 1000000, but", PLUS_ONLY, fast=True),
    "config-nested-200000": Bad(nested_config, r"nested too deeply", fast=True),
    # clear errors instead of tracebacks
    "bin-only-adapter": Bad(bin_only, r"only safetensors is supported"),
    "invalid-yaml-card": Bad(
        invalid_yaml_card, "", ("merge",), reports={"merge": r"model card README.md could not be updated"}
    ),
    # destinations: data loss
    "dst-parent-of-src": Bad(dst_parent_of_src, r"contains the source", WITH_DST),
    "dst-is-src": Bad(dst_is_src, r"is the source", WITH_DST),
    "dst-inside-src": Bad(dst_inside_src, r"lies inside the source", WITH_DST),
    "dst-symlink-contains-src": Bad(dst_link_to_parent_of_src, r"contains the source", WITH_DST),
    "overwrite-not-an-adapter": Bad(
        dst_not_an_adapter, r"not a saved adapter .* it holds holiday\.jpg, notes\.txt", WITH_DST
    ),
    "dst-exists-without-overwrite": Bad(dst_exists, r"exists; pass --overwrite", WITH_DST),
    "dst-is-a-file": Bad(dst_is_a_file, r"exists and is not a directory", WITH_DST),
    "dst-is-cwd": Bad(dst_is_cwd, r"is the current directory", WITH_DST),
    "dst-contains-cwd": Bad(dst_contains_cwd, r"contains the current directory", WITH_DST),
    "dst-is-a-mount-point": Bad(dst_is_a_mount_point, r"is a mount point", WITH_DST),
    "dst-read-only": Bad(dst_in_read_only_dir, r"Cannot write the destination .*Permission denied", WITH_DST),
}
TABLE = [
    pytest.param(
        case,
        command,
        id=f"{case}-{command}",
        marks=[pytest.mark.skipif(not os.path.ismount("/proc"), reason="needs /proc mounted")]
        if case == "dst-is-a-mount-point"
        else [],
    )
    for case, bad in CASES.items()
    for command in bad.commands
]


@pytest.fixture(scope="module")
def good_adapters(tmp_path_factory) -> dict[str, Path]:
    """A PrefixPlus adapter with a depth-1 MLP that export accepts, and a stock prefix-tuning adapter."""
    root = tmp_path_factory.mktemp("good")
    base, _ = tiny_model("gpt2")
    config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, offset_position_ids=True)
    get_peft_model(base, config).save_pretrained(root / "plus")
    base, _ = tiny_model("gpt2")
    stock = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    get_peft_model(base, stock).save_pretrained(root / "stock")
    return {"plus": root / "plus", "stock": root / "stock"}


@pytest.mark.parametrize(("case", "command"), TABLE)
def test_bad_input(case, command, good_adapters, tmp_path, capsys, monkeypatch):
    bad = CASES[case]
    work = tmp_path / "work"
    src = work / "run" / "adapter"
    shutil.copytree(good_adapters["stock" if command == "import-peft" else "plus"], src)
    dst, extra = bad.arrange(work, src, monkeypatch)
    src_before, work_before = tree_hash(src), listing(work)
    overwrite = "--overwrite" in extra
    argv = [command, str(src)] if command == "inspect" else [command, str(src), str(dst), *extra]

    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()

    report = (bad.reports or {}).get(command)
    if report is None:
        assert code == 1, (out, err)
        assert err.startswith(f"prefix-plus {command}: error:") and re.search(bad.message, err), err
        assert "Traceback" not in err
        with pytest.raises(AdapterFileError, match=bad.message):
            FUNCTIONS[command](src, dst, overwrite=overwrite)
        assert listing(work) == work_before  # no DST, no temporary or backup folder, nothing else
    else:
        assert code == 0, err
        assert re.search(report, out + err), out + err
        if command == "merge":  # the broken card is carried over unchanged
            assert (dst / "README.md").read_bytes() == (src / "README.md").read_bytes()
        assert not list(work.rglob(".*")), "a temporary or backup folder was left behind"
    assert tree_hash(src) == src_before
    if bad.fast:
        assert elapsed < 2.0, f"took {elapsed:.2f} s"


def test_every_issue_item_is_in_the_table():
    """The table covers each adapter-file item of the trust issue (guards against a row being dropped)."""
    expected = {
        "nan-in-embedding", "inf-in-embedding", "int8-tensor", "int32-tensor", "bool-tensor", "mixed-dtypes",
        "edited-mlp-depth-2", "edited-prefix-projection-false", "edited-peft-type-lora", "num-layers-1e8",
        "num-layers-1e9", "mlp-depth-1e6", "config-nested-200000", "bin-only-adapter", "invalid-yaml-card",
        "dst-parent-of-src", "dst-symlink-contains-src", "overwrite-not-an-adapter", "dst-is-cwd", "dst-read-only",
    }  # fmt: skip
    assert expected <= set(CASES)
    assert {"merge", "export-peft", "import-peft"} <= set(CASES["dst-parent-of-src"].commands)


# ---------------------------------------------------------------------------------------------------- races
@pytest.mark.parametrize("existing", [False, True], ids=["new-dst", "overwrite-dst"])
def test_concurrent_writers_one_wins_and_nothing_is_left(existing, tmp_path):
    """Writers that all passed the destination checks race to rename: exactly one wins, the others get a clear
    error, and no temporary or backup folder is left behind."""
    dst = tmp_path / "dst"
    if existing:
        dst.mkdir()
        (dst / CONFIG).write_text('{"old": true}')
    writers = 6
    barrier = threading.Barrier(writers)
    results: list[object] = [None] * writers

    def write(index: int) -> None:
        try:
            with atomic_directory(dst, overwrite=existing) as tmp:
                (tmp / CONFIG).write_text(json.dumps({"writer": index}))
                barrier.wait(timeout=30)  # every writer holds a finished temporary directory
            results[index] = "won"
        except AdapterFileError as error:
            results[index] = error

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, result in enumerate(results) if result == "won"]
    assert len(winners) == 1, results
    for result in results:
        if result != "won":
            assert isinstance(result, AdapterFileError) and "written by another process" in str(result)
    assert json.loads((dst / CONFIG).read_text()) == {"writer": winners[0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_concurrent_command_line_merges(good_adapters, tmp_path):
    """Real processes merging to one DST with --overwrite: each exits 0 or 1 with a one-line error, never a
    traceback; the DST is one complete merge; nothing is left behind."""
    src = tmp_path / "src"
    shutil.copytree(good_adapters["plus"], src)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "peft_prefix_plus.cli", "merge", str(src), str(tmp_path / "dst"), "--overwrite"]
    processes = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    for code, err in outcomes:
        assert code in (0, 1) and "Traceback" not in err, err
        if code == 1:
            assert "written by another process" in err, err
    assert any(code == 0 for code, _ in outcomes)
    assert inspect_adapter(tmp_path / "dst")["merged"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


# ---------------------------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
@pytest.mark.parametrize("command", WITH_DST)
def test_written_directories_follow_the_umask(command, umask, dir_mode, file_mode, good_adapters, tmp_path):
    """DST gets the permissions save_pretrained would give it (not mkdtemp's 0700)."""
    src = good_adapters["stock" if command == "import-peft" else "plus"]
    previous = os.umask(umask)
    try:
        FUNCTIONS[command](src, tmp_path / "dst")
    finally:
        os.umask(previous)
    assert (tmp_path / "dst").stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "dst").iterdir()}
    assert modes and set(modes.values()) == {file_mode}, modes


# ---------------------------------------------------------------------------------------------------- start-up time
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_are_fast_and_import_nothing_heavy(flag):
    """``prefix-plus --help`` builds every parser without importing torch or peft (measured: ~0.5 s here)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "peft_prefix_plus.cli", flag], capture_output=True, text=True, env=env, timeout=60
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "prefix-plus" in result.stdout
    assert elapsed < 3.0, f"{flag} took {elapsed:.2f} s"
    probe = (
        "import sys; from peft_prefix_plus.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert imported.stdout.strip() == "[]", imported.stdout + imported.stderr
