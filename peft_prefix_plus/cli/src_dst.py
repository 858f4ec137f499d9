"""The one helper behind every ``prefix-plus COMMAND SRC DST [--overwrite]`` sub-command."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_src_dst_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str,
    src_help: str,
    dst_help: str,
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """Add a sub-command that reads the adapter SRC and writes DST atomically, replacing it only with --overwrite.

    Args:
        subparsers (`argparse._SubParsersAction`): From ``parser.add_subparsers()``.
        name (`str`): The sub-command's name.
        help (`str`): One line for ``prefix-plus --help``.
        description (`str`): The sub-command's ``--help`` text.
        src_help (`str`): What SRC must be.
        dst_help (`str`): What is written to DST.
        run (`Callable`): Runs the command on the parsed arguments (``args.src``, ``args.dst``, ``args.overwrite``)
            and returns the exit code.

    Example:

    ```py
    >>> add_src_dst_command(subparsers, "merge", help="...", description="...", src_help="a saved adapter",
    ...     dst_help="where to write the merged adapter", run=run)
    ```
    """
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description + " DST is written atomically and never inside, around or onto SRC; SRC is not "
        "modified.",
    )
    parser.add_argument("src", metavar="SRC", help=src_help)
    parser.add_argument("dst", metavar="DST", help=dst_help)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if it exists (only a directory holding a saved adapter, or an empty one)",
    )
    parser.set_defaults(func=run)
    return parser
