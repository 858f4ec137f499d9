"""Writing a results folder: ``results.json`` (every suite run so far), ``results.md`` and the suites' PNG plots."""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import peft
import torch
import transformers


def environment(device: str) -> dict[str, Any]:
    """Versions and machine facts recorded with each suite."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def load(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"suites": {}}


def save(out_dir: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.md`` for every suite in ``results`` (suites run earlier are kept)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(render_markdown(results))


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "**no**", None: "–"}[value]
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` given as ``(key, header)``."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


ROW_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "train": [
        ("batch", "batch"),
        ("seq", "seq"),
        ("method", "method"),
        ("median_s", "median step (s)"),
        ("range_s", "min–max (s)"),
        ("peak_mib", "peak step memory (MiB)"),
        ("trainable_params", "trainable params"),
    ],
    "decode": [
        ("batch", "batch"),
        ("prompt", "prompt"),
        ("method", "method"),
        ("median_s", "median generate (s)"),
        ("range_s", "min–max (s)"),
        ("tokens_per_s", "tokens/s"),
        ("decode_tokens_per_s", "decoding steps: tokens/s"),
        ("step_median_ms", "interleaved step, median (ms)"),
    ],
    "size": [
        ("model", "model"),
        ("method", "method"),
        ("adapter_bytes", "adapter_model.safetensors (bytes)"),
        ("raw_minimum_bytes", "raw minimum (bytes)"),
        ("ratio_to_raw_minimum", "÷ raw minimum"),
        ("overhead_bytes", "bytes over minimum"),
    ],
    "merge": [
        ("what", "what"),
        ("value", "value"),
    ],
    "quality": [
        ("part", "part"),
        ("model", "model"),
        ("method", "method"),
        ("best_lr", "lr"),
        ("seeds", "seeds"),
        ("loss_pm", "loss (mean ± std)"),
        ("metric_1_pm", "metric 1"),
        ("metric_2_pm", "metric 2"),
    ],
}
#: Above this max/min ratio between the repeats of one method, results.md flags the timings as noisy.
NOISY_SPREAD = 1.25
TARGET_COLUMNS = [
    ("measurement", "measurement"),
    ("case", "case"),
    ("comparison", "comparison"),
    ("ratio", "ratio of medians / value"),
    ("paired_ratio", "median paired ratio"),
    ("target", "target"),
    ("met", "met"),
]


def render_markdown(results: dict[str, Any]) -> str:
    parts = [
        "# PrefixPlus vs stock PEFT prefix tuning: benchmark results",
        "",
        "Written by `benchmarks/run.py`; see `benchmarks/README.md` for the method. Ratios are taken within one run; "
        "timings are medians of the timed repeats, methods alternated. Targets are the ones of issue 6.",
        "",
    ]
    for name in ("train", "decode", "size", "merge", "quality"):
        suite = results["suites"].get(name)
        if suite is None:
            parts += [f"## {name}", "", "Not run yet.", ""]
            continue
        parts += [f"## {name}", "", f"Command: `{suite.get('command', '?')}`  ", f"Date: {suite.get('date', '?')}, "
                  f"wall time {suite.get('wall_s', float('nan')):.0f} s, load average before/after "
                  f"{suite.get('load_before')} / {suite.get('load_after')}", ""]  # fmt: skip
        part_runs = suite.get("part_runs", {})
        if all(facts.get("command") == suite.get("command") for facts in part_runs.values()):
            part_runs = {}  # one run produced every part
        for part, facts in part_runs.items():
            for run in [*facts.get("earlier", []), facts]:
                parts += [f"- part `{part}`: `{run.get('command')}`, {run.get('date')}, wall time "
                          f"{run.get('wall_s') or float('nan'):.0f} s", ""]  # fmt: skip
        parts += ["Settings:", ""] + [f"- {k}: {v}" for k, v in suite.get("settings", {}).items()] + [""]
        rows = [dict(r) for r in suite.get("rows", [])]
        for row in rows:
            if row.get("times_s"):
                row["range_s"] = f"{min(row['times_s']):.3g}–{max(row['times_s']):.3g}"
            if "peak_with_trainable_state_bytes" in row:
                row["peak_mib"] = row["peak_with_trainable_state_bytes"] / 2**20
        if rows:
            parts += [table(rows, ROW_COLUMNS[name]), ""]
        if suite.get("targets"):
            parts += ["Targets:", "", table(suite["targets"], TARGET_COLUMNS), ""]
            missed = [t for t in suite["targets"] if t.get("met") is False]
            if missed:
                parts += [f"**{len(missed)} target check(s) missed** (marked **no** above).", ""]
        spreads = [max(r["times_s"]) / min(r["times_s"]) for r in rows if len(r.get("times_s") or []) > 1]
        if spreads and max(spreads) > NOISY_SPREAD:
            parts += [
                f"> **Noisy timings**: the slowest repeat of a method took up to {max(spreads):.1f}x its fastest "
                f"(median over rows {statistics.median(spreads):.2f}x). The machine was shared (see the load "
                "averages); treat time ratios as rough, and prefer the median paired ratio.",
                "",
            ]
        for note in suite.get("notes", []):
            parts += [f"> {note}", ""]
        for plot in suite.get("plots", []):
            parts += [f"![{plot}]({plot})", ""]
        parts += [f"Environment: {suite.get('environment')}", ""]
    if results.get("closing_notes"):
        parts += ["## Closing notes", ""] + [f"- {note}" for note in results["closing_notes"]] + [""]
    return "\n".join(parts)
