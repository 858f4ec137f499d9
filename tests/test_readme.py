"""The README's snippets run as written, and the paths its commands use exist after the main example's smoke run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from example_runs import REPO, example_env, smoke_run

README = REPO / "README.md"
DOCS = (README, REPO / "examples" / "README.md")
#: The default output folder of the main example, as the README's commands name it.
DEFAULT_OUT = "outputs/data_to_text"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def code_blocks(path: Path) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S)


def test_quickstart_runs_without_warnings_but_the_upstream_one():
    quickstart = python_blocks()[0]
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", quickstart],
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "trainable params" in result.stdout and "torch.Size([2, 12])" in result.stdout
    # the one warning left is PEFT's read of a property transformers deprecated, which the README explains
    stray = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "is_gradient_checkpointing" not in line and line.strip() != "warnings.warn("
    ]
    assert not stray, result.stderr
    assert "is_gradient_checkpointing" in README.read_text()  # the README names it


def test_encoder_decoder_snippet_builds_a_valid_config():
    namespace: dict = {}
    exec("from peft_prefix_plus import PrefixPlusConfig\n" + python_blocks()[1], namespace)
    assert namespace["config"].site_lengths(True) == {"self": 20, "encoder": 10, "cross": 0}


def test_ci_runs_the_readme_test_command():
    command = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README.read_text(), flags=re.S).group(1)
    assert command in (README.parent / ".ci" / "run").read_text()


def test_paths_in_readme_commands_exist_after_a_smoke_run_of_the_main_example(tmp_path_factory):
    """Every `outputs/data_to_text/...` path in a command of README.md or examples/README.md is produced by the main
    example or by an earlier README command (run here on the smoke run's output, in the README's order)."""
    out = smoke_run(tmp_path_factory)["out"]
    paths: list[str] = []
    for doc in DOCS:
        for block in code_blocks(doc):
            paths += re.findall(rf"{DEFAULT_OUT}(?:/[\w.\-]+)*/?", block)
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True) if "prefix-plus" in line else []
                if words[:1] == ["prefix-plus"] and words[1] in ("export-peft", "merge") and DEFAULT_OUT in words[3]:
                    src, dst = (w.replace(DEFAULT_OUT, str(out)) for w in words[2:4])
                    if not Path(dst).exists():
                        command = [sys.executable, "-m", "peft_prefix_plus.cli", words[1], src, dst]
                        done = subprocess.run(command, env=example_env(), capture_output=True, text=True)
                        assert done.returncode == 0, (line, done.stderr)
    assert {f"{DEFAULT_OUT}/adapter", f"{DEFAULT_OUT}/summary.json", f"{DEFAULT_OUT}/adapter-peft"} <= {
        p.rstrip("/") for p in paths
    }
    missing = sorted({p for p in paths if not (out / p[len(DEFAULT_OUT) :].lstrip("/")).exists()})
    assert not missing, f"README commands name paths the main example does not produce: {missing}"


#: A marker right above a ```python block of the docs says how the block is run: nothing (run as pasted), the names it
#: is given, that it continues the README's quickstart, or why it is skipped (the network, a Hub token, a GPU).
MARKER = re.compile(r"<!-- doc-test: (.*?) -->\n```python\n(.*?)```", flags=re.S)
#: Tiny stand-ins for the names a fragment is given (the block says in its marker what it needs).
GIVEN = {
    "model": "model = AutoModelForCausalLM.from_pretrained(TINY)",
    "tokenizer": "tokenizer = AutoTokenizer.from_pretrained(TINY)",
    "train_dataset": (
        "train_dataset = Dataset.from_dict({'prompt': [[{'role': 'user', 'content': f'say {i}'}] for i in range(16)],"
        " 'completion': [[{'role': 'assistant', 'content': f'I say {i} and more'}] for i in range(16)]})"
    ),
}
GIVEN_IMPORTS = "from datasets import Dataset\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"


def doc_blocks() -> list:
    """Every ```python block of README.md and examples/README.md, with how the test runs it."""
    cases = []
    for doc in DOCS:
        text = doc.read_text()
        marked = {block: how for how, block in MARKER.findall(text)}
        for index, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            how = marked.get(block, "runs as pasted")
            marks = [pytest.mark.skip(reason=f"the block {how}")] if how.startswith("needs") else []
            cases.append(pytest.param(block, how, id=f"{doc.relative_to(REPO)}-{index}", marks=marks))
    return cases


@pytest.mark.parametrize(("block", "how"), doc_blocks())
def test_every_python_block_of_the_docs_runs(block, how, tmp_path, tiny_chat_model):
    """Each block runs in a fresh interpreter, in an empty folder, offline: as pasted, after the quickstart, or with
    tiny stand-ins for the names its marker says it is given."""
    prelude = ""
    if how == "continues the quickstart":
        prelude = python_blocks()[0]
    elif how.startswith("given "):
        names = [name.strip() for name in how[len("given ") :].split(",")]
        prelude = (
            GIVEN_IMPORTS + f"TINY = {str(tiny_chat_model)!r}\n" + "\n".join(GIVEN[name] for name in names) + "\n"
        )
    else:
        assert how == "runs as pasted", f"unknown doc-test marker {how!r}"
    result = subprocess.run(
        [sys.executable, "-c", prelude + "\n" + block],
        cwd=tmp_path,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_skipped_block_says_what_it_needs():
    skipped = [param for param in doc_blocks() if param.marks]
    assert all(param.values[1].startswith("needs ") and len(param.values[1]) > 20 for param in skipped)
