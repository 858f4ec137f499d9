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
    # multi-head latent attention: keys (nope 16 + rope 8 = 24) wider than values (12), and a cache of latents
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 12,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        transformers.DeepseekV3ForCausalLM,
        "CAUSAL_LM",
    ),
    # per-layer geometry: three sliding-window layers of head dim 16 and a full-attention layer of head dim 32
    "gemma4": (
        transformers.Gemma4TextConfig,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "sliding_window": 4,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        transformers.Gemma4ForCausalLM,
        "CAUSAL_LM",
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

#: Token ids of the vision-language families: the image token, and the tokens that open and close an image (Qwen2-VL's
#: vision start, Gemma 3's begin and end of image). Text tokens are drawn below them (`multimodal_batch`).
IMAGE_TOKEN, IMAGE_START, IMAGE_END = 99, 97, 98
#: Image tokens per image: every vision family below turns its 16x16 image into 4 tokens for the language model.
IMAGE_TOKENS = 4
_TINY_TEXT = {"vocab_size": VOCAB, **FAMILY_SPECS["llama"][1]}
_TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

#: Vision-language and speech families: the language model (and Whisper's decoder and encoder) gets the prefixes, the
#: vision tower none. Not part of FAMILIES: their inputs are images or audio features, from `multimodal_batch`.
MULTIMODAL_SPECS: dict[str, tuple[type, dict, type, str | None]] = {
    "llava": (
        transformers.LlavaConfig,
        {
            "vision_config": transformers.CLIPVisionConfig(
                **_TINY_VISION, image_size=16, patch_size=8, projection_dim=16
            ),  # 4 patches, the CLS token dropped
            "text_config": {"model_type": "llama", **_TINY_TEXT},
            "image_token_index": IMAGE_TOKEN,
            "vision_feature_layer": -1,
        },
        transformers.LlavaForConditionalGeneration,
        "CAUSAL_LM",
    ),
    "qwen2_vl": (
        transformers.Qwen2VLConfig,
        {
            "text_config": {
                **_TINY_TEXT,
                "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2]},
            },
            "vision_config": {
                "depth": 2,
                "embed_dim": 16,
                "hidden_size": 32,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 2,
                "spatial_merge_size": 1,
                "temporal_patch_size": 1,
            },
            "image_token_id": IMAGE_TOKEN,
            "vision_start_token_id": IMAGE_START,
            "video_token_id": IMAGE_END,
        },
        transformers.Qwen2VLForConditionalGeneration,
        "CAUSAL_LM",
    ),
    "gemma3": (
        transformers.Gemma3Config,
        {
            "vision_config": {**_TINY_VISION, "image_size": 16, "patch_size": 4},  # 16 patches pooled to 4
            "text_config": {
                **_TINY_TEXT,
                "head_dim": 8,
                "sliding_window": 4,  # shorter than the prompt
                "layer_types": ["sliding_attention", "full_attention"],
            },
            "mm_tokens_per_image": IMAGE_TOKENS,
            "image_token_index": IMAGE_TOKEN,
            "boi_token_index": IMAGE_START,
            "eoi_token_index": IMAGE_END,
        },
        transformers.Gemma3ForConditionalGeneration,
        "CAUSAL_LM",
    ),
    "idefics3": (
        transformers.Idefics3Config,
        {
            "vision_config": {**_TINY_VISION, "image_size": 16, "patch_size": 8},
            "text_config": {"model_type": "llama", **_TINY_TEXT},
            "image_token_id": IMAGE_TOKEN,
            "scale_factor": 1,
        },
        transformers.Idefics3ForConditionalGeneration,
        "CAUSAL_LM",
    ),
    "paligemma": (
        transformers.PaliGemmaConfig,
        {
            "vision_config": {**_TINY_VISION, "image_size": 16, "patch_size": 8, "projection_dim": 32},
            "text_config": {
                **_TINY_TEXT,
                "model_type": "gemma",
                "head_dim": 8,
            },
            "image_token_index": IMAGE_TOKEN,
            "projection_dim": 32,
        },
        transformers.PaliGemmaForConditionalGeneration,
        "CAUSAL_LM",
    ),
    # PEFT's SEQ_2_SEQ_LM wrapper passes `input_ids`, which Whisper's forward refuses: no task type, as PEFT's own
    # Whisper examples
    "whisper": (
        transformers.WhisperConfig,
        {
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "num_mel_bins": 8,
            "max_source_positions": 16,  # the encoder takes 32 frames and attends over 16 positions
            "max_target_positions": 32,
            "decoder_start_token_id": 1,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "suppress_tokens": None,
            "begin_suppress_tokens": None,
            "dropout": 0.0,
        },
        transformers.WhisperForConditionalGeneration,
        None,
    ),
}
MULTIMODAL = list(MULTIMODAL_SPECS)
#: The vision-language families of MULTIMODAL.
VISION_LANGUAGE = [family for family in MULTIMODAL if family != "whisper"]


def tiny_config(family: str, attn_implementation: str = "sdpa", **overrides) -> transformers.PretrainedConfig:
    """The tiny config of ``family``; ``overrides`` replace or add config fields (e.g. ``num_hidden_layers=3``)."""
    specs = {**FAMILY_SPECS, **MULTIMODAL_SPECS}
    if family not in specs:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES + MULTIMODAL}")
    config_cls, sizes, _, _ = specs[family]
    fields = {**sizes, **overrides}
    if "text_config" not in fields:  # a vision-language config holds the vocabulary in its text config
        fields = {"vocab_size": VOCAB, **fields}
    return config_cls(attn_implementation=attn_implementation, **copy.deepcopy(fields))


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A tiny randomly initialised model of ``family`` (seeded) and its PEFT task type.

    Families: gpt2, llama (grouped-query attention), opt, t5, bart, bert (sequence classification), and falcon
    (multi-query attention) where the installed transformers runs it through the interface; and the MULTIMODAL
    families (vision-language models and Whisper, see `multimodal_batch` for their inputs). ``overrides``
    are config fields, e.g. ``tiny_model("llama", num_hidden_layers=3)``.
    """
    _, _, model_cls, task_type = {**FAMILY_SPECS, **MULTIMODAL_SPECS}[family]
    config = tiny_config(family, attn_implementation, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config)
    if family == "gemma3":  # transformers initialises its image projection to zeros: every image would look alike
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    return model, task_type


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


def multimodal_batch(family: str, batch_size: int = 2, seed: int = 1) -> dict:
    """A small input batch for a MULTIMODAL family, with labels.

    Vision-language families: one 16x16 image per row, its `IMAGE_TOKENS` image tokens after the first text token,
    the last row left-padded by one token, and what the family's model needs besides (Qwen2-VL's image grid and token
    types, Gemma 3's and PaliGemma's token types). Whisper: log-mel features of the one length its encoder takes, and
    decoder labels.
    """
    generator = torch.Generator().manual_seed(seed)
    if family == "whisper":
        config = tiny_config(family)
        features = torch.randn(batch_size, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
        return {"input_features": features, "labels": torch.randint(3, VOCAB, (batch_size, 4), generator=generator)}
    text = torch.randint(3, IMAGE_START, (batch_size, 4), generator=generator)
    image = torch.tensor([IMAGE_START] * (family == "qwen2_vl") + [IMAGE_TOKEN] * IMAGE_TOKENS)
    input_ids = torch.cat([text[:, :1], image.expand(batch_size, -1), text[:, 1:]], dim=1)
    attention_mask = torch.ones_like(input_ids)
    if batch_size > 1:
        input_ids[-1, 0] = 0
        attention_mask[-1, 0] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "qwen2_vl":  # 2x2 patches of 2x2 pixels per image, flattened as its processor does
        batch["pixel_values"] = torch.randn(batch_size * IMAGE_TOKENS, 3 * 2 * 2, generator=generator)
        batch["image_grid_thw"] = torch.tensor([[1, 2, 2]] * batch_size)
        batch["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
    else:  # one 16x16 image per row
        images = torch.randn(batch_size, 3, 16, 16, generator=generator)
        batch["pixel_values"] = images[:, None] if family == "idefics3" else images
    if family in ("gemma3", "paligemma"):
        batch["token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    return batch


def multimodal_generate_kwargs(family: str) -> dict:
    """Greedy `generate` settings for a MULTIMODAL family: a vision-language model must not generate image tokens
    (without a cache, every step runs the images again and counts the image tokens)."""
    settings = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    if family != "whisper":
        settings["suppress_tokens"] = [IMAGE_START, IMAGE_END, IMAGE_TOKEN]
    return settings


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
