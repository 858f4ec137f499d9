"""``prefix-plus import-peft SRC DST``: convert a stock PEFT prefix-tuning adapter into a PrefixPlus adapter."""

from __future__ import annotations

import argparse

from .src_dst import add_src_dst_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import-peft`` sub-command.

    Args:
        subparsers (`argparse._SubParsersAction`): From ``parser.add_subparsers()``.

    Example:

    ```py
    >>> register(parser.add_subparsers())
    ```
    """
    add_src_dst_command(
        subparsers,
        "import-peft",
        help="Convert a stock PEFT PREFIX_TUNING adapter into a PrefixPlus adapter.",
        description="Convert the saved stock PEFT PREFIX_TUNING adapter SRC (raw, or saved from a projection) into a "
        "raw PrefixPlus adapter in DST with identical outputs (offset_position_ids=True), which can be trained further.",
        src_help="directory of a saved stock PEFT prefix-tuning adapter",
        dst_help="directory to write the PrefixPlus adapter to",
        run=run,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``import-peft``; returns the exit code.

    Args:
        args (`argparse.Namespace`): ``src``, ``dst`` and ``overwrite``.

    Example:

    ```py
    >>> run(argparse.Namespace(src="stock", dst="prefix-plus", overwrite=False))
    0
    ```
    """
    from ..files import import_from_peft

    import_from_peft(args.src, args.dst, overwrite=args.overwrite)
    print(f"Wrote the PrefixPlus adapter {args.dst}.")
    return 0
