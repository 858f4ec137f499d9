"""``prefix-plus export-peft`` and ``import-peft``: convert saved adapters to and from stock PEFT prefix tuning."""

from __future__ import annotations

import argparse

from .src_dst import SrcDstCommand


def run_export(args: argparse.Namespace) -> int:
    """Run ``export-peft``; returns the exit code.

    Args:
        args (`argparse.Namespace`): ``src``, ``dst`` and ``overwrite``.

    Example:

    ```py
    >>> run_export(argparse.Namespace(src="merged", dst="stock", overwrite=False))
    0
    ```
    """
    from ..files import export_to_peft

    export_to_peft(args.src, args.dst, overwrite=args.overwrite)
    print(f"Wrote the stock PEFT PREFIX_TUNING adapter {args.dst}.")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Run ``import-peft``; returns the exit code.

    Args:
        args (`argparse.Namespace`): ``src``, ``dst`` and ``overwrite``.

    Example:

    ```py
    >>> run_import(argparse.Namespace(src="stock", dst="prefix-plus", overwrite=False))
    0
    ```
    """
    from ..files import import_from_peft

    import_from_peft(args.src, args.dst, overwrite=args.overwrite)
    print(f"Wrote the PrefixPlus adapter {args.dst}.")
    return 0


EXPORT_PEFT = SrcDstCommand(
    "export-peft",
    help="Write a PrefixPlus adapter as a stock PEFT PREFIX_TUNING adapter.",
    description="Write the saved PrefixPlus adapter SRC as a stock PEFT PREFIX_TUNING adapter (raw prefixes) in DST, "
    "loadable by plain peft. Needs a decoder-only adapter on every layer with offset_position_ids=True; an MLP is "
    "merged on the fly.",
    src_help="directory of a saved PrefixPlus adapter",
    dst_help="directory to write the stock PEFT adapter to",
    run=run_export,
)
IMPORT_PEFT = SrcDstCommand(
    "import-peft",
    help="Convert a stock PEFT PREFIX_TUNING adapter into a PrefixPlus adapter.",
    description="Convert the saved stock PEFT PREFIX_TUNING adapter SRC (raw, or saved from a projection) into a raw "
    "PrefixPlus adapter in DST with identical outputs (offset_position_ids=True), which can be trained further.",
    src_help="directory of a saved stock PEFT prefix-tuning adapter",
    dst_help="directory to write the PrefixPlus adapter to",
    run=run_import,
)
