"""PrefixPlus's defaults reproduce stock PEFT prefix tuning exactly, and adapters saved with the old MLP input width
keep loading and merging exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny_model
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from peft_prefix_plus import PrefixPlusConfig


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_default_mlp_input_is_the_key_value_width():
    """On a grouped-query model (2 key/value heads x head dim 8, hidden size 32) the MLP input is 16 wide, as stock's."""
    base = tiny_model("llama")[0]
    model = get_peft_model(base, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    config = model.peft_config["default"]
    assert (config.token_dim, base.config.hidden_size) == (16, 32)
    encoder = model.base_model.model.prefix_plus_layer.prefix_plus_sites["default"]["self"]
    assert encoder.embedding.weight.shape == (4, 16) and encoder.mlp[0].weight.shape == (16, 16)


def test_defaults_reproduce_stock_initial_weights_and_trajectory_in_float64(float64):
    """Same seed, stock's defaults with projection against PrefixPlus's with `offset_position_ids=True`: identical
    initial weights and identical losses over AdamW steps."""
    base = tiny_model("llama", "eager")[0].double()
    torch.manual_seed(0)
    stock = get_peft_model(
        copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True)
    )
    torch.manual_seed(0)
    plus = get_peft_model(
        copy.deepcopy(base), PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, offset_position_ids=True)
    )
    stock_encoder = stock.prompt_encoder["default"]
    plus_encoder = plus.base_model.model.prefix_plus_layer.prefix_plus_sites["default"]["self"]
    assert torch.equal(stock_encoder.embedding.weight, plus_encoder.embedding.weight)
    for stock_index, plus_index in ((0, 0), (2, 2)):
        assert torch.equal(stock_encoder.transform[stock_index].weight, plus_encoder.mlp[plus_index].weight)
        assert torch.equal(stock_encoder.transform[stock_index].bias, plus_encoder.mlp[plus_index].bias)
    batch = batch_for("CAUSAL_LM", left_pad=False)
    optimizers = [
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2) for model in (stock, plus)
    ]
    stock.train()
    plus.train()
    for _ in range(20):
        losses = []
        for model, optimizer in zip((stock, plus), optimizers, strict=True):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-12)
    assert losses[0] < 4.5, "the adapters did not train"


def test_an_adapter_saved_with_the_hidden_size_as_input_width_loads_and_merges_exactly(tmp_path):
    """Adapters saved before the default changed record `token_dim` = hidden size: they keep it."""
    model = get_peft_model(
        tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, token_dim=32)
    )
    batch = batch_for("CAUSAL_LM")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path).eval()
    assert loaded.peft_config["default"].token_dim == 32
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        loaded.merge_mlp()
        assert (loaded(**batch).logits - expected).abs().max().item() < 1e-5
