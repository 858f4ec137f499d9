"""Without padding, sdpa gets the prefix's causal structure as torch's ``causal_lower_right`` bias instead of a
materialised mask tensor (on a GPU it then runs in the fused kernels, as the base model's ``is_causal`` does), and the
outputs and gradients are those of the materialised mask.

The bias is used on CUDA only (a CPU's sdpa materialises it itself); these tests enable it on the CPU to compare it
with the mask, and ``tests/test_devices.py`` runs the CUDA path where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, site_kwargs, tiny_model
from peft import get_peft_model
from torch.nn.attention.bias import CausalBias
from torch.utils.flop_counter import FlopCounterMode

from peft_prefix_plus import PrefixPlusConfig, attention


@pytest.fixture(autouse=True)
def causal_bias_on_the_cpu(monkeypatch):
    monkeypatch.setattr(attention, "CAUSAL_BIAS_DEVICES", ("cpu", "cuda"))


def masks_seen_by_sdpa(monkeypatch) -> list:
    """Record the mask of every call the PrefixPlus wrapper hands to transformers' sdpa function."""
    seen, sdpa = [], attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    return seen


def step(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout draws (GPT-2 and OPT drop attention probabilities in training)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bart", "t5"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_causal_bias_replaces_the_mask_without_padding(family, padded, monkeypatch):
    base, task = tiny_model(family, "sdpa")
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=3, **site_kwargs(task))
    model = get_peft_model(base, config).train()
    batch = batch_for(task, batch_size=3, seq_len=7, left_pad=padded)
    if not padded:
        batch.pop("attention_mask")
    seen = masks_seen_by_sdpa(monkeypatch)
    loss, grads = step(model, batch)
    biased = [mask for mask in seen if isinstance(mask, CausalBias)]
    # causal self-attention without padding (an encoder-decoder's decoder inputs never are) and without T5's position
    # bias: the unmaterialised bias, once per layer
    assert len(biased) == (2 if (not padded or task == "SEQ_2_SEQ_LM") and family != "t5" else 0)
    # the materialised mask gives the same loss and gradients
    extend = attention._extend_mask
    monkeypatch.setattr(attention, "_extend_mask", lambda *a, **k: extend(*a, **{**k, "fused": False}))
    seen.clear()
    reference_loss, reference_grads = step(model, batch)
    assert not any(isinstance(mask, CausalBias) for mask in seen)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7)


def test_prefill_of_a_generate_call_takes_the_causal_bias(monkeypatch):
    base, task = tiny_model("llama", "sdpa")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    seen = masks_seen_by_sdpa(monkeypatch)
    prompt = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False
    )
    assert isinstance(seen[0], CausalBias) and seen[0].seq_len_q == 6 and seen[0].seq_len_kv == 9
    assert all(mask is None for mask in seen[2:])  # decoding steps over the seeded cache: nothing to mask
    assert torch.equal(tokens, model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, use_cache=False))


def test_outside_the_bias_devices_and_inside_dispatch_modes_the_mask_is_kept(monkeypatch):
    """The bias only where sdpa runs it fused, and never inside a torch dispatch mode, which cannot create it."""
    base, task = tiny_model("llama", "sdpa")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).train()
    batch = batch_for(task, left_pad=False)
    batch.pop("attention_mask")
    seen = masks_seen_by_sdpa(monkeypatch)
    with FlopCounterMode(display=False) as counter:
        loss, _ = step(model, batch)
    assert counter.get_total_flops() > 0 and torch.isfinite(loss)
    monkeypatch.setattr(attention, "CAUSAL_BIAS_DEVICES", ("cuda",))
    step(model, batch)
    assert seen and all(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool for mask in seen)
