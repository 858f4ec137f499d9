"""The one helper behind every ``prefix-plus COMMAND SRC DST [--overwrite]`` sub-command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SrcDstCommand:
    """A sub-command that reads the adapter SRC and writes DST atomically, replacing it only with ``--overwrite``.

    Args:
        name (`str`): The sub-command's name.
        help (`str`): One line for ``prefix-plus --help``.
        description (`str`): The sub-command's ``--help`` text.
        src_help (`str`): What SRC must be.
        dst_help (`str`): What is written to DST.
        run (`Callable`): Runs the command on the parsed arguments (``args.src``, ``args.dst``, ``args.overwrite``)
            and returns the exit code; it imports what it needs itself, so that ``--help`` stays light.

    Example:

    ```py
    >>> MERGE = SrcDstCommand("merge", "Merge the MLP.", "Merge ...", "a saved adapter", "the merged adapter", run)
    >>> MERGE.register(parser.add_subparsers())
    ```
    """

    name: str
    help: str
    description: str
    src_help: str
    dst_help: str
    run: Callable[[argparse.Namespace], int]

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add this sub-command's parser to ``subparsers``.

        Args:
            subparsers (`argparse._SubParsersAction`): From ``parser.add_subparsers()``.

        Example:

        ```py
        >>> MERGE.register(parser.add_subparsers()).prog
        'prefix-plus merge'
        ```
        """
        parser = subparsers.add_parser(
            self.name,
            help=self.help,
            description=self.description + " DST is written atomically and never onto, inside or around SRC; SRC is "
            "not modified.",
        )
        parser.add_argument("src", metavar="SRC", help=self.src_help)
        parser.add_argument("dst", metavar="DST", help=self.dst_help)
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace DST if it exists (only a directory holding a saved adapter, or an empty one)",
        )
        parser.set_defaults(func=self.run)
        return parser
