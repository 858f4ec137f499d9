"""``prefix-plus export-peft SRC DST``: write a saved PrefixPlus adapter as a stock PEFT prefix-tuning adapter."""

from __future__ import annotations

import argparse

from .src_dst import add_src_dst_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export-peft`` sub-command.

    Args:
        subparsers (`argparse._SubParsersAction`): From ``parser.add_subparsers()``.

    Example:

    ```py
    >>> register(parser.add_subparsers())
    ```
    """
    add_src_dst_command(
        subparsers,
        "export-peft",
        help="Write a PrefixPlus adapter as a stock PEFT PREFIX_TUNING adapter.",
        description="Write the saved PrefixPlus adapter SRC as a stock PEFT PREFIX_TUNING adapter (raw prefixes) in "
        "DST, loadable by plain peft. Needs a decoder-only adapter on every layer with offset_position_ids=True; an "
        "MLP is merged on the fly.",
        src_help="directory of a saved PrefixPlus adapter",
        dst_help="directory to write the stock PEFT adapter to",
        run=run,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``export-peft``; returns the exit code.

    Args:
        args (`argparse.Namespace`): ``src``, ``dst`` and ``overwrite``.

    Example:

    ```py
    >>> run(argparse.Namespace(src="merged", dst="stock", overwrite=False))
    0
    ```
    """
    from ..files import export_to_peft

    export_to_peft(args.src, args.dst, overwrite=args.overwrite)
    print(f"Wrote the stock PEFT PREFIX_TUNING adapter {args.dst}.")
    return 0
