"""Every KV-cache path equals recomputation without a cache: static (pre-allocated) caches, sliding windows and
assisted generation, where transformers may pass ``attention_mask=None`` although keys outnumber queries."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, tiny_model
from peft import get_peft_model

from peft_prefix_plus import PrefixPlusConfig

GQA_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def base_model(family: str, attn: str, **overrides) -> tuple[transformers.PreTrainedModel, str]:
    """A tiny model of a tested family, or of Mistral/Qwen2 (which have sliding-window attention)."""
    if family in ("mistral", "qwen2"):
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(family, attn_implementation=attn, **(GQA_SIZES | overrides))
        return transformers.AutoModelForCausalLM.from_config(config), "CAUSAL_LM"
    return tiny_model(family, attn)


def adapted(family: str, attn: str, **overrides):
    base, task = base_model(family, attn, **overrides)
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=3)
    if task == "SEQ_2_SEQ_LM":
        config = PrefixPlusConfig(
            task_type=task, num_virtual_tokens=3, encoder_num_virtual_tokens=2, cross_num_virtual_tokens=4
        )
    return get_peft_model(base, config).eval()


def prompt(batch: int, length: int, padded: bool) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        input_ids[-1, :2] = 0
        attention_mask[-1, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate(model, inputs: dict, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
    )


def assert_same_generation(cached, recomputed) -> None:
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, recomputed.logits, strict=True)):
        assert (a - b).abs().max().item() < 1e-4, f"logits differ at step {step}"


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "mistral", "qwen2", "t5", "bart"])
def test_static_cache_equals_recomputation(family, attn, padded):
    """A static cache hands sdpa no mask and keys for every pre-allocated slot; no prompt token may see an empty slot."""
    model = adapted(family, attn)
    inputs = prompt(2, 7, padded)
    with torch.no_grad():
        static = generate(model, inputs, cache_implementation="static")
        recomputed = generate(model, inputs, use_cache=False)
        with model.disable_adapter():
            base = generate(model, inputs, use_cache=False)
    assert_same_generation(static, recomputed)
    assert not torch.allclose(static.logits[0], base.logits[0]), "the prefix must change the output"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_caches_equal_recomputation(family, attn, cache):
    """A window shorter than the prompt: the cache paths mask the old tokens exactly as recomputation does."""
    overrides = {"sliding_window": 4}
    if family == "qwen2":
        overrides |= {"use_sliding_window": True, "max_window_layers": 0}
    model = adapted(family, attn, **overrides)
    inputs = prompt(2, 9, padded=True)
    with torch.no_grad():
        assert_same_generation(
            generate(model, inputs, cache_implementation=cache), generate(model, inputs, use_cache=False)
        )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_assisted_generation_equals_recomputation(attn):
    """Assisted generation verifies several candidate tokens per call over a non-empty cache, with no mask."""
    model = adapted("llama", attn)
    assistant, _ = tiny_model("llama", attn, seed=5)
    inputs = prompt(1, 9, padded=False)
    with torch.no_grad():
        assisted = model.generate(**inputs, max_new_tokens=8, do_sample=False, assistant_model=assistant)
        recomputed = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(assisted, recomputed)
