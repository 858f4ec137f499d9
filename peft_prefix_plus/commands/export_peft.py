"""``prefix-plus export-peft SRC DST``: write a saved PrefixPlus adapter as a stock PEFT prefix-tuning adapter."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export-peft`` sub-command."""
    parser = subparsers.add_parser(
        "export-peft",
        help="Write a PrefixPlus adapter as a stock PEFT PREFIX_TUNING adapter.",
        description="Write the saved PrefixPlus adapter SRC as a stock PEFT PREFIX_TUNING adapter (raw prefixes) in "
        "DST, loadable by plain peft. Needs a decoder-only adapter on every layer with offset_position_ids=True; an "
        "MLP is merged on the fly.",
    )
    parser.add_argument("src", metavar="SRC", help="directory of a saved PrefixPlus adapter")
    parser.add_argument("dst", metavar="DST", help="directory to write the stock PEFT adapter to")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``export-peft``; returns the exit code."""
    from ..adapter_files import export_to_peft

    export_to_peft(args.src, args.dst, overwrite=args.overwrite)
    print(f"Wrote the stock PEFT PREFIX_TUNING adapter {args.dst}.")
    return 0
