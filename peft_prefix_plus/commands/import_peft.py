"""``prefix-plus import-peft SRC DST``: convert a stock PEFT prefix-tuning adapter into a PrefixPlus adapter."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import-peft`` sub-command."""
    parser = subparsers.add_parser(
        "import-peft",
        help="Convert a stock PEFT PREFIX_TUNING adapter into a PrefixPlus adapter.",
        description="Convert the saved stock PEFT PREFIX_TUNING adapter SRC (raw, or saved from a projection) into a "
        "raw PrefixPlus adapter in DST with identical outputs (offset_position_ids=True), which can be trained further.",
    )
    parser.add_argument("src", metavar="SRC", help="directory of a saved stock PEFT prefix-tuning adapter")
    parser.add_argument("dst", metavar="DST", help="directory to write the PrefixPlus adapter to")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``import-peft``; returns the exit code."""
    from ..adapter_files import import_from_peft

    import_from_peft(args.src, args.dst, overwrite=args.overwrite)
    print(f"Wrote the PrefixPlus adapter {args.dst}.")
    return 0
