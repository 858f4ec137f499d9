"""``prefix-plus merge SRC DST``: merge the MLP of a saved adapter into raw prefixes, without the base model."""

from __future__ import annotations

import argparse
import sys
import warnings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``merge`` sub-command."""
    parser = subparsers.add_parser(
        "merge",
        help="Merge the prefix MLP of a saved adapter into raw prefixes (no model needed).",
        description="Merge the prefix MLP of the saved PrefixPlus adapter SRC into raw prefixes and write the result "
        "to DST (atomically). Uses only the adapter's files: no base model, no GPU.",
    )
    parser.add_argument("src", metavar="SRC", help="directory of a saved PrefixPlus adapter")
    parser.add_argument("dst", metavar="DST", help="directory to write the merged adapter to")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``merge``; returns the exit code."""
    from ..adapter_files import inspect_adapter, merge_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_adapter(args.src, args.dst, overwrite=args.overwrite)
    for warning in caught:
        print(f"prefix-plus merge: note: {warning.message}", file=sys.stderr)
    before, after = inspect_adapter(args.src), inspect_adapter(args.dst)
    print(
        f"Wrote {args.dst}: {after['num_parameters']:,} raw prefix parameters, {after['size_on_disk']:,} bytes "
        f"(was {before['num_parameters']:,} parameters, {before['size_on_disk']:,} bytes)."
    )
    return 0
