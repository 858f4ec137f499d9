"""Sweep every causal-LM and seq2seq model family transformers ships through PrefixPlus, one tiny model each.

For every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`` (a
type in both mappings is tried once per task, labelled ``TYPE:causal`` and ``TYPE:seq2seq``), the sweep

1. builds a tiny random model from the type's default config, shrunk generically: hidden size 64, 2 layers, 4 heads
   (2 key/value heads), head dim 16, feed-forward 64, vocabulary 128, 128 positions, few experts, per-layer lists
   (``layer_types`` and the like) cut to a few representative layers, nested sub-configs (``text_config``,
   ``encoder``, ``decoder``, vision or audio towers) shrunk the same way; ``attn_implementation="sdpa"``, or
   ``"eager"`` where the model has no SDPA (``FIXUPS`` adds the few values a default config lacks to build at all);
2. runs the base model once on ``input_ids`` of shape (1, 6) (and ``decoder_input_ids`` of shape (1, 4) for seq2seq),
   then ``peft.get_peft_model(model, PrefixPlusConfig(task_type=..., num_virtual_tokens=4))`` and the same forward;
3. classifies the outcome:

   - ``works``: the wrapped forward ran and its logits differ from the base model's (and are finite);
   - ``refused clearly``: PrefixPlus raised one of its own errors (`peft_prefix_plus.errors.PrefixPlusError`); a
     refusal because its probe pass failed is grouped in the summary by the error of that pass;
   - ``raw traceback``: any other exception, or a hang in the PrefixPlus steps (recorded with its type, the first line
     of its message, the innermost frame and the innermost PrefixPlus frame);
   - ``no effect``: the wrapped forward ran but its logits equal the base model's, or are not finite;
   - ``not constructible tiny``: the tiny model could not be built in 20 s, or its base forward (without PrefixPlus)
     fails on plain ``input_ids``, so the family cannot be tested this way (the reason is recorded).

Each model runs in one of two spawned worker processes (each imports torch, transformers and PEFT once); a worker
that hangs (20 s to build the model, 60 s for the rest) or dies is killed and replaced, so no family can stop the
sweep. A full run takes a few minutes on 2 CPU cores.

Usage::

    python tests/scripts/family_sweep.py --out /tmp/sweep.json
    python tests/scripts/family_sweep.py --only llama t5 bart:seq2seq   # rerun a subset (a type, or TYPE:task)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
import traceback
from collections import defaultdict
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 20.0
RUN_TIMEOUT_S = 60.0
WORKER_START_TIMEOUT_S = 120.0

WORKS, REFUSED, RAW, NO_EFFECT, NOT_TINY = (
    "works",
    "refused clearly",
    "raw traceback",
    "no effect",
    "not constructible tiny",
)
STATUSES = (WORKS, REFUSED, RAW, NO_EFFECT, NOT_TINY)
TASKS = {"CAUSAL_LM": "causal", "SEQ_2_SEQ_LM": "seq2seq"}

# --- shrinking a config -------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, MOE_FFN, VOCAB, POSITIONS = 64, 4, 2, 16, 64, 32, 128, 128
HIDDEN_KEYS = (
    "hidden_size",
    "d_model",
    "n_embd",
    "n_embed",
    "embed_dim",
    "model_dim",
    "word_embed_proj_dim",
    "embedding_dim",
)
LAYER_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "decoder_layers",
    "encoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "num_blocks",
)
HEAD_KEYS = (
    "num_attention_heads",
    "n_head",
    "n_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "num_decoder_attention_heads",
    "num_heads",
)
KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
HEAD_DIM_KEYS = ("head_dim", "d_kv", "kv_channels", "attention_head_size", "d_head")
FFN_KEYS = (
    "intermediate_size",
    "ffn_dim",
    "d_ff",
    "n_inner",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "ffn_hidden_size",
    "dim_feedforward",
    "intermediate_dim",
)
MOE_FFN_KEYS = (
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "expert_intermediate_size",
)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "max_seq_len")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k")
ONE_KEYS = (
    "n_group",
    "num_expert_group",
    "topk_group",
    "n_shared_experts",
    "first_k_dense_replace",
    "n_groups",
    "mamba_n_groups",
)
MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16}
ROTARY_KEYS = ("rotary_dim", "rotary_emb_dim")
SSM = {"state_size": 16, "ssm_state_size": 16, "mamba_d_state": 16}
#: (heads, head dim) field pairs of SSM mixers, whose product must equal ``expand * hidden_size``
SSM_HEADS = (("num_heads", "head_dim"), ("mamba_num_heads", "mamba_head_dim"), ("mamba_n_heads", "mamba_d_head"))
#: Model types whose default config does not build a model (or builds one without attention layers): the few
#: values a real checkpoint would bring.
FIXUPS: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1]},
    "cohere_compass_text": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    },
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0}},
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "musicgen": {"decoder": {"num_codebooks": 1}},
    "musicgen_melody": {"decoder": {"num_codebooks": 1}},
    "nemo_speechlm": {"head_config": {"audio_hidden_size": HIDDEN}},
    "reformer": {"axial_pos_shape": [8, 16], "axial_pos_embds_dim": [32, 32], "max_position_embeddings": 128},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
    },
    "xmod": {"default_language": "en_XX"},
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
}
FIXUPS["qwen4_exp"] = {"text_config": FIXUPS["qwen4_exp_text"]}
#: Default configs that fail their own validation, and what makes them pass it.
DEFAULT_FIXUPS = {"gemma4_assistant": FIXUPS["gemma4_assistant"]}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_layer_fields(values: dict[str, Any], layers: int) -> dict[str, Any]:
    """Fields that hold one entry per layer (a list, or a pattern string such as ``"M-M*"``)."""
    return {
        key: value
        for key, value in values.items()
        if not key.startswith("_")
        and (isinstance(value, (list, tuple)) or (isinstance(value, str) and re.search(r"pattern|layer|block", key)))
        and len(value) == layers
    }


def _layer_index_fields(values: dict[str, Any], layers: int) -> dict[str, list[int]]:
    """Fields that list layer indices (e.g. the attention layers of a hybrid model)."""
    out = {}
    for key, value in values.items():
        if (
            isinstance(value, (list, tuple))
            and value
            and len(value) < layers
            and all(_is_int(v) and 0 <= v < layers for v in value)
            and re.search(r"layer|idx|indices|index", key)
        ):
            out[key] = list(value)
    return out


def _hidden_sizes(config: Any) -> set[int]:
    """The hidden sizes of ``config`` and of its sub-configs, before shrinking."""
    from transformers import PreTrainedConfig

    sizes = {v for k, v in vars(config).items() if k in HIDDEN_KEYS and _is_int(v) and v > HIDDEN}
    for value in vars(config).values():
        if isinstance(value, PreTrainedConfig):
            sizes |= _hidden_sizes(value)
    return sizes


def shrink_overrides(config: Any, causal: bool = False, hidden_sizes: set[int] | None = None) -> dict[str, Any]:
    """The keyword arguments that rebuild ``config`` tiny (sub-configs as dicts of their own overrides); ``causal``
    marks the top config of a causal LM (``is_decoder=True`` where the config has the flag)."""
    from transformers import PreTrainedConfig

    values = dict(vars(config))
    out: dict[str, Any] = {}
    if hidden_sizes is None:
        hidden_sizes = _hidden_sizes(config)
    # dimensions that mirror a hidden size of this config or another one (a projector's input, an adapter's output)
    for key, value in values.items():
        if (
            re.search(r"(_dim|hidden_size|_input_size|_output_size)$", key)
            and _is_int(value)
            and value in hidden_sizes
        ):
            out[key] = HIDDEN

    def setif(keys: tuple[str, ...], value: int, only_if_larger: bool = False) -> None:
        for key in keys:
            old = values.get(key)
            if _is_int(old) and (not only_if_larger or old > value):
                out[key] = value

    hidden = HIDDEN if any(_is_int(values.get(k)) for k in HIDDEN_KEYS) else None
    setif(HIDDEN_KEYS, HIDDEN)
    setif(HEAD_KEYS, HEADS)
    # multi-head latent attention (DeepSeek-V3 and kin) has as many key/value heads as query heads
    setif(KV_HEAD_KEYS, HEADS if _is_int(values.get("kv_lora_rank")) else KV_HEADS, only_if_larger=True)
    setif(HEAD_DIM_KEYS, HEAD_DIM)
    setif(FFN_KEYS, FFN)
    setif(MOE_FFN_KEYS, MOE_FFN)
    setif(("vocab_size",), VOCAB, only_if_larger=True)
    setif(ROTARY_KEYS, HEAD_DIM // 2, only_if_larger=True)
    # sizes left to a checkpoint (None) in a default config
    heads_known = any(_is_int(values.get(k)) for k in HEAD_KEYS)
    moe = any(_is_int(values.get(k)) for k in (*EXPERT_KEYS, *MOE_FFN_KEYS))
    for keys, value, when in (
        (("head_dim",), HEAD_DIM, heads_known),
        (("num_key_value_heads",), KV_HEADS, heads_known),
        (TOPK_KEYS, 2, moe),
        (EXPERT_KEYS, 4, moe),
        (MOE_FFN_KEYS[:1], MOE_FFN, moe),
        (("n_shared_experts",), 1, moe),
    ):
        for key in keys:
            if key in values and values[key] is None and when:
                out[key] = value
    for key, value in values.items():
        if key in FFN_KEYS and isinstance(value, list) and all(_is_int(v) for v in value):
            out[key] = [FFN] * len(value)  # one size per layer (cut to the kept layers below)
        elif "vocab" in key and key != "vocab_size" and _is_int(value) and value > 1024:
            out[key] = VOCAB
        elif key == "hidden_size_per_layer_input" and _is_int(value) and value:
            out[key] = HEAD_DIM
        elif re.fullmatch(r"index(er)?_(num_)?(n_)?heads|index(er)?_kv_heads", key) and _is_int(value):
            out[key] = 1
        elif re.fullmatch(r"index(er)?_head_dim", key) and _is_int(value):
            out[key] = HEAD_DIM
        elif key == "num_kv_shared_layers" and _is_int(value):
            out[key] = 0
        elif key == "is_decoder" and value is False and causal:
            out[key] = True
    setif(POSITION_KEYS, POSITIONS, only_if_larger=True)
    setif(EXPERT_KEYS, 4, only_if_larger=True)
    setif(TOPK_KEYS, 2, only_if_larger=True)
    setif(ONE_KEYS, 1, only_if_larger=True)
    for key, value in {**MLA, **SSM}.items():
        setif((key,), value, only_if_larger=True)
    # SSM mixers: heads * head_dim == expand * hidden_size
    expand = values.get("expand")
    if hidden and _is_int(expand):
        for heads_key, dim_key in SSM_HEADS:
            if _is_int(values.get(heads_key)) and _is_int(values.get(dim_key)):
                out[dim_key] = HEAD_DIM
                out[heads_key] = expand * hidden // HEAD_DIM
    # periods and offsets of hybrid layouts (an attention layer every 8 layers, from layer 4, ...)
    for key, value in values.items():
        if _is_int(value) and "layer" in key and key.endswith(("_period", "_interval", "every_n_layers")):
            out[key] = min(value, 2)
        if _is_int(value) and "layer" in key and key.endswith("_offset") and value > 1:
            out[key] = value % 2
    if _is_int(values.get("full_attention_interval")):
        out["full_attention_interval"] = min(values["full_attention_interval"], 2)
    # layers: keep one layer of each kind a per-layer list names (at least 2, at most 4)
    old_layers = next((values[k] for k in LAYER_KEYS if _is_int(values.get(k))), None)
    if old_layers:
        per_layer = _per_layer_fields(values, old_layers) if old_layers > 2 else {}
        index_fields = _layer_index_fields(values, old_layers) if old_layers > 2 else {}
        keep: list[int] = [0]
        for value in per_layer.values():
            seen = set()
            for i, entry in enumerate(value):
                key = json.dumps(entry, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    keep.append(i)
        for value in index_fields.values():
            keep.append(value[0])
        for key, value in values.items():  # a repeating pattern (["recurrent", "recurrent", "attention"])
            if isinstance(value, list) and 2 < len(value) < old_layers and re.search(r"types|pattern", key):
                keep += range(len(value))
        keep = sorted(set(keep))[:4]
        while len(keep) < min(2, old_layers):
            keep = sorted({*keep, next(i for i in range(old_layers) if i not in keep)})
        layers = len(keep)
        for key in LAYER_KEYS:
            if _is_int(values.get(key)) and values[key] > layers:
                out[key] = layers
        for key, value in per_layer.items():
            picked = [value[i] for i in keep]
            out[key] = "".join(picked) if isinstance(value, str) else type(value)(picked)
        for key, value in index_fields.items():
            out[key] = [keep.index(i) for i in value if i in keep]
    # special token ids beyond the shrunk vocabulary move to its end
    if "vocab_size" in out:
        moved: dict[int, int] = {}
        for key, value in values.items():
            if key.endswith(("_token_id", "_token_index")) and _is_int(value) and value >= VOCAB:
                out[key] = moved.setdefault(value, VOCAB - 1 - len(moved))
            elif (
                key.endswith("_token_id") and isinstance(value, list) and any(_is_int(v) and v >= VOCAB for v in value)
            ):
                out[key] = [moved.setdefault(v, VOCAB - 1 - len(moved)) if v >= VOCAB else v for v in value]
    # nested configs (text_config, vision_config, encoder, decoder, ...)
    for key, value in values.items():
        if isinstance(value, PreTrainedConfig) and not key.startswith("_"):
            sub = shrink_overrides(value, hidden_sizes=hidden_sizes)
            sub["model_type"] = value.model_type
            out[key] = sub
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_config(model_type: str, task: str = "CAUSAL_LM") -> Any:
    """The default config of ``model_type``, rebuilt tiny."""
    from transformers import CONFIG_MAPPING, AutoConfig

    default = AutoConfig.for_model(model_type, **DEFAULT_FIXUPS.get(model_type, {}))
    overrides = _merge(shrink_overrides(default, causal=task == "CAUSAL_LM"), FIXUPS.get(model_type, {}))
    if model_type == "encoder-decoder" and not isinstance(overrides.get("encoder"), dict):
        bert = shrink_overrides(CONFIG_MAPPING["bert"]())
        overrides["encoder"] = {**bert, "model_type": "bert"}
        overrides["decoder"] = {**bert, "model_type": "bert", "is_decoder": True, "add_cross_attention": True}
    return type(default)(**overrides)


# --- one model, in a worker -----------------------------------------------------------------------------------------


def _short(path: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _describe(error: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(error.__traceback__)
    inner = frames[-1] if frames else None
    plugin = next((f for f in reversed(frames) if "peft_prefix_plus" in f.filename), None)
    # the innermost frame outside torch's module machinery: where the failing call is made
    call = next((f for f in reversed(frames) if "/torch/" not in f.filename), None)
    lines = str(error).strip().splitlines()
    cause = error.__cause__
    cause_lines = str(cause).strip().splitlines() if cause is not None else []
    return {
        "error_type": f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins."),
        "message": lines[0] if lines else "",
        "cause": f"{type(cause).__name__}: {cause_lines[0] if cause_lines else ''}" if cause is not None else None,
        "frame": f"{_short(inner.filename)}:{inner.lineno} ({inner.name})" if inner else None,
        "plugin_frame": f"{_short(plugin.filename)}:{plugin.lineno} ({plugin.name})" if plugin else None,
        "call_frame": f"{_short(call.filename)}:{call.lineno} ({call.name})" if call else None,
        "traceback": [f"{_short(f.filename)}:{f.lineno} ({f.name})" for f in frames[-12:]],
    }


def _logits(output: Any) -> Any:
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    return logits


def _build(auto: Any, config: Any, attn_implementation: str) -> Any:
    """``auto.from_config``, given the sub-config the mapped class takes where the mapping names a composite config
    (``musicgen`` maps to `MusicgenForCausalLM`, which takes the decoder's config)."""
    model_class = auto._model_mapping[type(config)]
    config_class = getattr(model_class, "config_class", None)
    if config_class is not None and not isinstance(config, config_class):
        config = next((v for v in vars(config).values() if isinstance(v, config_class)), config)
    return model_class._from_config(config, attn_implementation=attn_implementation)


def run_one(model_type: str, task: str, send: Any) -> dict[str, Any]:
    """Build, wrap and run one tiny model; ``send(phase)`` tells the parent which timeout applies."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from peft_prefix_plus import PrefixPlusConfig
    from peft_prefix_plus.errors import PrefixPlusError

    result: dict[str, Any] = {}
    auto = AutoModelForCausalLM if task == "CAUSAL_LM" else AutoModelForSeq2SeqLM
    try:
        torch.manual_seed(0)
        config = tiny_config(model_type, task)
        result["config_class"] = type(config).__name__
        try:
            model = _build(auto, config, "sdpa")
            result["attn_implementation"] = "sdpa"
        except (ValueError, ImportError) as error:
            if "sdpa" not in str(error).lower() and "scaled_dot_product" not in str(error):
                raise
            model = _build(auto, tiny_config(model_type, task), "eager")
            result["attn_implementation"] = "eager"
        model.eval()
        result["model_class"] = type(model).__name__
        result["parameters"] = sum(p.numel() for p in model.parameters())
    except Exception as error:  # noqa: BLE001 - every failure is a finding
        return {**result, "status": NOT_TINY, "reason": "build failed", **_describe(error)}

    send("built")
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size
    special = {v for k, v in vars(cfg).items() if k.endswith(("_token_id", "_token_index")) and _is_int(v)}
    choices = [i for i in range(3, min(int(vocab or VOCAB), VOCAB)) if i not in special]
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.tensor([choices])[:, torch.randint(len(choices), (6,), generator=generator)]}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4].clone()
    try:
        with torch.no_grad():
            base = _logits(model(**inputs)).detach().clone()
    except Exception as error:  # noqa: BLE001
        return {**result, "status": NOT_TINY, "reason": "base forward on input_ids failed", **_describe(error)}

    send("wrapping")
    try:
        peft_model = get_peft_model(model, PrefixPlusConfig(task_type=task, num_virtual_tokens=4))
        peft_model.eval()
        with torch.no_grad():
            wrapped = _logits(peft_model(**inputs))
            with peft_model.disable_adapter():
                disabled = _logits(peft_model(**inputs))
    except PrefixPlusError as error:
        return {**result, "status": REFUSED, **_describe(error)}
    except Exception as error:  # noqa: BLE001
        return {**result, "status": RAW, **_describe(error)}
    diff = (wrapped.float() - base.float()).abs().max().item() if wrapped.shape == base.shape else float("inf")
    result["max_logit_change"] = diff
    result["disabled_matches_base"] = disabled.shape == base.shape and torch.allclose(disabled, base, atol=1e-5)
    if not torch.isfinite(wrapped).all():
        return {**result, "status": NO_EFFECT, "reason": "wrapped logits are not finite"}
    if wrapped.shape != base.shape:
        return {**result, "status": NO_EFFECT, "reason": f"logits shape {tuple(wrapped.shape)} != {tuple(base.shape)}"}
    if diff <= 1e-6:
        return {**result, "status": NO_EFFECT, "reason": "the prefix does not change the logits"}
    return {**result, "status": WORKS}


def worker(conn: Any) -> None:
    """Worker process: run jobs from ``conn`` until it sends ``None``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    import peft  # noqa: F401

    import peft_prefix_plus  # noqa: F401 - registers PREFIX_PLUS

    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        model_type, task = job
        start = time.perf_counter()
        try:
            result = run_one(model_type, task, lambda phase: conn.send(("phase", phase)))
        except BaseException as error:  # noqa: BLE001 - report, keep the worker alive
            result = {"status": RAW, "reason": "sweep error", **_describe(error)}
        result["seconds"] = round(time.perf_counter() - start, 2)
        conn.send(("result", result))


# --- the sweep ------------------------------------------------------------------------------------------------------


class Slot:
    """One worker process and the job it runs."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.start()

    def start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.job: tuple[str, str] | None = None
        self.phase = "starting"
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        self.started = time.monotonic()

    def restart(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        self.start()

    def submit(self, job: tuple[str, str]) -> None:
        self.job, self.phase, self.started = job, "building", time.monotonic()
        self.deadline = self.started + BUILD_TIMEOUT_S
        self.conn.send(job)


def label(model_type: str, task: str, both: set[str]) -> str:
    return f"{model_type}:{TASKS[task]}" if model_type in both else model_type


def list_jobs(only: list[str] | None) -> tuple[list[tuple[str, str]], set[str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    both = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    jobs = [(t, "CAUSAL_LM") for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    jobs += [(t, "SEQ_2_SEQ_LM") for t in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES]
    if only:
        wanted = set(only)
        jobs = [(t, task) for t, task in jobs if t in wanted or f"{t}:{TASKS[task]}" in wanted]
        unknown = wanted - {t for t, _ in jobs} - {f"{t}:{TASKS[task]}" for t, task in jobs}
        if unknown:
            sys.exit(f"unknown model types: {sorted(unknown)}")
    return jobs, both


def sweep(jobs: list[tuple[str, str]], both: set[str], workers: int) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    pending = list(jobs)
    slots = [Slot(ctx) for _ in range(min(workers, len(jobs)))]
    results: list[dict[str, Any]] = []

    def finish(slot: Slot, result: dict[str, Any]) -> None:
        model_type, task = slot.job
        result = {"label": label(model_type, task, both), "model_type": model_type, "task": task, **result}
        results.append(result)
        detail = result.get("reason") or result.get("message") or ""
        print(f"[{len(results)}/{len(jobs)}] {result['label']}: {result['status']} {detail[:100]}", flush=True)
        slot.job = None

    def fail(slot: Slot, why: str) -> None:
        if slot.job is not None:
            building = slot.phase == "building"
            seconds = round(time.monotonic() - slot.started, 1)
            result = {"status": NOT_TINY if building else RAW, "seconds": seconds}
            if building:
                result["reason"] = f"build {why} after {seconds} s"
            else:
                result.update(error_type=f"Hang ({why})", message=f"{why} during {slot.phase}", frame=None)
            finish(slot, result)
        slot.restart()

    while pending or any(s.job for s in slots):
        for slot in slots:
            if slot.ready and slot.job is None and pending:
                slot.submit(pending.pop(0))
        busy = [s for s in slots if s.job is not None or not s.ready]
        if not busy:
            break
        timeout = max(0.0, min(s.deadline for s in busy) - time.monotonic())
        ready_conns = wait([s.conn for s in busy], timeout=timeout)
        for slot in busy:
            if slot.conn in ready_conns:
                try:
                    kind, payload = slot.conn.recv()
                except (EOFError, OSError):
                    fail(slot, f"worker died (exit code {slot.proc.exitcode})")
                    continue
                if kind == "ready":
                    slot.ready = True
                elif kind == "phase":
                    slot.phase = payload
                    slot.deadline = time.monotonic() + RUN_TIMEOUT_S
                elif kind == "result":
                    finish(slot, payload)
            elif time.monotonic() >= slot.deadline:
                fail(slot, "timed out")
    for slot in slots:
        if slot.proc.is_alive():
            slot.conn.send(None)
            slot.proc.join(5)
            if slot.proc.is_alive():
                slot.proc.kill()
    order = {job: i for i, job in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r["model_type"], r["task"])])


PROBE_FAILED = "PrefixPlus could not run its probe forward pass"


def _group_key(result: dict[str, Any]) -> str:
    """What groups results by error: the message with names and numbers left out (for a refused probe pass, the
    error of the pass)."""
    message = result.get("message") or result.get("reason", "")
    if message.startswith(PROBE_FAILED) and result.get("cause"):
        message = f"{PROBE_FAILED}: {result['cause']}"
    message = re.sub(r"(type |fit |=)'[^']*'", r"\1'*'", message)
    message = re.sub(r"\b[A-Z]\w*(ForCausalLM|ForConditionalGeneration|Model\w*|Attention\w*)\b", "*", message)
    return f"{result.get('error_type', '')}: {re.sub(r'[0-9]+', '#', message)[:200]}"


def summarise(results: list[dict[str, Any]]) -> str:
    lines = ["", "=== summary ==="]
    counts = {s: [r for r in results if r["status"] == s] for s in STATUSES}
    lines.append(f"{'tried':<24}{len(results):>5}")
    for status in STATUSES:
        lines.append(f"{status:<24}{len(counts[status]):>5}")
    for status in STATUSES:
        lines.append(f"\n--- {status} ({len(counts[status])}) ---")
        lines.append(", ".join(r["label"] for r in counts[status]) or "(none)")
    odd = [r["label"] for r in results if r.get("disabled_matches_base") is False]
    if odd:
        lines.append(f"\n--- `disable_adapter()` does not give the base logits back: {', '.join(odd)}")
    for status in (RAW, REFUSED, NO_EFFECT, NOT_TINY):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in counts[status]:
            groups[_group_key(r)].append(r)
        if not groups:
            continue
        lines.append(f"\n=== {status}, grouped by error ===")
        for key, rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            frames = sorted({r.get("frame") or "-" for r in rows})
            calls = sorted(
                {r.get("call_frame") for r in rows if r.get("call_frame") and r.get("call_frame") not in frames}
            )
            plugin = sorted({r.get("plugin_frame") for r in rows if r.get("plugin_frame")})
            lines.append(f"\n[{len(rows)}] {key}")
            lines.append(f"    at: {'; '.join(frames[:3])}" + (" ..." if len(frames) > 3 else ""))
            if calls:
                lines.append(f"    called from: {'; '.join(calls[:3])}" + (" ..." if len(calls) > 3 else ""))
            if plugin:
                lines.append(f"    plugin frame: {'; '.join(plugin[:3])}")
            lines.append(f"    types: {', '.join(r['label'] for r in rows)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="TYPE", help="model types (or TYPE:causal / TYPE:seq2seq)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs, both = list_jobs(args.only)
    start = time.perf_counter()
    results = sweep(jobs, both, max(1, args.workers))
    print(summarise(results))
    print(f"\n{len(results)} models in {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
