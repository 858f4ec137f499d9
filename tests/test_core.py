"""Core behaviour of PrefixPlus.

First one checklist, run over the matrix families × {eager, sdpa} × {MLP, raw, two active adapters}: save/load gives
the same logits, cached generation equals recomputation, disabling equals the base model, `merge_mlp` leaves the
outputs unchanged and `unload()` restores every config of the model. Then the behaviour beyond the checklist.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import (
    FAMILIES,
    FAMILY_SPECS,
    all_configs,
    batch_for,
    forward_logits,
    frozen_copy,
    site_kwargs,
    tiny_model,
    uses_attention_interface,
)
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from peft_prefix_plus import PrefixPlusConfig, attention

IMPLEMENTATIONS = ["eager", "sdpa"]
VARIANTS = ["mlp", "raw", "two"]
GENERATIVE = [family for family in FAMILIES if FAMILY_SPECS[family][3] != "SEQ_CLS"]

#: Cells of the matrix that fail today, as (family, implementation, variant) -> the precise failure.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}
#: Two classification heads cannot be active at once: PEFT's ModulesToSaveWrapper allows one active adapter.
TWO_HEADS = (
    "peft 0.21.2: ModulesToSaveWrapper refuses several active adapters ('Only one adapter can be set at a time'), "
    "so two adapters that each carry a classification head cannot be active together (LoRA alike)"
)


def matrix(families: list[str] = FAMILIES):
    """Parametrise a checklist item over families × implementations × variants."""
    cells = []
    for family in families:
        for attn in IMPLEMENTATIONS:
            for variant in VARIANTS:
                marks = []
                if variant == "two" and FAMILY_SPECS[family][3] == "SEQ_CLS":
                    marks.append(pytest.mark.xfail(strict=True, raises=ValueError, reason=TWO_HEADS))
                if (family, attn, variant) in KNOWN_FAILURES:
                    marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[family, attn, variant]))
                cells.append(pytest.param(family, attn, variant, id=f"{family}-{attn}-{variant}", marks=marks))
    return pytest.mark.parametrize(("family", "attn", "variant"), cells)


def adapted(family: str, attn: str, variant: str):
    """The adapted model of one matrix cell (in eval mode), a frozen copy of its base model, and its task type.

    ``mlp``: one adapter with a 2-layer MLP; ``raw``: one adapter of raw prefixes; ``two``: both of those, of
    different lengths, active at once (their prefixes are concatenated at every site).
    """
    base, task = tiny_model(family, attn)
    reference = frozen_copy(base)
    config = PrefixPlusConfig(
        task_type=task, num_virtual_tokens=3, mlp_depth=2, prefix_projection=variant != "raw", **site_kwargs(task)
    )
    model = get_peft_model(base, config)
    if variant == "two":
        model.add_adapter("other", PrefixPlusConfig(task_type=task, num_virtual_tokens=2, prefix_projection=False))
        model.base_model.set_adapter(["default", "other"])
    return model.eval(), reference, task


def active_names(variant: str) -> list[str]:
    return ["default", "other"] if variant == "two" else ["default"]


@matrix()
def test_save_and_load_give_the_same_logits(family, attn, variant, tmp_path):
    model, reference, task = adapted(family, attn, variant)
    batch = batch_for(task)
    expected = forward_logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path)
    if variant == "two":
        loaded.load_adapter(tmp_path / "other", adapter_name="other")
        loaded.base_model.set_adapter(["default", "other"])
    assert loaded.base_model.active_adapters == active_names(variant)
    assert torch.equal(forward_logits(loaded.eval(), batch), expected)


@matrix(GENERATIVE)
def test_cached_generation_equals_recomputation(family, attn, variant, monkeypatch):
    decode_steps = []
    decode = attention._decode_attention
    monkeypatch.setattr(attention, "_decode_attention", lambda *a, **k: decode_steps.append(1) or decode(*a, **k))
    model, _, task = adapted(family, attn, variant)
    batch = batch_for(task, batch_size=3, seq_len=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    scored = {"output_scores": True, "return_dict_in_generate": True, **kwargs}
    recomputed = model.generate(**inputs, use_cache=False, **scored)
    decode_steps.clear()  # (an encoder-decoder's first step has one query without a cache)
    seeded = model.generate(**inputs, **scored)
    # the prefix went into the cache and each step was one attention call; T5 (its position bias is sized from the
    # cached keys) attends the prefix beside the cache
    assert bool(decode_steps) == (family == "t5")
    model.base_model.seeds_kv_cache = False
    beside = model.generate(**inputs, **scored)
    assert decode_steps  # the decoding branch (one query over prefix and cache) ran, under eager and sdpa
    for cached in (seeded, beside):
        assert torch.equal(cached.sequences, recomputed.sequences)
        torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), rtol=1e-4, atol=1e-5)


@matrix()
def test_disable_equals_the_base_model(family, attn, variant):
    model, reference, task = adapted(family, attn, variant)
    batch = batch_for(task)
    base_logits = forward_logits(reference, batch)
    adapted_logits = forward_logits(model, batch)
    # the adapter changes the outputs (BERT's initialisation makes its logits small, hence a relative measure)
    assert (adapted_logits - base_logits).abs().max() > 1e-3 * base_logits.abs().max()
    with model.disable_adapter():
        assert torch.equal(forward_logits(model, batch), base_logits)
    assert torch.equal(forward_logits(model, batch), adapted_logits)  # enabled again afterwards


@matrix()
def test_merge_mlp_leaves_the_outputs_unchanged(family, attn, variant):
    model, _, task = adapted(family, attn, variant)
    batch = batch_for(task)
    before = forward_logits(model, batch)
    if variant == "mlp":
        merged = model.merge_mlp()
    else:  # raw adapters are skipped with a warning
        with pytest.warns(UserWarning, match="already holds raw prefixes"):
            merged = model.merge_mlp()
    assert merged == ([] if variant == "raw" else ["default"])
    layer = model.base_model.model.prefix_plus_layer
    for name in active_names(variant):
        assert not any(encoder.is_projected for encoder in layer.prefix_plus_sites[name].values())
    assert model.base_model.active_adapters == active_names(variant)
    torch.testing.assert_close(forward_logits(model, batch), before, rtol=0, atol=1e-5)


@matrix()
def test_unload_restores_every_config(family, attn, variant):
    model, reference, task = adapted(family, attn, variant)
    batch = batch_for(task)
    forward_logits(model, batch)
    unloaded = model.unload()
    configs = all_configs(unloaded)
    if family == "t5":  # T5's encoder and decoder hold their own copies of the config
        assert len(configs) == 3
    assert [c._attn_implementation for c in configs] == [attn] * len(configs)
    for module in unloaded.modules():
        assert not any("prefix_plus" in attr for attr in vars(module)), type(module).__name__
        assert not module._forward_pre_hooks and not module._forward_hooks, type(module).__name__
    assert not any("prefix_plus" in name for name, _ in unloaded.named_parameters())
    assert type(unloaded) is type(reference)
    assert [type(m) for m in unloaded.modules()] == [type(m) for m in reference.modules()]
    assert torch.equal(forward_logits(unloaded.eval(), batch), forward_logits(reference, batch))
    # the unloaded model can be adapted again
    again = get_peft_model(unloaded, PrefixPlusConfig(task_type=task, num_virtual_tokens=2))
    assert forward_logits(again.eval(), batch).shape == forward_logits(reference, batch).shape


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", GENERATIVE)
def test_two_active_adapters_both_apply(family, attn):
    """Several active adapters put their prefixes one after the other: the output is neither adapter's alone."""
    model, _, task = adapted(family, attn, "two")
    batch = batch_for(task)
    layer = model.base_model.model.prefix_plus_layer
    both = forward_logits(model, batch)
    assert layer.active_length("self") == 3 + 2
    for name in ("default", "other"):
        model.base_model.set_adapter(name)
        assert not torch.allclose(forward_logits(model, batch), both)


def test_tiny_model_applies_its_overrides():
    model, _ = tiny_model("llama", num_hidden_layers=3, hidden_size=48)
    assert len(model.model.layers) == 3 and model.config.hidden_size == 48


def expected_site_parameters(config: PrefixPlusConfig, layers: int, heads: int, head_dim: int, length: int) -> int:
    """Parameter count of one site, as documented in the README."""
    out = layers * 2 * heads * head_dim
    if not config.prefix_projection:
        return length * out
    width, token_dim = config.mlp_hidden_size or config.token_dim, config.token_dim
    hidden = token_dim * width + width + (config.mlp_depth - 1) * (width * width + width)
    return length * token_dim + hidden + width * out + out


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_adapter_trains_and_every_site_gets_gradients(family, attn):
    base, task = tiny_model(family, attn)
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=3, mlp_depth=2, **site_kwargs(task))
    model = get_peft_model(base, config)

    # only adapter parameters are trainable (and, for classification, the head's copy), and PEFT counts exactly them
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prefixes = {n: p for n, p in trainable.items() if ".prefix_plus_sites.default." in n}
    heads = {n: p for n, p in trainable.items() if ".modules_to_save.default." in n}
    assert prefixes and prefixes.keys() | heads.keys() == trainable.keys()
    assert bool(heads) == (task == "SEQ_CLS")
    lengths = config.site_lengths(base.config.is_encoder_decoder)
    expected = sum(
        expected_site_parameters(
            config, shape["num_layers"], shape["num_key_value_heads"], shape["head_dim"], lengths[site]
        )
        for site, shape in config.site_shapes.items()
    )
    assert sum(p.numel() for p in prefixes.values()) == expected
    assert model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable.values())

    # after one backward pass every site has non-zero gradients and the base model none
    model.train()
    model(**batch_for(task)).loss.backward()
    sites_with_grad = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            if name in prefixes:
                sites_with_grad.add(name.split(".prefix_plus_sites.default.")[1].split(".")[0])
        else:
            assert param.grad is None, name
    assert sites_with_grad == set(config.site_shapes)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_sites(family):
    base, task = tiny_model(family)
    batch = batch_for(task)
    encoder_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_encoded = frozen_copy(base).get_encoder()(**encoder_inputs).last_hidden_state

    model = get_peft_model(copy.deepcopy(base), PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    with torch.no_grad():
        encoded = model.get_encoder()(**encoder_inputs).last_hidden_state
    assert (encoded - base_encoded).abs().max() > 1e-4

    sites = model.base_model.prefix_plus_layer.prefix_plus_sites["default"]
    assert set(sites) == {"self", "encoder", "cross"}
    self_params = {id(p) for p in sites["self"].parameters()}
    assert not self_params & {id(p) for p in sites["cross"].parameters()}

    # a site of length 0 has no parameters and no effect
    no_cross = get_peft_model(
        copy.deepcopy(base), PrefixPlusConfig(task_type=task, num_virtual_tokens=3, cross_num_virtual_tokens=0)
    )
    no_cross_sites = no_cross.base_model.prefix_plus_layer.prefix_plus_sites["default"]
    assert set(no_cross_sites) == {"self", "encoder"}
    assert not any(".cross." in n for n, _ in no_cross.named_parameters())


# Stock PEFT behaviour that PrefixPlus improves on. These test upstream, so they are strict xfails: when PEFT fixes
# them, the suite says so, and the README's comparison needs updating.
@pytest.mark.xfail(
    strict=True,
    reason="peft 0.21.2: prefix tuning passes its prefix as past_key_values, which an encoder never reads",
)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_stock_prefix_tuning_reaches_the_encoder(family):
    base, task = tiny_model(family)
    batch = batch_for(task)
    encoder_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_encoded = frozen_copy(base).get_encoder()(**encoder_inputs).last_hidden_state
    stock = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=3)).eval()
    with torch.no_grad():
        assert not torch.equal(stock.get_encoder()(**encoder_inputs).last_hidden_state, base_encoded)


@pytest.mark.xfail(
    strict=True,
    raises=(ValueError, RuntimeError),
    reason="peft 0.21.2 + transformers 5: with gradient checkpointing transformers drops the cache that carries "
    "stock PEFT's prefix, and the forward pass fails",
)
def test_stock_prefix_tuning_trains_with_gradient_checkpointing():
    base, task = tiny_model("llama")
    stock = get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=3)).train()
    stock.gradient_checkpointing_enable()
    stock(**batch_for(task)).loss.backward()


def test_prefixes_are_computed_once_per_forward_pass():
    base, task = tiny_model("t5")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3, mlp_depth=2))
    calls = {}
    for site, encoder in model.base_model.prefix_plus_layer.prefix_plus_sites["default"].items():
        encoder.mlp.register_forward_hook(lambda *_, site=site: calls.__setitem__(site, calls.get(site, 0) + 1))
    model(**batch_for(task, batch_size=4))
    assert calls == {"self": 1, "encoder": 1, "cross": 1}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_configurable_mlp_counts_and_trains(depth):
    base, task = tiny_model("llama")
    config = PrefixPlusConfig(
        task_type=task, num_virtual_tokens=4, mlp_depth=depth, mlp_hidden_size=24, mlp_activation="gelu"
    )
    model = get_peft_model(base, config)
    shape = config.site_shapes["self"]
    expected = expected_site_parameters(
        config, shape["num_layers"], shape["num_key_value_heads"], shape["head_dim"], 4
    )
    assert model.get_nb_trainable_parameters()[0] == expected
    mlp = model.base_model.prefix_plus_layer.prefix_plus_sites["default"]["self"].mlp
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp) == depth + 1
    assert type(mlp[1]).__name__ == "GELUActivation"

    batch = batch_for(task, batch_size=4, left_pad=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_raw_prefixes_without_projection():
    base, task = tiny_model("llama")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=4, prefix_projection=False))
    encoder = model.base_model.prefix_plus_layer.prefix_plus_sites["default"]["self"]
    assert not encoder.is_projected
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.prefix_plus_layer.prefix_plus_sites.default.self.prefix"
    ]
    assert encoder.prefix.shape == (2, 2, 2, 4, 8)  # layers, key/value, kv heads, length, head_dim


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_gradient_checkpointing_matches(family):
    def run(checkpointing, reentrant=False):
        base, task = tiny_model(family)
        model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3, mlp_depth=2))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        loss = model(**batch_for(task)).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run(False)
    for reentrant in (False, True):
        loss_ckpt, grads_ckpt = run(True, reentrant)
        torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
        assert grads_ckpt.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", GENERATIVE)
def test_generation_strategies(family):
    base, task = tiny_model(family)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3, **site_kwargs(task))).eval()
    batch = batch_for(task, batch_size=3, seq_len=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    common = {"max_new_tokens": 6, "pad_token_id": 0, "eos_token_id": None}
    scored = {"do_sample": False, "output_scores": True, "return_dict_in_generate": True, **common}
    greedy = model.generate(**inputs, **scored)
    with model.disable_adapter():
        base_scores = torch.stack(model.generate(**inputs, **scored).scores)
    assert not torch.allclose(base_scores, torch.stack(greedy.scores))  # the prefix steers generation
    beams = model.generate(**inputs, num_beams=3, num_return_sequences=2, **common)
    sampled = model.generate(**inputs, do_sample=True, top_k=5, **common)
    new_tokens = 6 if not base.config.is_encoder_decoder else 6 + 1
    assert beams.shape[0] == 6 and sampled.shape[0] == 3
    assert greedy.sequences.shape[1] == (5 + new_tokens if not base.config.is_encoder_decoder else new_tokens)


#: Families with their own attention code in some supported transformers version, with tiny sizes.
OWN_ATTENTION_CANDIDATES = {
    "bloom": (transformers.BloomForCausalLM, {"n_layer": 2, "n_head": 4}),
    "gpt_neo": (
        transformers.GPTNeoForCausalLM,
        {"num_layers": 2, "num_heads": 4, "attention_types": [[["global"], 2]]},
    ),
    "falcon": (transformers.FalconForCausalLM, {"num_hidden_layers": 2, "num_attention_heads": 4}),
}


@pytest.mark.parametrize("model_type", list(OWN_ATTENTION_CANDIDATES))
def test_a_family_is_refused_exactly_when_its_attention_bypasses_the_interface(model_type):
    """The installed transformers' modeling source decides: refused with a clear error, or adapted and steered."""
    model_cls, sizes = OWN_ATTENTION_CANDIDATES[model_type]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, **sizes)
    base = transformers.AutoModelForCausalLM.from_config(config)
    config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    if not uses_attention_interface(model_cls):
        with pytest.raises(ValueError, match=rf"'{model_type}'.*AttentionInterface.*Supported"):
            get_peft_model(base, config)
        assert base.config._attn_implementation in ("eager", "sdpa")  # refused before anything changed
        return
    reference = frozen_copy(base)
    input_ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_some_family_is_refused_in_the_installed_transformers():
    """The refusal path above is exercised in every supported version: some candidate bypasses the interface."""
    assert any(not uses_attention_interface(cls) for cls, _ in OWN_ATTENTION_CANDIDATES.values())


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma", "roberta"])
def test_other_families_need_no_special_code(model_type):
    """Families beyond the tested table work as long as their attention goes through the AttentionInterface."""
    sizes = {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    if model_type != "roberta":  # grouped-query attention
        sizes |= {"num_key_value_heads": 2, "head_dim": 8}
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    if model_type == "roberta":
        base, task = transformers.AutoModelForSequenceClassification.from_config(config), "SEQ_CLS"
    else:
        base, task = transformers.AutoModelForCausalLM.from_config(config), "CAUSAL_LM"
    reference = frozen_copy(base)
    input_ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        assert not torch.allclose(model(input_ids=input_ids).logits, expected)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=input_ids).logits, expected)


def test_prefixes_are_computed_once_per_generate_call():
    base, task = tiny_model("llama")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    calls = []
    model.base_model.prefix_plus_layer.prefix_plus_sites["default"]["self"].mlp.register_forward_hook(
        lambda *_: calls.append(1)
    )
    batch = batch_for(task)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    first = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert len(calls) == 1  # one MLP run for the prefill and all decoding steps
    with model.disable_adapter():
        plain = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert not torch.equal(plain, first)
    again = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(again, first) and len(calls) == 2  # a new generate call computes them afresh


def test_prefix_dropout_applies_in_training_only():
    base, task = tiny_model("llama")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=4, prefix_dropout=0.5))
    batch = batch_for(task)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        first = forward_logits(model, batch)
        second = forward_logits(model, batch)
        assert not torch.equal(first, second)
        model.eval()
        assert torch.equal(forward_logits(model, batch), forward_logits(model, batch))


@pytest.mark.parametrize("projection", [True, False])
def test_zero_init_gives_zero_prefixes(projection):
    base, task = tiny_model("t5")
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=3, prefix_projection=projection, init_weights="zero")
    model = get_peft_model(base, config)
    for encoder in model.base_model.prefix_plus_layer.prefix_plus_sites["default"].values():
        assert torch.count_nonzero(encoder.project()) == 0


@pytest.mark.parametrize(("family", "expected"), [("llama", 1), ("t5", 3)])
def test_attention_mask_is_extended_once_per_forward_pass(family, expected, monkeypatch):
    calls = []
    extend = attention._extend_mask
    monkeypatch.setattr(attention, "_extend_mask", lambda *a, **k: calls.append(1) or extend(*a, **k))
    base, task = tiny_model(family)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3))
    model(**batch_for(task))
    assert len(calls) == expected  # one per distinct mask (T5: encoder, decoder self, cross), not one per layer
