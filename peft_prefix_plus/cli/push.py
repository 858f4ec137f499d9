"""``prefix-plus push REPO_ID [LOCAL_DIR]``: upload a saved PrefixPlus adapter to the Hub with its model card.

The arguments and options follow ``hf upload``. Only argparse is imported here; the Hub client, torch and PEFT are
imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import CommandError

TOKEN_WARNING = (
    "prefix-plus push: warning: `--token <value>` leaves your token in your shell history and in process listings. "
    "Run `hf auth login` once, or export HF_TOKEN, and drop the flag."
)
DESCRIPTION = """\
Upload the PrefixPlus adapter saved in LOCAL_DIR (adapter_config.json, adapter_model.safetensors) to the Hub
repository REPO_ID in one commit, with a PrefixPlus model card; an existing card in the repository is updated, not
replaced. Subfolders (e.g. Trainer checkpoints) are pushed only when named with --adapter. Every local input is
checked before anything is sent, and LOCAL_DIR is never modified. The token comes from `hf auth login` or HF_TOKEN.
"""
EXAMPLES = """examples:
  prefix-plus push me/smollm2-data-to-text outputs/data_to_text/adapter --metrics outputs/data_to_text/summary.json
  prefix-plus push me/my-adapter ./adapter --revision experiment --private
  prefix-plus push me/my-adapter ./adapter --create-pr --commit-message "Epoch 3" --commit-description "BLEU 35.2"
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``push`` sub-command to ``subparsers``.

    Args:
        subparsers (`argparse._SubParsersAction`): From `argparse.ArgumentParser.add_subparsers`.
    """
    parser = subparsers.add_parser(
        "push",
        help="Upload a saved PrefixPlus adapter to the Hugging Face Hub, with its model card.",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help='the Hub repository, "namespace/name"')
    parser.add_argument(
        "local_dir",
        metavar="LOCAL_DIR",
        nargs="?",
        help="the saved adapter; defaults to the folder named like the repository (./name), as for `hf upload`",
    )
    parser.add_argument("--revision", help="the branch to push to (created from main if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private (if it is new)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help='the commit summary (default "Upload PrefixPlus adapter")')
    parser.add_argument("--commit-description", help="the commit description")
    parser.add_argument("--metrics", metavar="FILE", help="a JSON file of training metrics for the card")
    parser.add_argument(
        "--adapter",
        metavar="NAME",
        action="append",
        dest="adapters",
        help="also push the adapter saved in the subfolder NAME (repeatable)",
    )
    parser.add_argument(
        "--token", help="a Hub token; prefer `hf auth login` or HF_TOKEN (a token here ends up in shell history)"
    )
    parser.set_defaults(func=run)
    return parser


def _local_dir(args: argparse.Namespace) -> str:
    """LOCAL_DIR, or the folder named like the repository (as `hf upload` does)."""
    if args.local_dir is None:
        name = args.repo_id.rstrip("/").split("/")[-1]
        if not os.path.isdir(name):
            raise CommandError(
                f"No LOCAL_DIR given and ./{name} is not a folder: give the adapter directory, e.g. "
                f"`prefix-plus push {args.repo_id} outputs/data_to_text/adapter`."
            )
        return name
    return args.local_dir


def run(args: argparse.Namespace) -> int:
    """Run ``push``; print where the commit went and return 0.

    Args:
        args (`argparse.Namespace`): The parsed arguments.

    Raises:
        CommandError: The push was refused or failed (`HubPushError`); `AdapterFileError` for a bad adapter.
    """
    from ..errors import HubPushError
    from ..hub import push_adapter

    if args.token is not None:
        print(TOKEN_WARNING, file=sys.stderr)
    local_dir = _local_dir(args)
    try:
        commit = push_adapter(
            local_dir,
            args.repo_id,
            private=True if args.private else None,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            token=args.token,
            metrics=args.metrics,
            adapter_names=args.adapters,
        )
    except HubPushError as error:
        raise CommandError(str(error)) from error
    where = commit.pr_url or f"{commit.repo_url.repo_id}" + (f" (branch {args.revision})" if args.revision else "")
    print(f"Pushed {local_dir} to {where}: {commit.commit_url}")
    return 0
