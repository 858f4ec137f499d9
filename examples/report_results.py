"""Write the main example's published results (examples/README.md, "Results") from a run's `summary.json`.

The figures in the README are never typed by hand: they are rendered from the `summary.json` of a run of
`train_data_to_text.py`, which is kept beside this script (`examples/results/summary.json`) so that anyone can check
them. After a new run of the main job, publish its figures with:

```bash
python examples/report_results.py outputs/data_to_text/summary.json --beside "nothing else running" --write
```

This writes the summary (with what ran beside it) to `examples/results/summary.json` and rewrites the block between the `results:start` and
`results:end` markers of `examples/README.md`. Without `--write` it prints the block. ``--beside`` says what else ran
on the machine during the run (timings mean little without it).
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent
README = EXAMPLES / "README.md"
PUBLISHED = EXAMPLES / "results" / "summary.json"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def render(summary: dict[str, Any]) -> str:
    """The README block for ``summary`` (a `summary.json` of the main example, with its ``run`` record)."""
    args, run = summary["args"], summary.get("run", {})
    before, same, after = summary["before"], summary["after_on_untuned_examples"], summary["after"]
    n_before, n_all = summary["untuned_eval_examples"], summary["eval_examples"]
    offset = "on" if summary["adapter"]["config"].get("offset_position_ids") else "off"
    slots = "slot_coverage" not in summary.get("skipped_metrics", {})
    rows = [
        ("validation loss", *(f"{part['loss']:.3f}" for part in (before, same, after))),
        ("BLEU (sacreBLEU)", *(f"{part['bleu']:.1f}" for part in (before, same, after))),
    ]
    if slots:
        rows.append(("slot coverage", *(f"{part['slot_coverage']:.1%}" for part in (before, same, after))))
    lines = [
        START,
        f"Rendered by `examples/report_results.py` from [`results/summary.json`](results/summary.json): "
        f"`python examples/train_data_to_text.py` with {summary['steps']} steps of batch "
        f"{summary['global_batch_size']}, learning rate {args['learning_rate']:g}, prefix length "
        f"{args['num_virtual_tokens']}, `offset_position_ids` {offset}, seed {args['seed']}.",
        "",
        f"| metric | untuned ({n_before} validation examples) | tuned (same {n_before}) | tuned (all {n_all}) |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"The merged validation loss differs from the unmerged one by {summary['merged_loss_abs_diff']:.1g}; the merged "
        f"adapter has {summary['adapter']['merged_parameters']:,} parameters "
        f"({summary['adapter']['merged_file_bytes'] / 1e6:.2f} MB).",
        "",
        "| finished | machine | what else ran | wall time | of which training |",
        "|---|---|---|---|---|",
        f"| {run.get('finished', 'not recorded')} | {run.get('machine', 'not recorded')} | "
        f"{run.get('beside', 'not recorded')} | {_minutes(summary['total_time_s'])} | "
        f"{summary['train_time_s']:.0f} s |",
        END,
    ]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced by ``block``."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} block in the README")
    return pattern.sub(lambda _: block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("summary", type=Path, help="a summary.json written by train_data_to_text.py")
    parser.add_argument("--beside", help='what else ran on the machine during the run, e.g. "nothing else running"')
    parser.add_argument("--write", action="store_true", help="publish: copy the summary and rewrite the README block")
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    run = summary.setdefault("run", {})
    if args.beside:
        run["beside"] = args.beside
    run.setdefault("finished", datetime.fromtimestamp(args.summary.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d"))
    block = render(summary)
    if not args.write:
        print(block)
        return 0
    PUBLISHED.parent.mkdir(exist_ok=True)
    PUBLISHED.write_text(json.dumps(summary, indent=2) + "\n")
    README.write_text(replace_block(README.read_text(), block))
    print(f"wrote {PUBLISHED.relative_to(EXAMPLES.parent)} and the results of {README.relative_to(EXAMPLES.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
