"""Pushing PrefixPlus adapters to the Hugging Face Hub.

[`push_adapter`] uploads an adapter, from a `PeftModel` or from a directory written by ``save_pretrained``, with a
PrefixPlus model card (see :mod:`peft_prefix_plus.card`). It works in a temporary staging directory: the model's
files or the adapter directory are never modified, whether the push succeeds or not.

``import peft_prefix_plus`` calls [`install_peft_hooks`], which makes two PEFT methods dispatch on the adapter type:

- ``PeftModel.push_to_hub`` runs [`push_adapter`] for PrefixPlus models. The stock method comes from transformers'
  ``PushToHubMixin``, which replaces the card of a new repository with a plain transformers card
  (``library_name: transformers``, no tags).
- ``PeftModel.create_or_update_model_card``, which ``save_pretrained`` calls, writes a PrefixPlus card, updating an
  existing ``README.md`` rather than replacing it.

Models of every other PEFT type keep the stock behaviour: the hooks call the original methods for them.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Optional, Union

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .card import CARD_NAME, summaries_from_dir, write_card
from .model import PrefixPlusModel

logger = logging.getLogger(__name__)

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
DEFAULT_COMMIT_MESSAGE = "Upload PrefixPlus adapter"


class HubPushError(RuntimeError):
    """Pushing an adapter to the Hub failed; nothing was changed locally."""


def is_prefix_plus_model(model: Any) -> bool:
    """Whether ``model`` is a `PeftModel` whose adapters are PrefixPlus adapters.

    Args:
        model (`Any`): Any object, typically a `peft.PeftModel`.
    """
    return isinstance(getattr(model, "base_model", None), PrefixPlusModel)


def _copy_adapter_dir(source: str, staging: str) -> None:
    """Copy the adapter files of ``source`` (root adapter and adapters in subfolders) to ``staging``."""
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        if entry.is_file() and entry.name in ADAPTER_FILES:
            shutil.copy2(entry.path, os.path.join(staging, entry.name))
        elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, CONFIG_NAME)):
            os.makedirs(os.path.join(staging, entry.name), exist_ok=True)
            for name in ADAPTER_FILES:
                if os.path.isfile(os.path.join(entry.path, name)):
                    shutil.copy2(os.path.join(entry.path, name), os.path.join(staging, entry.name, name))


def _fetch_card(api: HfApi, repo_id: str, revision: Optional[str], token: Union[str, bool, None]) -> Optional[str]:
    """The path of the repository's README.md at ``revision`` (downloaded to the cache), or `None` if it has none."""
    try:
        return api.hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token)
    except EntryNotFoundError:
        return None


def push_adapter(
    model_or_dir: Union[Any, str, os.PathLike],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    token: Union[str, bool, None] = None,
    create_pr: bool = False,
    metrics: Union[Mapping[str, Any], str, os.PathLike, None] = None,
    tags: Optional[list[str]] = None,
) -> CommitInfo:
    """Upload a PrefixPlus adapter to the Hub with its model card, in one commit.

    The repository is created if needed (``private`` applies then only) and so is the branch ``revision``. The
    commit holds ``adapter_config.json``, the adapter weights (of every adapter; non-default ones in subfolders)
    and ``README.md``. If the repository already has a README.md, it is updated: its metadata is merged and only
    the generated PrefixPlus section is replaced; otherwise the card of ``model_or_dir`` (if any) is the start.
    Files are staged in a temporary directory: the model and ``model_or_dir`` are left as they were.

    Args:
        model_or_dir (`PeftModel`, `str` or `os.PathLike`): A PrefixPlus `PeftModel`, or a directory written by its
            ``save_pretrained``.
        repo_id (`str`): ``"namespace/name"``, or ``"name"`` for the token's user.
        private (`bool`, *optional*): Create the repository as private. Ignored if it exists.
        revision (`str`, *optional*): The branch to push to, created from main if missing. Default: main.
        commit_message (`str`, *optional*): Defaults to ``"Upload PrefixPlus adapter"``.
        commit_description (`str`, *optional*): A longer commit description.
        token (`str` or `bool`, *optional*): A Hub token; defaults to ``HF_TOKEN`` or the stored login. It is only
            sent to the Hub in the ``Authorization`` header, never printed, logged or written.
        create_pr (`bool`): Open a pull request instead of committing to the branch.
        metrics (`Mapping`, `str` or `os.PathLike`, *optional*): Training metrics for the card, or the path of a
            JSON file holding them (e.g. the main example's ``summary.json``).
        tags (`list[str]`, *optional*): Extra tags for the card.

    Returns:
        `huggingface_hub.CommitInfo`: The commit, with ``commit_url`` and ``oid``.

    Raises:
        `HubPushError`: The Hub refused or failed a request (the message says which and why).

    Example:

    ```py
    >>> from peft_prefix_plus.hub import push_adapter
    >>> push_adapter("outputs/adapter", "me/gpt2-prefix-plus", private=True, metrics="outputs/summary.json")
    >>> push_adapter(peft_model, "me/gpt2-prefix-plus", revision="experiment-2")
    ```
    """
    from_dir = isinstance(model_or_dir, (str, os.PathLike))
    if from_dir:
        source = os.fspath(model_or_dir)
        if not os.path.isfile(os.path.join(source, CONFIG_NAME)):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {source!r}: not an adapter saved with save_pretrained.")
        summaries_from_dir(source)  # fails early on a non-PrefixPlus adapter
    elif not is_prefix_plus_model(model_or_dir):
        raise ValueError(
            f"push_adapter needs a PrefixPlus PeftModel or an adapter directory, got {type(model_or_dir)}."
        )

    api = HfApi()
    where = f"{repo_id}" + (f" (revision {revision!r})" if revision else "")
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        remote_card = _fetch_card(api, repo_id, revision, token)
        with tempfile.TemporaryDirectory(prefix="prefix-plus-push-") as staging:
            if remote_card is not None:
                shutil.copyfile(remote_card, os.path.join(staging, CARD_NAME))
            elif from_dir and os.path.isfile(os.path.join(source, CARD_NAME)):
                shutil.copyfile(os.path.join(source, CARD_NAME), os.path.join(staging, CARD_NAME))
            if from_dir:
                _copy_adapter_dir(source, staging)
            else:
                model_or_dir.save_pretrained(staging)
            write_card(
                staging,
                summaries_from_dir(staging),
                adapter_id=repo_id,
                metrics=metrics,
                tags=tags,
                revision=revision,
            )
            logger.info("Pushing the PrefixPlus adapter to %s", where)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                commit_description=commit_description,
                token=token,
                create_pr=create_pr,
            )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        raise HubPushError(
            f"Pushing the adapter to {where} failed" + (f" (HTTP {status})" if status else "") + f": {error}\n"
            "The local adapter files were not changed; nothing was committed by this push."
        ) from error


def install_peft_hooks() -> None:
    """Make ``PeftModel.push_to_hub`` and ``PeftModel.create_or_update_model_card`` PrefixPlus-aware.

    Each hook checks the adapter type of the model it is called on and calls the original method for every
    non-PrefixPlus model, so stock PEFT behaviour is unchanged. Idempotent; called on ``import peft_prefix_plus``.

    Example:

    ```py
    >>> import peft_prefix_plus  # installs the hooks
    >>> peft_model.push_to_hub("me/my-adapter", private=True)  # adapter files and a PrefixPlus card
    ```
    """
    from peft import PeftModel

    from . import card

    if getattr(PeftModel.push_to_hub, "_prefix_plus_hook", False):
        return
    stock_push_to_hub = PeftModel.push_to_hub
    stock_create_or_update_model_card = PeftModel.create_or_update_model_card

    @functools.wraps(stock_push_to_hub)
    def push_to_hub(self: PeftModel, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not is_prefix_plus_model(self):
            return stock_push_to_hub(self, repo_id, *args, **kwargs)
        if args:
            raise TypeError("push_to_hub() takes the repo id as its only positional argument.")
        kwargs.pop("max_shard_size", None)  # adapters are small: never sharded
        return push_adapter(self, repo_id, **kwargs)

    @functools.wraps(stock_create_or_update_model_card)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        if not is_prefix_plus_model(self):
            return stock_create_or_update_model_card(self, output_dir)
        card.create_or_update_model_card(self, output_dir)

    push_to_hub.__doc__ = (
        "Upload the adapter to the Hub. For PrefixPlus models this is `peft_prefix_plus.hub.push_adapter` (adapter "
        "files and a PrefixPlus model card; also accepts `metrics=`); for other PEFT types, the stock method:\n\n"
        + (stock_push_to_hub.__doc__ or "")
    )
    push_to_hub._prefix_plus_hook = True
    create_or_update_model_card._prefix_plus_hook = True
    PeftModel.push_to_hub = push_to_hub
    PeftModel.create_or_update_model_card = create_or_update_model_card
