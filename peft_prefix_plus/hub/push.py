"""Pushing PrefixPlus adapters to the Hugging Face Hub.

[`push_adapter`] uploads an adapter, from a `PeftModel` or from a directory written by ``save_pretrained``, with a
PrefixPlus model card (see :mod:`peft_prefix_plus.files.card`), in one commit. Every local input (the adapter files,
through the one validated reader; the metrics; the repo id) is checked before the first request to the Hub. Files are
staged in a temporary directory: the model and the adapter directory are never modified.

`PeftModel.push_to_hub` calls [`push_adapter`] for PrefixPlus models (see :mod:`peft_prefix_plus.integration`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import httpx2
from huggingface_hub import CommitInfo, HfApi, constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..errors import AdapterFileError, HubPushError
from ..files import card
from ..files.read import read_prefix_plus_adapter
from ..tuner.model import PrefixPlusModel

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload PrefixPlus adapter"
NOTHING_SENT = "Nothing was sent to the Hub."


def is_prefix_plus_model(model: Any) -> bool:
    """Whether ``model`` is a `PeftModel` whose adapters are PrefixPlus adapters.

    Args:
        model (`Any`): Any object, typically a `peft.PeftModel`.
    """
    return isinstance(getattr(model, "base_model", None), PrefixPlusModel)


def adapter_subfolders(directory: Union[str, os.PathLike]) -> list[str]:
    """Names of the subfolders of ``directory`` that hold an ``adapter_config.json``: PEFT's other adapters, but
    also, e.g., a Trainer's ``checkpoint-500``. Nothing tells them apart, so none is used unless it is named.

    Args:
        directory (`str` or `os.PathLike`): A directory written by ``save_pretrained``.
    """
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and os.path.isfile(os.path.join(e, CONFIG_NAME)))


def summaries_from_dir(
    directory: Union[str, os.PathLike], adapter_names: Optional[Sequence[str]] = None
) -> list[card.AdapterSummary]:
    """The PrefixPlus adapters saved in ``directory``: the one at its root, then those named in ``adapter_names``.

    PEFT's ``save_pretrained`` saves adapter ``name`` in the subfolder ``name``; only subfolders named here are read,
    so a training checkpoint beside the adapter is never taken for one. Every adapter is read and validated by
    :func:`peft_prefix_plus.files.read_prefix_plus_adapter`.

    Args:
        directory (`str` or `os.PathLike`): A directory holding ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        adapter_names (`Sequence[str]`, *optional*): Adapters saved in subfolders of ``directory``.

    Raises:
        AdapterFileError: If a name is not a plain folder name, or an adapter is missing, invalid, not PrefixPlus, or
            holds NaN or infinite values.

    Example:

    ```py
    >>> [s.name for s in summaries_from_dir("out/adapters", ["other"])]
    ['default', 'other']
    ```
    """
    for name in adapter_names or ():
        if name in ("", ".", "..") or os.path.basename(name) != name or (os.altsep and os.altsep in name):
            raise AdapterFileError(
                f"{name!r} is not the name of a subfolder: name an adapter saved in a subfolder of {directory}."
            )
    folders = {"default": os.fspath(directory)}
    folders.update({name: os.path.join(directory, name) for name in adapter_names or () if name != "default"})
    summaries = []
    for name, folder in folders.items():
        adapter = read_prefix_plus_adapter(folder)
        adapter.require_finite("push")  # a NaN or Inf would publish a broken adapter
        summaries.append(card.adapter_summary(name, adapter.config, adapter.all_tensors()))
    return summaries


def _check_local_inputs(
    model_or_dir: Any,
    repo_id: str,
    metrics: Any,
    adapter_names: Optional[Sequence[str]],
    revision: Optional[str],
    create_pr: bool,
) -> tuple[Optional[dict], list[card.AdapterSummary]]:
    """Validate everything local before any request: repo id, revision, metrics, adapter files."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(
            f"{repo_id!r} is not a valid Hub repo id ({error}). Use 'namespace/name'. {NOTHING_SENT}"
        ) from None
    if create_pr and revision not in (None, "main"):
        raise HubPushError(
            f"A pull request is opened against main; it cannot target revision {revision!r}. Drop the revision, or "
            f"push to the branch without create_pr. {NOTHING_SENT}"
        )
    try:
        metrics = card.load_metrics(metrics)
    except (OSError, ValueError) as error:
        raise HubPushError(f"Cannot read the metrics for the card: {error}. {NOTHING_SENT}") from None
    if not isinstance(model_or_dir, (str, os.PathLike)):
        if not is_prefix_plus_model(model_or_dir):
            raise HubPushError(
                f"push_adapter needs a PrefixPlus PeftModel or an adapter directory, got {type(model_or_dir)}."
            )
        return metrics, []
    return metrics, summaries_from_dir(model_or_dir, adapter_names)


def _stage_dir(source: str, staging: str, adapters: Sequence[card.AdapterSummary]) -> None:
    """Copy the config and weights of ``adapters`` (root first, others from their subfolders) to ``staging``."""
    for summary in adapters:
        sub = "" if summary.name == "default" else summary.name
        os.makedirs(os.path.join(staging, sub), exist_ok=True)
        for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME):
            shutil.copyfile(os.path.join(source, sub, name), os.path.join(staging, sub, name))
    skipped = sorted(set(adapter_subfolders(source)) - {summary.name for summary in adapters})
    if skipped:
        warnings.warn(
            f"Not pushed: subfolders {', '.join(skipped)} of {source} hold adapter configs (training checkpoints or "
            "other adapters). To push an adapter saved in a subfolder, name it (`--adapter NAME`, "
            "`adapter_names=[...]`).",
            UserWarning,
            stacklevel=3,
        )


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
    adapter_names: Optional[Sequence[str]] = None,
) -> CommitInfo:
    """Upload a PrefixPlus adapter to the Hub with its model card, in one commit.

    From a model, every PrefixPlus adapter of the model is pushed (non-default ones in subfolders). From a directory,
    its root adapter is pushed, plus the adapters saved in the subfolders named in ``adapter_names``; any other
    subfolder (e.g. a Trainer's ``checkpoint-500``) is left out, with a warning. Only safetensors weights are pushed.
    A card whose YAML front matter does not parse is neither modified nor uploaded (a warning says so).

    The repository is created if needed (``private`` applies then only) and so is the branch ``revision`` (unless
    ``create_pr``). An existing README.md in the repository is updated: its metadata is merged and only the generated
    PrefixPlus section is replaced; otherwise the directory's card (if any) is the start.

    Args:
        model_or_dir (`PeftModel`, `str` or `os.PathLike`): A PrefixPlus `PeftModel`, or a directory written by its
            ``save_pretrained``.
        repo_id (`str`): ``"namespace/name"``, or ``"name"`` for the token's user.
        private (`bool`, *optional*): Create the repository as private. Ignored if it exists.
        revision (`str`, *optional*): The branch to push to, created from main if missing. Default: main.
        commit_message (`str`, *optional*): Defaults to ``"Upload PrefixPlus adapter"``.
        commit_description (`str`, *optional*): A longer commit description.
        token (`str` or `bool`, *optional*): A Hub token; defaults to ``HF_TOKEN`` or the stored login
            (``hf auth login``). It is only sent to the Hub in the ``Authorization`` header, never printed or written.
        create_pr (`bool`): Open a pull request against ``revision`` instead of committing to it.
        metrics (`Mapping`, `str` or `os.PathLike`, *optional*): Training metrics for the card, or the path of a JSON
            file holding them (e.g. the main example's ``summary.json``).
        tags (`list[str]`, *optional*): Extra tags for the card.
        adapter_names (`Sequence[str]`, *optional*): From a directory: adapters saved in its subfolders to push too.

    Returns:
        `huggingface_hub.CommitInfo`: The commit, with ``commit_url`` and ``oid``.

    Raises:
        `HubPushError`: A local input was refused before any request (bad repo id or metrics), or the Hub refused,
            failed or could not be reached. The message says which and why.
        `AdapterFileError`: The directory does not hold a valid PrefixPlus adapter (checked before any request).

    Example:

    ```py
    >>> from peft_prefix_plus.hub import push_adapter
    >>> push_adapter("outputs/data_to_text/adapter", "me/smollm2-prefix-plus", private=True,
    ...              metrics="outputs/data_to_text/summary.json")
    >>> push_adapter(peft_model, "me/smollm2-prefix-plus", revision="experiment-2")
    ```
    """
    metrics, adapters = _check_local_inputs(model_or_dir, repo_id, metrics, adapter_names, revision, create_pr)
    from_dir = isinstance(model_or_dir, (str, os.PathLike))
    api = HfApi(token=token)
    where = repo_id + (f" (revision {revision!r})" if revision else "")
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not create_pr and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        try:
            remote_card = api.hf_hub_download(repo_id, card.CARD_NAME, revision=revision)
        except EntryNotFoundError:
            remote_card = None
        with tempfile.TemporaryDirectory(prefix="prefix-plus-push-") as staging:
            local_card = os.path.join(model_or_dir, card.CARD_NAME) if from_dir else None
            start = next((path for path in (remote_card, local_card) if path and os.path.isfile(path)), None)
            if start:
                shutil.copyfile(start, os.path.join(staging, card.CARD_NAME))
            if from_dir:
                _stage_dir(os.fspath(model_or_dir), staging, adapters)
            else:
                model_or_dir.save_pretrained(staging)  # writes the card through the hook below
                adapters = card.summaries_from_model(model_or_dir)
            if card.write_card(staging, adapters, repo_id, metrics=metrics, tags=tags, revision=revision) is None:
                os.remove(os.path.join(staging, card.CARD_NAME))  # unparsable (warned): the Hub would refuse it
            logger.info("Pushing the PrefixPlus adapter to %s", where)
            try:
                return api.upload_folder(
                    repo_id=repo_id,
                    folder_path=staging,
                    revision=revision,
                    commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                    commit_description=commit_description,
                    create_pr=create_pr,
                )
            except ValueError as error:  # the Hub's check of the card's metadata (huggingface_hub raises ValueError)
                raise HubPushError(f"The Hub refused the model card of {where}: {error}. {NOTHING_SENT}") from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        raise HubPushError(
            f"Pushing the adapter to {where} failed" + (f" (HTTP {status})" if status else "") + f": {error}\n"
            "The local adapter files were not changed; nothing was committed by this push."
        ) from error
    except OfflineModeIsEnabled as error:
        raise HubPushError(f"Cannot push {where}: HF_HUB_OFFLINE is set. Unset it to push. {NOTHING_SENT}") from error
    except httpx2.TransportError as error:
        raise HubPushError(
            f"Could not reach the Hub at {constants.ENDPOINT} to push {where}: {error}. Check the network connection "
            "and HF_ENDPOINT; nothing was committed and the local files were not changed."
        ) from error
