"""``prefix-plus merge SRC DST``: merge the MLP of a saved adapter into raw prefixes, without the base model."""

from __future__ import annotations

import argparse
import sys
import warnings

from .src_dst import SrcDstCommand


def run(args: argparse.Namespace) -> int:
    """Run ``merge``: warnings are printed as notes, then the sizes before and after; returns the exit code.

    Args:
        args (`argparse.Namespace`): ``src``, ``dst`` and ``overwrite``.

    Example:

    ```py
    >>> run(argparse.Namespace(src="checkpoint", dst="merged", overwrite=False))
    0
    ```
    """
    from ..files import inspect_adapter, merge_mlp_files

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_mlp_files(args.src, args.dst, overwrite=args.overwrite)
    for warning in caught:
        print(f"prefix-plus merge: note: {warning.message}", file=sys.stderr)
    before, after = inspect_adapter(args.src), inspect_adapter(args.dst)
    print(
        f"Wrote {args.dst}: {after['num_parameters']:,} raw prefix parameters, {after['size_on_disk']:,} bytes "
        f"(was {before['num_parameters']:,} parameters, {before['size_on_disk']:,} bytes)."
    )
    return 0


MERGE = SrcDstCommand(
    "merge",
    help="Merge the prefix MLP of a saved adapter into raw prefixes (no model needed).",
    description="Merge the prefix MLP of the saved PrefixPlus adapter SRC into raw prefixes and write the result to "
    "DST. Uses only the adapter's files: no base model, no GPU.",
    src_help="directory of a saved PrefixPlus adapter",
    dst_help="directory to write the merged adapter to",
    run=run,
)
