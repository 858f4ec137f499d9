"""Shared fixtures: tiny models of every tested family, built from configs (no Hub access)."""

from __future__ import annotations

import copy
import inspect
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version

import peft_prefix_plus  # noqa: F401 - registers PREFIX_PLUS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 100


#: Per family: the config class, its tiny sizes, the model class and the PEFT task type.
FAMILY_SPECS: dict[str, tuple[type, dict, type, str]] = {
    "gpt2": (
        transformers.GPT2Config,
        {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        transformers.GPT2LMHeadModel,
        "CAUSAL_LM",
    ),
    "llama": (
        transformers.LlamaConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        transformers.LlamaForCausalLM,
        "CAUSAL_LM",
    ),
    "opt": (
        transformers.OPTConfig,
        {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        transformers.OPTForCausalLM,
        "CAUSAL_LM",
    ),
    "t5": (
        transformers.T5Config,
        {
            "d_model": 32,
            "d_ff": 64,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "d_kv": 8,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "dropout_rate": 0.0,
        },
        transformers.T5ForConditionalGeneration,
        "SEQ_2_SEQ_LM",
    ),
    "bart": (
        transformers.BartConfig,
        {
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        transformers.BartForConditionalGeneration,
        "SEQ_2_SEQ_LM",
    ),
    "bert": (
        transformers.BertConfig,
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
            "num_labels": 3,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        transformers.BertForSequenceClassification,
        "SEQ_CLS",
    ),
}


def uses_attention_interface(model_cls: type) -> bool:
    """Whether the installed transformers computes ``model_cls``'s attention through ``AttentionInterface``.

    Read from transformers' own modeling source, independently of PrefixPlus, so that the tests follow what the
    installed version does (Falcon moved to the interface in transformers 5.25, for instance).
    """
    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[model_cls.__module__])


#: Families that join the matrix only where the installed transformers computes their attention through the interface.
INTERFACE_DEPENDENT_SPECS: dict[str, tuple[type, dict, type, str]] = {
    "falcon": (
        transformers.FalconConfig,
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
        },
        transformers.FalconForCausalLM,
        "CAUSAL_LM",
    ),
}
FAMILY_SPECS.update(
    {family: spec for family, spec in INTERFACE_DEPENDENT_SPECS.items() if uses_attention_interface(spec[2])}
)
FAMILIES = list(FAMILY_SPECS)


def tiny_config(family: str, attn_implementation: str = "sdpa", **overrides) -> transformers.PretrainedConfig:
    """The tiny config of ``family``; ``overrides`` replace or add config fields (e.g. ``num_hidden_layers=3``)."""
    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    config_cls, sizes, _, _ = FAMILY_SPECS[family]
    fields = {"vocab_size": VOCAB, **sizes, **overrides}
    return config_cls(attn_implementation=attn_implementation, **fields)


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A tiny randomly initialised model of ``family`` (seeded) and its PEFT task type.

    Families: gpt2, llama (grouped-query attention), opt, t5, bart, bert (sequence classification), and falcon
    (multi-query attention) where the installed transformers runs it through the interface. ``overrides``
    are config fields, e.g. ``tiny_model("llama", num_hidden_layers=3)``.
    """
    _, _, model_cls, task_type = FAMILY_SPECS[family]
    config = tiny_config(family, attn_implementation, **overrides)
    torch.manual_seed(seed)
    return model_cls(config), task_type


def batch_for(task_type: str, batch_size: int = 2, seq_len: int = 6, seed: int = 1, left_pad: bool = True) -> dict:
    """A small input batch for ``task_type``, left-padded in its last row, with labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if left_pad and batch_size > 1:
        input_ids[-1, :2] = 0
        attention_mask[-1, :2] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task_type == "SEQ_2_SEQ_LM":
        batch["labels"] = torch.randint(3, VOCAB, (batch_size, 4), generator=generator)
    elif task_type == "CAUSAL_LM":
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    elif task_type == "SEQ_CLS":
        batch["labels"] = torch.randint(0, 3, (batch_size,), generator=generator)
    return batch


def site_kwargs(task_type: str) -> dict:
    """Distinct lengths for all three sites on encoder-decoder models, none otherwise."""
    if task_type == "SEQ_2_SEQ_LM":
        return {"encoder_num_virtual_tokens": 2, "cross_num_virtual_tokens": 5}
    return {}


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A reference copy of the base model, frozen like the base inside a PeftModel (sdpa picks its kernel by it)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def forward_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The logits of ``model`` on ``batch``, without gradients; encoder-decoder models get the labels as decoder input."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(model.config, "is_encoder_decoder", False) and "labels" in batch:
        inputs["labels"] = batch["labels"]
    with torch.no_grad():
        return model(**inputs).logits


#: The keyword `generate` takes a KV cache by: ``cache`` from transformers 5.25 (``past_key_values`` is deprecated).
GENERATE_CACHE = "cache" if version.parse(transformers.__version__) >= version.parse("5.25") else "past_key_values"


def returned_cache(output):
    """The KV cache a forward or `generate` returns: ``cache`` from transformers 5.25, ``past_key_values`` before."""
    return output.cache if "cache" in output else output.past_key_values


def cache_layers(cache) -> list:
    """Every layer of a KV cache, the self- and cross-attention parts of an encoder-decoder cache included."""
    parts = (
        [cache.self_attention_cache, cache.cross_attention_cache]
        if hasattr(cache, "self_attention_cache")
        else [cache]
    )
    return [layer for part in parts for layer in part.layers]


def all_configs(model: torch.nn.Module) -> list:
    """Every distinct transformers config held by a module of ``model`` (T5's encoder and decoder hold copies)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs.setdefault(id(config), config)
    return list(configs.values())


#: A plain chat template for the tiny chat model (TRL's trainers and the docs' TRL block apply it).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a BPE tokenizer of the example data and a chat template, saved like a Hub model."""
    scripts = str(Path(__file__).parent / "scripts")
    sys.path.insert(0, scripts)
    try:
        from make_tiny_model import make_tiny_model
    finally:
        sys.path.remove(scripts)
    directory = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-chat", "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory
