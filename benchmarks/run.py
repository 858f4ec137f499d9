"""Run the PrefixPlus benchmarks against stock PEFT prefix tuning and write a results folder.

Examples::

    python benchmarks/run.py --suite train decode size merge     # everything except quality, into results/local/
    python benchmarks/run.py --suite decode --smoke               # a smoke run, into results/local/ too
    python benchmarks/run.py --suite all --out benchmarks/results # replaces the published figures
    python benchmarks/run.py --suite train --device cuda --out runs/gpu
    python benchmarks/run.py --suite train decode --device cuda --dtype bfloat16 --out benchmarks/results_cuda

Each suite adds itself to ``OUT/results.json`` (suites run before are kept) and rewrites ``OUT/results.md`` and
its PNG plots. Without ``--out``, OUT is ``benchmarks/results/local/``, which git ignores: a smoke run, or a run on
another machine, never overwrites the published figures in ``benchmarks/results/``; only an explicit
``--out benchmarks/results`` does.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.common import DTYPES, RunOptions, load_average  # noqa: E402

SUITES = ("train", "decode", "size", "merge", "quality")
#: `benchmarks.suite_quality.PARTS`, spelled out so that `--help` imports no suite (a test keeps them equal).
QUALITY_PARTS = (
    "seq2seq", "smollm2_full", "smollm2_low", "smollm2_sweep", "smollm2_best_full", "smollm2_best_low", "smollm2_long",
)  # fmt: skip
#: The published figures (committed); written only when ``--out`` names this folder.
PUBLISHED_OUT = REPO / "benchmarks" / "results"
#: Where a run without ``--out`` writes: inside the published folder, but ignored by git (``.gitignore``).
DEFAULT_OUT = PUBLISHED_OUT / "local"


def _suite_module(name: str):  # noqa: ANN202 - a module
    import importlib

    return importlib.import_module(f"benchmarks.suite_{name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--suite",
        choices=(*SUITES, "all"),
        nargs="+",
        default=["all"],
        help="one or more suites, run in the order given; `all` runs the five in the order above",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="train and decode suites: dtype of the weights and prefixes (default float32); the others ignore it",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that the suites run")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results folder (default benchmarks/results/local/, ignored by git); "
        "`--out benchmarks/results` replaces the published figures",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up repeats per method (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, all cores)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="train suite: batch sizes (1 8 32)")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="train suite: sequence lengths (128 512)")
    parser.add_argument(
        "--quality-part",
        choices=("all", "smollm2", *QUALITY_PARTS),
        default="all",
        help="quality suite: all (seq2seq and the SmolLM2 grid), smollm2 (the grid: full and low data), or one part "
        "(smollm2_sweep: the recipe search at seed 0; smollm2_best_full/_low: chosen recipes at seeds 1-3; "
        "smollm2_long: 200 steps)",
    )
    parser.add_argument(
        "--quality-methods", nargs="+", default=None, help="quality suite, SmolLM2 parts: only these methods"
    )
    parser.add_argument(
        "--quality-seeds", type=int, nargs="+", default=None, help="quality suite, SmolLM2 parts: only these seeds"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = RunOptions(
        device=args.device,
        smoke=args.smoke,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        dtype=args.dtype,
    )
    command = "python benchmarks/run.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    names = SUITES if "all" in args.suite else tuple(dict.fromkeys(args.suite))
    if args.out == DEFAULT_OUT:
        print(
            f"[benchmarks] writing to {args.out} (ignored by git); `--out benchmarks/results` replaces the published "
            "figures",
            flush=True,
        )
    for name in names:
        module = _suite_module(name)
        kwargs = {}
        if name == "train":
            if args.batches:
                kwargs["batches"] = tuple(args.batches)
            if args.seqs:
                kwargs["seqs"] = tuple(args.seqs)
        if name == "quality":
            kwargs["part"] = args.quality_part
            kwargs["methods"] = tuple(args.quality_methods) if args.quality_methods else None
            kwargs["seeds"] = tuple(args.quality_seeds) if args.quality_seeds else None
        print(f"[benchmarks] suite {name} ...", flush=True)
        load_before, start = load_average(), time.perf_counter()
        result = module.run(options, **kwargs)
        result.update(
            command=command,
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            wall_s=time.perf_counter() - start,
            load_before=[round(x, 2) for x in load_before] if load_before else None,
            load_after=[round(x, 2) for x in load_average() or ()] or None,
            environment=report.environment(args.device),
        )
        args.out.mkdir(parents=True, exist_ok=True)
        results = report.load(args.out)  # read again: another run may have added a suite meanwhile
        if hasattr(module, "combine"):  # a partial run (e.g. one quality part) keeps the rest of the last run
            result = module.combine(results["suites"].get(name), result)
        result["plots"] = module.plot(result, str(args.out)) if hasattr(module, "plot") else []
        result.setdefault("notes", [])
        results["suites"][name] = result
        report.save(args.out, results)
        print(f"[benchmarks] suite {name} done in {result['wall_s']:.0f} s -> {args.out}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
