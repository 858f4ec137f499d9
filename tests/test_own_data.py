"""The main example on the user's own data (`--data_dir`): with and without `slots`, and bad files refused.

The end-to-end runs reuse the example's smoke settings (`FAST`, the tiny model) on a few lines of made-up weather
data, whose slot names are not the shipped data's; the refusals run in-process and stop before the model is loaded
(`--model` names nothing that exists, so a later failure would be another error).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from example_runs import EXAMPLE, FAST, load_example_module, run_example, tiny_model_dir

WEATHER = [
    ("Paris", "sunny", "21 C", "It is sunny in Paris, with 21 C."),
    ("Oslo", "snowy", "-4 C", "Oslo is snowy today at -4 C."),
    ("Lima", "cloudy", "17 C", "A cloudy day in Lima, 17 C."),
    ("Cairo", "clear", "33 C", "Clear skies over Cairo and 33 C."),
    ("Quito", "rainy", "12 C", "Quito is rainy, 12 C."),
    ("Perth", "windy", "25 C", "A windy 25 C in Perth."),
]
#: Lines per split: tiny, so a run takes a few seconds.
SIZES = {"train": 4, "validation": 3, "test": 2}


def weather_rows(count: int, slots: bool, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + count):
        city, sky, temperature, text = WEATHER[i % len(WEATHER)]
        row = {"mr": f"city[{city}] | sky[{sky}] | temperature[{temperature}]", "text": text}
        if slots:
            row["slots"] = {"city": city, "sky": sky, "temperature": temperature}
        rows.append(row)
    return rows


def write_data(folder: Path, slots: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, count in SIZES.items():
        lines = [json.dumps(row) for row in weather_rows(count, slots, start)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        start += count
    return folder


@pytest.fixture(scope="module")
def example():
    return load_example_module()


# ---------------------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
@pytest.mark.parametrize("slots", [False, True], ids=["without-slots", "with-slots"])
def test_own_data_runs_end_to_end(tmp_path_factory, tmp_path, slots):
    data = write_data(tmp_path / "data", slots)
    out = tmp_path / "out"
    model = tiny_model_dir(tmp_path_factory)
    args = ["--model", str(model), "--data_dir", str(data), "--output_dir", str(out), "--max_steps", "1"]
    result = run_example(*args, "--checkpointing_steps", "0", "--num_samples", "2", *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval_examples"] == 3 and summary["untuned_eval_examples"] == 3
    assert (out / "samples.md").read_text().count("**Generated:**") == 2
    assert "Sentence:" not in (out / "samples.md").read_text()  # inputs are the mr, references the text
    stdout = result.stdout
    assert f"data: {data}: 4 train, 3 validation, 2 test examples" in stdout
    tail = stdout[stdout.index("Done in") :]
    metrics = [summary[key] for key in ("before", "after", "after_on_untuned_examples")]
    for m in metrics:
        assert set(m) == {"loss", "bleu", "slot_coverage"} and m["loss"] > 0 and m["bleu"] >= 0
    if slots:  # own slot names (city, sky, temperature) are counted, not only the shipped data's
        assert summary["skipped_metrics"] == {}
        assert all(0.0 <= m["slot_coverage"] <= 1.0 for m in metrics)
        assert re.search(r"^slot coverage(\s+\d+\.\d%){2}$", tail, flags=re.M), tail
        assert "n/a" not in stdout
    else:
        assert summary["skipped_metrics"] == {"slot_coverage": "the data has no `slots`"}
        assert all(m["slot_coverage"] is None for m in metrics)
        assert re.search(r"^slot coverage\s+n/a \(the data has no `slots`\)$", tail, flags=re.M), tail
        assert "slot coverage: n/a (the data has no `slots`)" in stdout  # said when the data is read
        assert "slot coverage n/a" in stdout  # in the untuned and tuned lines


@pytest.mark.slow
def test_bad_data_is_one_line_on_the_command_line_before_the_model_loads(tmp_path):
    data = write_data(tmp_path / "data", slots=False)
    (data / "validation.jsonl").write_text('{"mr": "city[Oslo]", "text": "Oslo."}\nnot json\n', encoding="utf-8")
    result = run_example(
        "--model", "unused", "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), check=False
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {data / 'validation.jsonl'}, line 2: not valid JSON (Expecting value, column 1); each line must be "
        "one JSON object with the fields `mr` and `text` (non-empty strings) and, optionally, `slots` (an object of "
        "strings); see the data format in examples/README.md"
    ]
    assert "[1/7]" not in result.stdout and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------- refusals
BAD_FILES = {
    # name: (split, content, line, what the message must say)
    "missing-text": ("train", '{"mr": "a", "text": "b"}\n\n{"mr": "c"}\n', 3, "missing field `text`"),
    "missing-mr": ("validation", '{"text": "b"}\n', 1, "missing field `mr`"),
    "not-json": ("train", '{"mr": "a", "text": "b"}\n{"mr": "a", text: "b"}\n', 2, "not valid JSON"),
    "csv": ("test", "mr,text\na,b\n", 1, "not valid JSON"),
    "json-array": ("train", '[{"mr": "a", "text": "b"}]\n', 1, "an array, not a JSON object"),
    "pretty-printed": ("train", '{\n  "mr": "a",\n  "text": "b"\n}\n', 1, "not valid JSON"),
    "text-not-a-string": ("train", '{"mr": "a", "text": ["b", "c"]}\n', 1, "field `text` must be a non-empty string"),
    "slots-not-an-object": ("train", '{"mr": "a", "text": "b", "slots": "a"}\n', 1, "field `slots` must be an object"),
    "slots-on-some-lines": (
        "validation",
        '{"mr": "a", "text": "b", "slots": {"x": "b"}}\n{"mr": "a", "text": "b"}\n',
        2,
        "missing field `slots`, which line 1 has",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_file_is_refused_naming_file_line_and_field(example, tmp_path, case):
    split, content, line, says = BAD_FILES[case]
    data = write_data(tmp_path / "data", slots=False)
    (data / f"{split}.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        example.main(["--model", "unused", "--data_dir", str(data), "--output_dir", str(tmp_path / "out")])
    message = str(refused.value)
    assert message.startswith(f"error: {data / f'{split}.jsonl'}, line {line}: {says}"), message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_missing_or_empty_split_is_refused(example, tmp_path):
    data = write_data(tmp_path / "data", slots=False)
    (data / "test.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"test\.jsonl does not exist: --data_dir must hold train\.jsonl, valid"):
        example.main(["--model", "unused", "--data_dir", str(data), "--output_dir", str(tmp_path / "out")])
    (data / "test.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"test\.jsonl holds no examples"):
        example.main(["--model", "unused", "--data_dir", str(data), "--output_dir", str(tmp_path / "out")])


def test_shipped_data_has_slots_and_coverage_counts_the_same_slots_as_before(example):
    """Slot coverage now counts every slot but familyFriendly (so own slot names count); on the shipped data these
    are exactly the seven slots it counted before, so published figures are unchanged."""
    before = {"name", "eatType", "food", "priceRange", "customer rating", "area", "near"}
    for split in ("train", "validation", "test"):
        rows = example.read_split(example.DATA_DIR, split)
        assert example.has_slots(rows) and {"mr", "text", "slots"} == set(rows[0])
        names = {slot for row in rows for slot in row["slots"]}
        assert names - set(example.UNCOUNTED_SLOTS) == before
    rows = example.read_split(example.DATA_DIR, "validation", 3)
    texts = [row["text"] for row in rows]
    assert example.slot_coverage(rows, texts) == 1.0  # the references contain every counted value
    assert example.skipped_metrics(rows) == {}
    assert example.skipped_metrics([{"mr": "a", "text": "b"}]) == {"slot_coverage": "the data has no `slots`"}


def test_the_documented_error_is_the_one_the_example_prints(example, tmp_path):
    """examples/README.md shows the refusal of a line without `text`; it is the example's message, word for word."""
    readme = (EXAMPLE.parent / "README.md").read_text()
    documented = re.search(r"^error: my_data/train\.jsonl, line 2: .*$", readme, flags=re.M).group(0)
    data = write_data(tmp_path / "my_data", slots=False)
    (data / "train.jsonl").write_text('{"mr": "a", "text": "b"}\n{"mr": "c"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        example.main(["--model", "unused", "--data_dir", str(data), "--output_dir", str(tmp_path / "out")])
    assert str(refused.value) == documented.replace("my_data/", f"{data}/")
    assert "### Your own data (`--data_dir`)" in readme and "the data has no `slots`" in readme
