"""The README's Python snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs(capsys):
    quickstart = python_blocks()[0]
    exec(compile(quickstart, "README quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "trainable params" in out and "torch.Size([2, 12])" in out


def test_encoder_decoder_snippet_builds_a_valid_config():
    namespace: dict = {}
    exec("from peft_prefix_plus import PrefixPlusConfig\n" + python_blocks()[1], namespace)
    assert namespace["config"].site_lengths(True) == {"self": 20, "encoder": 10, "cross": 0}


def test_ci_runs_the_readme_test_command():
    command = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README.read_text(), flags=re.S).group(1)
    assert command in (README.parent / ".ci" / "run").read_text()
