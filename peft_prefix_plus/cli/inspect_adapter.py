"""``prefix-plus inspect DIR``: describe a saved PrefixPlus adapter (module not named ``inspect``: stdlib)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command.

    Args:
        subparsers (`argparse._SubParsersAction`): From ``parser.add_subparsers()``.

    Example:

    ```py
    >>> register(parser.add_subparsers())
    ```
    """
    parser = subparsers.add_parser(
        "inspect",
        help="Describe a saved PrefixPlus adapter.",
        description="Print the sites (prefix length and layers), the MLP shape or 'raw', whether the adapter was "
        "merged, the parameter count, any NaN or infinite values and the size on disk of the saved PrefixPlus "
        "adapter DIR: of its own files (config, weights, model card); other files below DIR, such as a checkpoint "
        "folder, are shown apart.",
    )
    parser.add_argument("directory", metavar="DIR", help="directory of a saved PrefixPlus adapter")
    parser.add_argument("--json", action="store_true", help="print the same data as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``inspect``; returns the exit code.

    Args:
        args (`argparse.Namespace`): ``directory`` and ``json``.

    Example:

    ```py
    >>> run(argparse.Namespace(directory="merged", json=True))
    0
    ```
    """
    from ..files import format_inspection, inspect_adapter

    info = inspect_adapter(args.directory)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0
