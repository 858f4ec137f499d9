"""Saving, loading, several adapters, parity with stock PEFT, dtypes and bad input."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import batch_for, site_kwargs, tiny_model
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    get_peft_model,
)

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.files import copy_stock_prefix

AUTO_CLASSES = {
    "CAUSAL_LM": AutoPeftModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoPeftModelForSeq2SeqLM,
    "SEQ_CLS": AutoPeftModelForSequenceClassification,
}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def adapter_state(model, adapter="default"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".prefix_plus_sites.{adapter}." in n}


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
def test_save_and_load_reproduce_logits(family, tmp_path):
    base, task = tiny_model(family)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    batch = batch_for(task)
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=3, mlp_depth=2, **site_kwargs(task))
    model = get_peft_model(copy.deepcopy(base), config).eval()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")

    files = sorted(os.listdir(tmp_path / "adapter"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    auto = AUTO_CLASSES[task].from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(auto, batch), expected, rtol=0, atol=0)


def test_is_trainable_continues_training_with_the_mlp(tmp_path):
    base, task = tiny_model("gpt2")
    batch = batch_for(task)
    model = get_peft_model(copy.deepcopy(base), PrefixPlusConfig(task_type=task, num_virtual_tokens=3, mlp_depth=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path)
    saved = adapter_state(model)

    frozen = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())

    resumed = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    state = adapter_state(resumed)
    assert state.keys() == saved.keys() and any(".mlp." in n for n in state)
    for name in saved:
        assert torch.equal(state[name], saved[name])
    trainable = [p for p in resumed.parameters() if p.requires_grad]
    assert len(trainable) == len(saved)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    resumed.train()
    resumed(**batch).loss.backward()
    optimizer.step()
    after = adapter_state(resumed)
    assert all(not torch.equal(after[n], saved[n]) for n in saved)  # MLP and embedding both moved


def test_multiple_adapters_behave_like_lora():
    base, task = tiny_model("llama")
    batch = batch_for(task)
    reference = copy.deepcopy(base).requires_grad_(False).eval()
    base_logits = logits(reference, batch)

    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    first = logits(model, batch)
    model.add_adapter("other", PrefixPlusConfig(task_type=task, num_virtual_tokens=5, mlp_depth=2))
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)  # adding does not activate

    model.set_adapter("other")
    second = logits(model, batch)
    assert not torch.allclose(second, first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".prefix_plus_sites.other." in n for n in trainable)

    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, batch), second, rtol=0, atol=0)

    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)

    with pytest.raises(ValueError, match="different peft types"):
        model.add_adapter("other_method", LoraConfig(task_type=task))


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parity_with_stock_peft(family, projection):
    base, task = tiny_model(family)
    stock_config = PrefixTuningConfig(
        task_type=task, num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=16
    )
    stock = get_peft_model(copy.deepcopy(base), stock_config).eval()
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=4, prefix_projection=False, offset_position_ids=True)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    copy_stock_prefix(stock, model)
    batch = batch_for(task, left_pad=False)
    torch.testing.assert_close(logits(model, batch), logits(stock, batch), rtol=0, atol=1e-5)

    # without the position offset (the PrefixPlus default) positions start at 0 and the outputs differ
    model.peft_config["default"].offset_position_ids = False
    assert not torch.allclose(logits(model, batch), logits(stock, batch), atol=1e-5)


def padded_and_alone(family: str):
    """A PrefixPlus model with offset positions, a batch whose second row is left-padded, and that row unpadded."""
    base, task = tiny_model(family)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=4, offset_position_ids=True))
    batch = batch_for(task)  # the last row has two padding tokens in front
    real = batch["attention_mask"][-1].bool()
    alone = {"input_ids": batch["input_ids"][-1:, real], "attention_mask": batch["attention_mask"][-1:, real]}
    return model.eval(), {key: batch[key] for key in ("input_ids", "attention_mask")}, real, alone


def test_offset_positions_of_a_padded_row_are_the_models_own_shifted():
    """OPT derives positions from the attention mask: a left-padded row, shifted by the prefix, equals the row alone
    (and a mixed batch's `"__base__"` row equals the base model, in test_mixed_batches)."""
    model, batch, real, alone = padded_and_alone("opt")
    with torch.no_grad():
        padded = model(**batch).logits[-1, real]
        expected = model(**alone).logits[0]
    torch.testing.assert_close(padded, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "deepseek_v3", "gemma4"])
def test_offset_positions_in_generate_of_a_padded_row_equal_the_row_alone(family):
    """`generate` computes positions from the attention mask; shifted by the prefix, a padded row generates what it
    generates alone, with the same scores."""
    model, batch, _, alone = padded_and_alone(family)
    settings = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    padded = model.generate(**batch, **settings)
    single = model.generate(**alone, **settings)
    assert torch.equal(
        padded.sequences[-1, batch["input_ids"].shape[1] :], single.sequences[0, alone["input_ids"].shape[1] :]
    )
    for step_padded, step_alone in zip(padded.scores, single.scores, strict=True):
        torch.testing.assert_close(step_padded[-1], step_alone[0], rtol=0, atol=1e-4)


def test_bf16_base_runs_trains_and_matches_attention_dtype(monkeypatch):
    from peft_prefix_plus.tuner import attention

    base, task = tiny_model("llama")
    base.to(torch.bfloat16)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3, mlp_depth=2))
    seen = []
    original = attention._base_function

    def spy(module, implementation):
        function = original(module, implementation)

        def wrapped(module, query, key, value, mask, **kwargs):
            seen.append((query.dtype, key.dtype, value.dtype))
            return function(module, query, key, value, mask, **kwargs)

        return wrapped

    monkeypatch.setattr(attention, "_base_function", spy)
    batch = batch_for(task)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": -1}, "num_virtual_tokens"),
        ({"cross_num_virtual_tokens": -2}, "cross_num_virtual_tokens"),
        ({"mlp_depth": 0}, "mlp_depth"),
        ({"mlp_activation": "no-such-activation"}, "mlp_activation"),
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"prefix_dropout": 1.5}, "prefix_dropout"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
    ],
)
def test_invalid_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixPlusConfig(task_type="CAUSAL_LM", **kwargs)


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("llama", {"encoder_num_virtual_tokens": 4}, "encoder_num_virtual_tokens.*not an encoder-decoder"),
        ("gpt2", {"cross_num_virtual_tokens": 4}, "cross_num_virtual_tokens.*not an encoder-decoder"),
        ("llama", {"layers_to_transform": [0, 5]}, r"layers_to_transform.*out of range.*2 layers"),
        ("t5", {"offset_position_ids": True}, "offset_position_ids"),
    ],
)
def test_config_that_does_not_fit_the_model_is_rejected(family, kwargs, message):
    base, task = tiny_model(family)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3, **kwargs))


def test_unsupported_attention_implementation_is_named():
    base, task = tiny_model("llama")
    for config in [base.config]:
        config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention.*'sdpa'"):
        get_peft_model(base, PrefixPlusConfig(task_type=task))


@pytest.mark.parametrize(
    "changes",
    [{"num_hidden_layers": 3}, {"num_key_value_heads": 4}, {"head_dim": 16}],
    ids=["layers", "kv_heads", "head_dim"],
)
def test_loading_onto_a_different_model_names_the_shapes(changes, tmp_path):
    base, task = tiny_model("llama")
    get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).save_pretrained(tmp_path)
    other, _ = tiny_model("llama")
    config = other.config.to_dict() | changes
    other = type(other)(type(other.config).from_dict(config))
    with pytest.raises(ValueError, match=r"'self' attention has .*num_layers.*base model it was trained with"):
        PeftModel.from_pretrained(other, tmp_path)


def test_generation_uses_the_prefix_from_the_first_step():
    """Greedy decoding continues exactly the forward pass (stock PEFT 0.21 on transformers 5 drops its prefix here)."""
    base, task = tiny_model("llama")
    model = get_peft_model(
        base, PrefixPlusConfig(task_type=task, num_virtual_tokens=4, prefix_projection=False, offset_position_ids=True)
    ).eval()
    batch = batch_for(task, left_pad=False)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0
    )
    torch.testing.assert_close(out.scores[0], logits(model, inputs)[:, -1], rtol=0, atol=1e-5)
    extended = {"input_ids": out.sequences[:, :-1], "attention_mask": torch.ones_like(out.sequences[:, :-1])}
    torch.testing.assert_close(out.scores[-1], logits(model, extended)[:, -1], rtol=0, atol=1e-5)


def test_a_rejected_config_leaves_the_base_model_untouched():
    base, task = tiny_model("llama")
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="encoder_num_virtual_tokens"):
        get_peft_model(base, PrefixPlusConfig(task_type=task, encoder_num_virtual_tokens=2))
    assert base.config._attn_implementation == "sdpa"
    assert not hasattr(base, "prefix_plus_layer") and not base._forward_pre_hooks
    assert not any(hasattr(m, "_prefix_plus_route") for m in base.modules())
    for name, param in base.named_parameters():
        assert param.requires_grad == before[name][0] and torch.equal(param, before[name][1])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_low_cpu_mem_usage_loading(family, tmp_path):
    base, task = tiny_model(family)
    model = get_peft_model(copy.deepcopy(base), PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.is_meta for p in loaded.parameters())
    batch = batch_for(task)
    # the assigned tensors are memory-mapped from the file, which can change the matmul's summation order slightly
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=1e-5)
