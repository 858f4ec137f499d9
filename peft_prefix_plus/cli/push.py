"""``prefix-plus push DIR REPO_ID``: upload a saved PrefixPlus adapter to the Hugging Face Hub with its model card."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``push`` sub-command."""
    parser = subparsers.add_parser(
        "push",
        help="Upload a saved PrefixPlus adapter to the Hugging Face Hub.",
        description="Upload the PrefixPlus adapter saved in DIR (adapter_config.json, adapter weights) to the Hub "
        "repository REPO_ID in one commit, with a PrefixPlus model card (an existing card in the repository is "
        "updated, not replaced). DIR itself is not modified. The token is read from --token, HF_TOKEN or the stored "
        "login, and is never printed.",
    )
    parser.add_argument("directory", metavar="DIR", help="directory of a saved PrefixPlus adapter")
    parser.add_argument("repo_id", metavar="REPO_ID", help='the Hub repository, "namespace/name"')
    parser.add_argument("--private", action="store_true", help="create the repository as private (if it is new)")
    parser.add_argument("--revision", metavar="BRANCH", help="push to this branch (created from main if missing)")
    parser.add_argument("--commit-message", help='the commit message (default "Upload PrefixPlus adapter")')
    parser.add_argument("--metrics", metavar="JSON", help="a JSON file of training metrics for the card")
    parser.add_argument(
        "--token", help="Hub token (prefer HF_TOKEN or `hf auth login`: a command-line argument is visible to others)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``push``; returns the exit code."""
    from ..cli import CommandError
    from ..hub import HubPushError, push_adapter

    try:
        commit = push_adapter(
            args.directory,
            args.repo_id,
            private=True if args.private else None,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            metrics=args.metrics,
        )
    except HubPushError as error:
        raise CommandError(str(error)) from error
    branch = f" (branch {args.revision})" if args.revision else ""
    print(f"Pushed {args.directory} to {commit.repo_url.repo_id}{branch}: {commit.commit_url}")
    return 0
