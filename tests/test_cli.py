"""The ``prefix-plus`` command line and its functions: merge, inspect, export-peft, import-peft, destinations.

Bad input of every kind is tested in one table in ``test_bad_input.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch_for, site_kwargs, tiny_model
from peft import PeftModel, PrefixTuningConfig, get_peft_model
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

TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[1]


def tree_hash(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def save_prefix_plus(directory: Path, family: str, **overrides) -> Path:
    base, task_type = tiny_model(family)
    config = PrefixPlusConfig(task_type=task_type, num_virtual_tokens=3, **{**site_kwargs(task_type), **overrides})
    get_peft_model(base, config).save_pretrained(directory)
    return directory


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---------------------------------------------------------------------------------------------------- inspect
def test_inspect_human_and_json(tmp_path, capsys):
    src = save_prefix_plus(tmp_path / "t5", "t5", mlp_depth=2, mlp_activation="gelu", layers_to_transform=[1])
    code, out, _ = run_cli(capsys, "inspect", src, "--json")
    assert code == 0
    info = json.loads(out)
    assert info == json.loads(json.dumps(inspect_adapter(src)))
    assert {site: (s["num_virtual_tokens"], s["layers"]) for site, s in info["sites"].items()} == {
        "self": (3, [1]),
        "encoder": (2, [1]),
        "cross": (5, [1]),
    }
    assert info["mlp"] == {"depth": 2, "hidden_size": 32, "activation": "gelu"}
    assert info["merged"] is False
    tensors = load_file(src / "adapter_model.safetensors")
    assert info["num_parameters"] == sum(t.numel() for t in tensors.values())
    assert info["size_on_disk"] == sum(p.stat().st_size for p in src.iterdir())

    code, out, _ = run_cli(capsys, "merge", src, tmp_path / "merged")
    assert code == 0 and "Wrote" in out
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "merged")
    assert code == 0
    assert "raw (no MLP)" in out and "merged:          yes, from an MLP with" in out and "depth 2" in out
    assert "cross    prefix length 5, layers 1 (of 2)" in out
    merged = inspect_adapter(tmp_path / "merged")
    assert merged["num_parameters"] == merged["raw_prefix_parameters"] == 3 * 64 + 2 * 64 + 5 * 64
    assert f"{merged['num_parameters']:,} (raw prefixes" in out


def test_inspect_size_counts_the_adapter_files_and_shows_the_others_apart(tmp_path, capsys):
    """A checkpoint folder or Trainer state inside the adapter's folder is not part of the adapter: "size on disk"
    counts the config, the weights and the model card; the rest is a separate line (issue 24, item 8)."""
    src = save_prefix_plus(tmp_path / "adapter", "llama")
    (src / "README.md").write_text("# my adapter\n")
    own = {name: (src / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors")}
    own["README.md"] = (src / "README.md").stat().st_size
    code, out, _ = run_cli(capsys, "inspect", src)
    assert code == 0
    assert (
        f"size on disk:    {sum(own.values()):,} bytes (adapter_config.json, adapter_model.safetensors, README.md)"
        in out
    )
    assert "other files" not in out

    (src / "checkpoint-10" / "nested").mkdir(parents=True)
    (src / "checkpoint-10" / "optimizer.pt").write_bytes(b"\0" * 5000)
    (src / "checkpoint-10" / "nested" / "rng_state.pth").write_bytes(b"\0" * 300)
    (src / "trainer_state.json").write_text("{}")
    info = inspect_adapter(src)
    assert info["size_on_disk"] == sum(own.values())
    assert info["adapter_files"] == own
    assert info["other_files"] == 3 and info["other_files_size"] == 5000 + 300 + 2
    assert info["other_entries"] == ["checkpoint-10/", "trainer_state.json"]
    code, out, _ = run_cli(capsys, "inspect", src)
    assert code == 0
    assert f"size on disk:    {sum(own.values()):,} bytes (" in out
    assert (
        "other files:     5,302 bytes in 3 files in the folder (checkpoint-10/, trainer_state.json), not part of "
        "the adapter" in out
    )
    code, out, _ = run_cli(capsys, "inspect", src, "--json")
    assert json.loads(out)["size_on_disk"] == sum(own.values())

    # merge reports the adapter's own bytes, not the checkpoint beside it (which it does not copy)
    code, out, _ = run_cli(capsys, "merge", src, tmp_path / "merged")
    assert code == 0
    assert f"(was {info['num_parameters']:,} parameters, {sum(own.values()):,} bytes)" in out
    assert inspect_adapter(tmp_path / "merged")["other_files"] == 0


def test_push_command_names_one_repo_in_the_readmes_and_the_example():
    """The main example's end-of-run "push" command names the Hub repo that README.md and examples/README.md name
    (issue 24, item 8)."""
    import re

    pattern = r"prefix-plus push (\S+) (?:outputs/data_to_text/adapter|\{adapter\})"
    names = {
        path: set(re.findall(pattern, (REPO / path).read_text()))
        for path in ("README.md", "examples/README.md", "examples/train_data_to_text.py")
    }
    assert all(names.values()), names
    assert len(set().union(*names.values())) == 1, names


# ---------------------------------------------------------------------------------------------------- export/import
EXPORT_CASES = {"gpt2": ("gpt2", {}), "llama-deep-gelu": ("llama", {"mlp_depth": 3, "mlp_activation": "gelu"})}

PLAIN_PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
work = sys.argv[1]
batch = torch.load(f"{work}/batch.pt")
for name in sys.argv[2:]:
    base = AutoModelForCausalLM.from_pretrained(f"{work}/{name}-base")
    model = PeftModel.from_pretrained(base, f"{work}/{name}-stock").eval()
    assert type(model.peft_config["default"]).__name__ == "PrefixTuningConfig"
    with torch.no_grad():
        torch.save(model(**batch).logits, f"{work}/{name}-logits.pt")
assert not any(m.startswith("peft_prefix_plus") for m in sys.modules), "peft_prefix_plus was imported"
"""


def test_export_loads_in_plain_peft_without_the_plugin(tmp_path, capsys):
    """The exported adapter loads with plain peft in a process that never imports peft_prefix_plus."""
    batch = {k: v for k, v in batch_for("CAUSAL_LM").items() if k != "labels"}
    torch.save(batch, tmp_path / "batch.pt")
    expected = {}
    for name, (family, overrides) in EXPORT_CASES.items():
        base, task_type = tiny_model(family)
        base.save_pretrained(tmp_path / f"{name}-base")
        config = PrefixPlusConfig(task_type=task_type, num_virtual_tokens=4, offset_position_ids=True, **overrides)
        model = get_peft_model(base, config)
        expected[name] = logits(model, batch)
        model.save_pretrained(tmp_path / f"{name}-src")  # with its MLP: merged on the fly by the export
        before = tree_hash(tmp_path / f"{name}-src")
        code, _, err = run_cli(capsys, "export-peft", tmp_path / f"{name}-src", tmp_path / f"{name}-stock")
        assert code == 0, err
        assert tree_hash(tmp_path / f"{name}-src") == before
        stock = json.loads((tmp_path / f"{name}-stock" / "adapter_config.json").read_text())
        assert stock["peft_type"] == "PREFIX_TUNING" and stock["prefix_projection"] is False
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_SCRIPT, str(tmp_path), *EXPORT_CASES],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in EXPORT_CASES:
        stock_logits = torch.load(tmp_path / f"{name}-logits.pt")
        assert (stock_logits - expected[name]).abs().max().item() <= TOLERANCE, name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [False, True])
def test_import_and_round_trip(family, projection, tmp_path, capsys):
    """stock PEFT -> import -> PrefixPlus -> export -> stock PEFT: identical logits all the way; training continues."""
    base, task_type = tiny_model(family)
    stock_model = get_peft_model(
        base, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=4, prefix_projection=projection)
    )
    if projection:  # a trained-looking projection, so that its output is not its initialisation
        with torch.no_grad():
            for param in stock_model.prompt_encoder.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    batch = batch_for(task_type)
    reference = logits(stock_model, batch)
    stock_model.save_pretrained(tmp_path / "stock")
    before = tree_hash(tmp_path / "stock")

    code, _, err = run_cli(capsys, "import-peft", tmp_path / "stock", tmp_path / "plus")
    assert code == 0, err
    config = json.loads((tmp_path / "plus" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_PLUS" and config["offset_position_ids"] is True
    assert config["prefix_projection"] is False
    assert (config["merged_from"] is not None) == projection
    imported = PeftModel.from_pretrained(tiny_model(family)[0], tmp_path / "plus")
    assert (logits(imported, batch) - reference).abs().max().item() <= TOLERANCE

    export_to_peft(tmp_path / "plus", tmp_path / "stock-again")
    again = PeftModel.from_pretrained(tiny_model(family)[0], tmp_path / "stock-again")
    assert (logits(again, batch) - reference).abs().max().item() <= TOLERANCE
    assert tree_hash(tmp_path / "stock") == before

    # migrate and keep training
    trainable = PeftModel.from_pretrained(tiny_model(family)[0], tmp_path / "plus", is_trainable=True)
    params = [p for p in trainable.parameters() if p.requires_grad]
    shape = config["site_shapes"]["self"]
    assert (
        sum(p.numel() for p in params)
        == 4 * shape["num_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"]
    )
    assert shape == {"num_layers": 2, "num_key_value_heads": 2 if family == "llama" else 4, "head_dim": 8}
    trainable.train()
    trainable(**batch).loss.backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("family", "overrides", "property_name"),
    [
        ("t5", {}, "encoder-decoder"),
        ("bart", {}, "encoder-decoder"),
        ("llama", {"layers_to_transform": [0], "offset_position_ids": True}, "layers_to_transform"),
        ("gpt2", {}, "offset_position_ids=False"),
    ],
)
def test_export_refuses_what_stock_peft_cannot_represent(family, overrides, property_name, tmp_path, capsys):
    src = save_prefix_plus(tmp_path / "src", family, **overrides)
    before = tree_hash(src)
    code, out, err = run_cli(capsys, "export-peft", src, tmp_path / "dst")
    assert code == 1 and property_name in err and "Cannot export" in err
    with pytest.raises(AdapterFileError, match=property_name):
        export_to_peft(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")
    assert tree_hash(src) == before


# ---------------------------------------------------------------------------------------------------- destinations
@pytest.fixture(scope="module")
def good_adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    base, _ = tiny_model("gpt2")
    stock = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    stock.save_pretrained(root / "stock")
    return {
        "plus": save_prefix_plus(root / "plus", "gpt2", offset_position_ids=True, mlp_depth=2),
        "stock": root / "stock",
    }


FUNCTIONS = {
    "merge": merge_mlp_files,
    "inspect": lambda src, dst: inspect_adapter(src),
    "export-peft": export_to_peft,
    "import-peft": import_from_peft,
}


def test_console_script_exit_code_and_message(tmp_path):
    """The real command line (a subprocess): error message on stderr, exit code 1, nothing written."""
    result = subprocess.run(
        [sys.executable, "-m", "peft_prefix_plus.cli", "merge", str(tmp_path / "nothing"), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    assert "prefix-plus merge: error:" in result.stderr and "not a directory holding a saved adapter" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("command", ["merge", "export-peft", "import-peft"])
def test_destination_rules(command, good_adapters, tmp_path, capsys, monkeypatch):
    src = good_adapters["stock" if command == "import-peft" else "plus"]
    before = tree_hash(src)
    function = FUNCTIONS[command]
    dst = tmp_path / "dst"
    dst.mkdir()  # a previous adapter
    (dst / "adapter_config.json").write_text("{}")
    (dst / "keep.txt").write_text("old")

    code, _, err = run_cli(capsys, command, src, dst)  # an existing DST is refused...
    assert code == 1 and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "old"

    # ...a failure while writing leaves the old DST untouched and no temporary directory
    import peft_prefix_plus.files.write as write

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(write, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        function(src, dst, overwrite=True)
    assert (dst / "keep.txt").read_text() == "old" and not leftovers(tmp_path, "dst")
    with pytest.raises(OSError, match="disk full"):
        function(src, tmp_path / "new" / "dst")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()

    code, _, err = run_cli(capsys, command, src, dst, "--overwrite")  # ...and replaced with --overwrite
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "adapter_model.safetensors").is_file()
    assert not leftovers(tmp_path, "dst")

    code, _, err = run_cli(capsys, command, src, src, "--overwrite")  # SRC itself is never a destination
    assert code == 1 and "source" in err
    code, _, err = run_cli(capsys, command, src, src / "inner")
    assert code == 1 and "source" in err
    assert tree_hash(src) == before


# ---------------------------------------------------------------------------------------------------- registration
def test_import_registers_with_peft_whatever_is_imported_first(good_adapters):
    """The contract of ``import peft_prefix_plus``: PEFT knows PREFIX_PLUS however the program imports things (peft
    imported first is the path every other test takes)."""
    checks = {
        "package-then-peft": "import peft_prefix_plus\nfrom peft import PeftConfig",
        "config-module-first": "from peft_prefix_plus.tuner.config import PrefixPlusConfig\nfrom peft import PeftConfig",
        "tuner-model-first": "from peft_prefix_plus.tuner.model import PrefixPlusModel\nfrom peft import PeftConfig",
        "peft-first": "from peft import PeftConfig\nimport peft_prefix_plus",
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    load = f"\nprint(type(PeftConfig.from_pretrained({str(good_adapters['plus'])!r})).__name__)"
    processes = {
        name: subprocess.Popen([sys.executable, "-c", code + load], env=env, stdout=subprocess.PIPE, text=True)
        for name, code in checks.items()
    }  # fresh interpreters, run side by side
    for name, process in processes.items():
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0 and out.split() == ["PrefixPlusConfig"], name


# ---------------------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_tensors_are_accepted_and_carried_unchanged(tmp_path, capsys):
    """Tensors PEFT saves for ``modules_to_save`` (a classification head) pass the reader and are carried over
    unchanged by merge and export (under the key stock PEFT uses), and listed by inspect."""
    src = save_prefix_plus(tmp_path / "src", "gpt2", offset_position_ids=True)
    head = torch.randn(2, 32)
    tensors = load_file(src / "adapter_model.safetensors")
    tensors["base_model.model.score.weight"] = head
    save_file(tensors, src / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "adapter_config.json").read_text())
    config["modules_to_save"] = ["score"]
    (src / "adapter_config.json").write_text(json.dumps(config))

    code, out, err = run_cli(capsys, "inspect", src)
    assert code == 0 and "modules_to_save: base_model.model.score.weight" in out, err
    merge_mlp_files(src, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert torch.equal(merged["base_model.model.score.weight"], head)
    export_to_peft(src, tmp_path / "stock")
    stock = load_file(tmp_path / "stock" / "adapter_model.safetensors")
    assert torch.equal(stock["base_model.score.weight"], head) and set(stock) == {
        "prompt_embeddings",
        "base_model.score.weight",
    }
    assert json.loads((tmp_path / "stock" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]


@pytest.mark.parametrize(
    ("key", "modules_to_save", "accepted"),
    [
        ("base_model.model.score.weight", ["score"], True),
        ("base_model.model.classifier.dense.weight", ["classifier"], True),  # a head with submodules
        ("base_model.model.model.layers.0.input_layernorm.weight", ["norm"], True),  # PEFT matches a name suffix
        ("base_model.model.lm_head.weight", ["score"], False),
        ("base_model.model.lm_head.weight", None, False),
    ],
)
def test_reader_accepts_what_peft_saves_for_modules_to_save(key, modules_to_save, accepted, tmp_path):
    src = save_prefix_plus(tmp_path / "src", "gpt2")
    tensors = load_file(src / "adapter_model.safetensors")
    tensors[key] = torch.ones(4)
    save_file(tensors, src / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "adapter_config.json").read_text())
    config["modules_to_save"] = modules_to_save
    (src / "adapter_config.json").write_text(json.dumps(config))
    if accepted:
        assert inspect_adapter(src)["modules_to_save"] == [key]
    else:
        with pytest.raises(AdapterFileError, match="neither PrefixPlus tensors nor modules_to_save"):
            inspect_adapter(src)


@pytest.mark.parametrize(
    ("error", "reported"),
    [
        (AdapterFileError("bad adapter"), True),
        (PermissionError(13, "Permission denied", "dst"), True),
        (OSError(28, "No space left on device", "dst/adapter_model.safetensors"), True),
        (ValueError("a bug: not the user's input"), False),
        (KeyError("a bug"), False),
        (OSError("an OSError naming no path"), False),
    ],
    ids=["project-error", "permission", "os-error-with-path", "value-error", "key-error", "os-error-without-path"],
)
def test_only_bad_input_is_reported_without_a_traceback(error, reported, tmp_path, capsys, monkeypatch):
    """Bad input is one line and exit code 1; any other exception is a bug and propagates with its traceback."""
    import peft_prefix_plus.files as files

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(files, "merge_mlp_files", fail)
    if reported:
        code, _, err = run_cli(capsys, "merge", tmp_path / "src", tmp_path / "dst")
        assert code == 1 and err.startswith("prefix-plus merge: error:")
    else:
        with pytest.raises(type(error)):
            main(["merge", str(tmp_path / "src"), str(tmp_path / "dst")])
