"""The ``prefix-plus`` command line: an explicit list of sub-commands, each with ``register(subparsers)``.

Importing this package and building the parser imports only the standard library, so ``prefix-plus --help`` and
``--version`` answer at once; each command imports the heavy modules (torch, peft) inside its ``run``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import inspect_adapter, push
from .convert import EXPORT_PEFT, IMPORT_PEFT
from .errors import CommandError, is_user_error, user_error_types
from .merge import MERGE
from .version import package_version

#: The sub-commands, in the order ``--help`` lists them: `SrcDstCommand`s and modules. Each has
#: ``register(subparsers)``, which adds its parser and sets ``func`` to its ``run(args) -> int``.
COMMANDS = (MERGE, inspect_adapter, EXPORT_PEFT, IMPORT_PEFT, push)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command of :data:`COMMANDS`.

    Example:

    ```py
    >>> build_parser().parse_args(["inspect", "my-adapter"]).command
    'inspect'
    ```
    """
    parser = argparse.ArgumentParser(prog="prefix-plus", description="Tools for PrefixPlus adapters.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``prefix-plus`` console script; returns the exit code.

    Bad input (the project's own errors, and the OS errors a path can cause) is printed as one line naming the
    problem, with exit code 1. Any other exception is a bug and propagates with its traceback.

    Args:
        argv (`list[str]`, *optional*): The arguments; `None` means ``sys.argv[1:]``.

    Example:

    ```py
    >>> main(["merge", "checkpoints/best", "adapters/merged"])
    0
    ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except user_error_types() as error:  # evaluated only when an exception arrives
        if not is_user_error(error):
            raise
        print(f"prefix-plus {args.command}: error: {error}", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]
