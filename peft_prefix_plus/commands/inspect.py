"""``prefix-plus inspect DIR``: describe a saved PrefixPlus adapter."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command."""
    parser = subparsers.add_parser(
        "inspect",
        help="Describe a saved PrefixPlus adapter.",
        description="Print the sites (prefix length and layers), the MLP shape or 'raw', whether the adapter was "
        "merged, the parameter count and the size on disk of the saved PrefixPlus adapter DIR.",
    )
    parser.add_argument("directory", metavar="DIR", help="directory of a saved PrefixPlus adapter")
    parser.add_argument("--json", action="store_true", help="print the same data as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``inspect``; returns the exit code."""
    from ..adapter_files import format_inspection, inspect_adapter

    info = inspect_adapter(args.directory)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0
