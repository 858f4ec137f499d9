"""Initialisation from real text (Li & Liang, 2021): the prefixes start as the keys and values that the frozen base
model computes for the tokens of a text, captured at every attention layer of every site."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from ..errors import PrefixPlusConfigError
from .config import PrefixPlusConfig
from .discovery import execution_device
from .layer import PrefixPlusLayer


def text_token_ids(model: nn.Module, config: PrefixPlusConfig, length: int) -> torch.Tensor:
    """Tokenize ``config.init_text`` (without special tokens) with ``config.tokenizer_name_or_path`` or the model's,
    keeping the first ``length`` tokens (the longest prefix uses no more; a shorter text is repeated later).

    Raises:
        ValueError: If no tokenizer can be loaded, the text has no tokens, or a token id is outside the model's
            vocabulary.
    """
    name = config.tokenizer_name_or_path or getattr(model.config, "name_or_path", None)
    if not name:
        raise PrefixPlusConfigError(
            'init_weights="text" needs a tokenizer for `init_text`: set `tokenizer_name_or_path` in the '
            "PrefixPlusConfig (the base model does not record the path it was loaded from)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise PrefixPlusConfigError(
            f'init_weights="text" could not load the tokenizer {name!r} ({error}); set `tokenizer_name_or_path` to '
            "a local tokenizer directory or a Hub id that is available."
        ) from error
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PrefixPlusConfigError(f"`init_text` {config.init_text!r} has no tokens for the tokenizer {name!r}.")
    ids = ids[:length]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and max(ids) >= vocab:
        raise PrefixPlusConfigError(
            f"The tokenizer {name!r} gives `init_text` {config.init_text!r} token id {max(ids)}, but the model's "
            f"vocabulary has {vocab} tokens (ids 0 to {vocab - 1}): the tokenizer does not belong to this model. Set "
            "`tokenizer_name_or_path` to the base model's tokenizer."
        )
    return torch.tensor([ids])


@torch.no_grad()
def capture_key_values(
    model: nn.Module, call_options: Callable[..., AbstractContextManager], input_ids: torch.Tensor
) -> dict[tuple, Any]:
    """Run ``model`` once on ``input_ids`` without any prefix and return, per ``(site, layer index)``, the post-RoPE
    ``(keys, values)`` its attention computed, ``(1, num_key_value_heads, length, key_dim)`` and ``(1,
    num_key_value_heads, length, value_dim)``.

    Encoder-decoder models read the tokens as encoder input and as decoder input, so the decoder self-attention sees
    the text and cross-attention sees the encoder's states of it.

    Args:
        model (`nn.Module`): The transformers model carrying PrefixPlus.
        call_options (`Callable`): The tuner's `PrefixPlusModel.call_options`.
        input_ids (`torch.Tensor`): ``(1, length)``.
    """
    device = execution_device(model, model.get_input_embeddings())
    inputs = {"input_ids": input_ids.to(device), "use_cache": False}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"]
    captured: dict[tuple, Any] = {}
    was_training = model.training
    try:
        model.eval()
        with call_options(disabled=True, capture=captured):
            model(**inputs)
        return captured
    finally:
        model.train(was_training)


def initialise_from_text(
    model: nn.Module,
    call_options: Callable[..., AbstractContextManager],
    layer: PrefixPlusLayer,
    adapter_name: str,
    config: PrefixPlusConfig,
) -> None:
    """Set the initial prefixes of ``adapter_name`` to the base model's key/value states of ``config.init_text``.

    The text's tokens are repeated cyclically, or truncated, to each site's prefix length.

    Args:
        model (`nn.Module`): The transformers model carrying ``layer``.
        call_options (`Callable`): The tuner's `PrefixPlusModel.call_options`.
        layer ([`PrefixPlusLayer`]): Holds the adapter's freshly created encoders.
        adapter_name (`str`): The adapter to initialise.
        config ([`PrefixPlusConfig`]): Its configuration (`init_weights="text"`).

    Example:

    ```py
    >>> config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, init_weights="text",
    ...     init_text="Describe the table in one sentence:", tokenizer_name_or_path="HuggingFaceTB/SmolLM2-135M")
    >>> model = get_peft_model(base, config)  # calls initialise_from_text
    ```
    """
    encoders = layer.prefix_plus_sites[adapter_name]
    length = max((encoder.num_virtual_tokens for encoder in encoders.values()), default=0)
    if not length:
        return
    captured = capture_key_values(model, call_options, text_token_ids(model, config, length))
    for site, encoder in encoders.items():
        pairs = []
        for layer_index in sorted(encoder.slots, key=encoder.slots.get):
            keys, values = captured[(site, layer_index)]
            positions = torch.arange(encoder.num_virtual_tokens, device=keys.device) % keys.shape[2]
            pairs.append((keys[0][:, positions], values[0][:, positions]))
        encoder.set_initial_prefix(encoder.pack(pairs))
