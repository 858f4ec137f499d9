"""Generation with the prefix seeded into the KV cache gives the tokens of the prefix attended beside the cache, and
of recomputation without a cache: every strategy, family, site and adapter setup users generate with."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import batch_for, returned_cache, site_kwargs, tiny_model
from peft import get_peft_model
from transformers import DynamicCache

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.tuner import model as tuner_module
from peft_prefix_plus.tuner.kv_cache import PrefixedCacheLayer

STRATEGIES = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "top_k": 8},
    "beam": {"do_sample": False, "num_beams": 3},
    "beam-return-2": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
}
DECODER_ONLY = ["llama", "gpt2", "opt"]
#: unmerged MLP; merged into raw prefixes; two active adapters; position ids offset by the prefix (decoder-only)
SETUPS = ["unmerged", "merged", "two-active", "offset"]


def adapted(family: str, setup: str, attn: str = "sdpa"):
    base, task = tiny_model(family, attn)
    offset = setup == "offset"
    config = PrefixPlusConfig(
        task_type=task, num_virtual_tokens=3, mlp_depth=2, offset_position_ids=offset, **site_kwargs(task)
    )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():  # prefixes large enough to steer a random tiny model
        for param in model.base_model.prefix_plus_layer.parameters():
            param.mul_(4)
    if setup == "merged":
        model.merge_mlp()
    if setup == "two-active":
        other = PrefixPlusConfig(task_type=task, num_virtual_tokens=2, prefix_projection=False, **site_kwargs(task))
        model.add_adapter("other", other)
        model.base_model.set_adapter(["default", "other"])
    return model, task


def inputs_for(task: str) -> dict[str, torch.Tensor]:
    batch = batch_for(task, batch_size=3, seq_len=5)  # the last row is left-padded
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def generate(model, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated tokens and the scores of every step (informative even where a tiny model repeats a token)."""
    torch.manual_seed(0)  # the same draws for every path when sampling
    out = model.generate(
        **inputs,
        max_new_tokens=6,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.scores)


def assert_same_generation(first: tuple, second: tuple) -> None:
    assert torch.equal(first[0], second[0])
    torch.testing.assert_close(first[1], second[1], rtol=1e-4, atol=1e-5)


CASES = [
    pytest.param(family, setup, strategy, id=f"{family}-{setup}-{strategy}")
    for family in [*DECODER_ONLY, "t5", "bart"]
    for setup in SETUPS
    if not (setup == "offset" and family not in DECODER_ONLY)
    for strategy in STRATEGIES
]


@pytest.mark.parametrize(("family", "setup", "strategy"), CASES)
def test_seeded_cache_generates_the_same_tokens(family, setup, strategy, monkeypatch):
    seedings = []
    seed = tuner_module.seed_prefix_cache
    monkeypatch.setattr(tuner_module, "seed_prefix_cache", lambda *a, **k: seedings.append(1) or seed(*a, **k))
    model, task = adapted(family, setup)
    inputs = inputs_for(task)
    seeded = generate(model, inputs, **STRATEGIES[strategy])
    # the prefix went into the cache; T5 (position bias sized from the cached keys) puts it in front at every step
    assert bool(seedings) == (family != "t5")
    model.base_model.seeds_kv_cache = False
    seedings.clear()
    concatenated = generate(model, inputs, **STRATEGIES[strategy])
    assert not seedings
    recomputed = generate(model, inputs, use_cache=False, **STRATEGIES[strategy])
    assert_same_generation(seeded, concatenated)
    assert_same_generation(seeded, recomputed)
    with model.disable_adapter():  # the prefix steers
        assert not torch.allclose(generate(model, inputs, **STRATEGIES[strategy])[1], seeded[1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "bart"])
def test_seeded_layers_hold_the_prefix_in_front_and_report_real_lengths(family, attn):
    model, task = adapted(family, "unmerged", attn)
    inputs = inputs_for(task)
    out = model.generate(**inputs, max_new_tokens=4, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    cache = returned_cache(out)
    parts = [cache.self_attention_cache, cache.cross_attention_cache] if task == "SEQ_2_SEQ_LM" else [cache]
    lengths = [3, 5] if task == "SEQ_2_SEQ_LM" else [3]  # decoder self-attention, cross-attention
    real = [out.sequences.shape[1] - 1, inputs["input_ids"].shape[1]]
    for part, length, real_length in zip(parts, lengths, real[: len(parts)], strict=True):
        for layer in part.layers:
            assert isinstance(layer, PrefixedCacheLayer) and layer.prefix_length == length
            assert layer.keys.shape[-2] == length + real_length and layer.get_seq_length() == real_length
    with torch.no_grad():
        prefix_keys = model.base_model.prefix_plus_layer.prefix_plus_sites["default"]["self"]()[0, 0]  # layer 0
    torch.testing.assert_close(parts[0].layers[0].keys[:, :, :3], prefix_keys.expand(3, -1, -1, -1))


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_disable_adapter_inside_a_generate_loop(family):
    model, task = adapted(family, "unmerged")
    base, _ = tiny_model(family)
    inputs = inputs_for(task)
    first = generate(model, inputs)
    for _ in range(2):
        with model.disable_adapter():
            plain = generate(model, inputs)
        assert_same_generation(plain, generate(base.eval(), inputs))
        assert not torch.allclose(plain[1], first[1])
        assert_same_generation(generate(model, inputs), first)


def decode_by_hand(model, inputs: dict, steps: int, around_step=lambda step: contextlib.nullcontext()):
    """Greedy decoding with one cache, as a caller's own loop does; ``around_step(step)`` is entered around each
    step (to change the adapters between steps). Returns the cache and each step's logits."""
    cache, logits = DynamicCache(), []
    with torch.no_grad():
        out = model(**inputs, cache=cache, use_cache=True)
        mask = inputs["attention_mask"]
        for step in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            with around_step(step):
                out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits)
    return cache, torch.stack(logits)


def test_switching_adapters_while_decoding_with_one_cache():
    """A caller's own decoding loop keeps its cache while the adapters change: the prefix seeded at the first step
    is dropped from the keys, and the current one is attended beside the cache, as without seeding."""
    logits = {}
    for seeds in (True, False):
        model, task = adapted("llama", "unmerged")
        model.add_adapter("other", PrefixPlusConfig(task_type=task, num_virtual_tokens=4, prefix_projection=False))
        model.base_model.seeds_kv_cache = seeds

        def around_step(step: int, model=model):
            if step == 1:
                model.base_model.set_adapter("other")
            return model.disable_adapter() if step == 2 else contextlib.nullcontext()

        cache, logits[seeds] = decode_by_hand(model, inputs_for(task), 4, around_step)
        assert isinstance(cache.layers[0], PrefixedCacheLayer) == seeds
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-6)


def test_a_cache_used_before_is_not_seeded():
    """Only an empty cache gets the prefix; one that already holds tokens keeps the prefix beside it."""
    model, task = adapted("llama", "unmerged")
    inputs = inputs_for(task)
    cache = DynamicCache()
    with torch.no_grad(), model.disable_adapter():
        model(**inputs, cache=cache, use_cache=True)
    assert not isinstance(cache.layers[0], PrefixedCacheLayer)
    with torch.no_grad():
        cached = model(
            input_ids=inputs["input_ids"][:, -1:],
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones(3, 1, dtype=torch.long)], dim=1),
            cache=cache,
            use_cache=True,
        ).logits
    assert not isinstance(cache.layers[0], PrefixedCacheLayer) and torch.isfinite(cached).all()


def test_prefixed_cache_layer_crops_tokens_never_the_prefix():
    layer = PrefixedCacheLayer(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    keys, values = layer.update(torch.ones(3, 2, 5, 8), torch.ones(3, 2, 5, 8))
    assert keys.shape == (3, 2, 9, 8) and layer.get_seq_length() == 5 and layer.get_mask_sizes(1) == (6, 0)
    assert torch.equal(keys[:, :, :4], torch.zeros(3, 2, 4, 8))
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and layer.keys.shape[-2] == 7
    layer.crop(-10)  # more than the cached tokens: the prefix stays
    assert layer.get_seq_length() == 0 and layer.keys.shape[-2] == 4
    layer.reset()
    keys, _ = layer.update(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8))  # seeded again after a reset
    assert keys.shape == (1, 2, 6, 8) and layer.get_seq_length() == 2


def test_merging_the_mlp_while_decoding_with_one_cache():
    """`merge_mlp()` between two decoding steps of one cache: the steps after it attend the merged prefix (equal to
    the MLP's), not no prefix at all."""
    logits = {}
    for merge in (False, True):
        model, task = adapted("llama", "unmerged")

        def around_step(step: int, model=model, merge=merge):
            if merge and step == 1:
                model.merge_mlp()
            return contextlib.nullcontext()

        _, logits[merge] = decode_by_hand(model, inputs_for(task), 3, around_step)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-6)
