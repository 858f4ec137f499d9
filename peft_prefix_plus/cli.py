"""The ``prefix-plus`` command line.

Each sub-command lives in its own module under :mod:`peft_prefix_plus.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the parsed arguments and
returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


class CommandError(Exception):
    """A user-facing error: printed without a traceback, and the command exits with status 1."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command found in :mod:`peft_prefix_plus.commands`."""
    parser = argparse.ArgumentParser(prog="prefix-plus", description="Tools for PrefixPlus adapters.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prefix-plus`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"prefix-plus {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
