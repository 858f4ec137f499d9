"""Without padding, sdpa attends the prefix causally without a mask tensor: the queries get one zero row per prefix
key in front, which makes the call square, so sdpa's own ``is_causal`` gives exactly the prefix's bottom-right causal
structure and runs in the fused kernels the base model runs in. Outputs and gradients equal the materialised mask's."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, site_kwargs, tiny_model
from peft import get_peft_model

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.tuner import attention


def sdpa_calls(monkeypatch) -> list:
    """Record (mask, query length, key length) of every call handed to transformers' sdpa function."""
    seen, sdpa = [], attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, query.shape[2], key.shape[2]))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    return seen


#: no dropout, whose random draws depend on how many query rows the call has
NO_DROPOUT = {
    "gpt2": {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "opt": {"dropout": 0.0, "attention_dropout": 0.0},
}


def step(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bart", "t5"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_unpadded_causal_attention_needs_no_mask(family, padded, monkeypatch):
    base, task = tiny_model(family, "sdpa", **NO_DROPOUT.get(family, {}))
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=3, **site_kwargs(task))
    model = get_peft_model(base, config).train()
    batch = batch_for(task, batch_size=3, seq_len=7, left_pad=padded)
    if not padded:
        batch.pop("attention_mask")
    seen = sdpa_calls(monkeypatch)
    loss, grads = step(model, batch)
    square = [(q, k) for mask, q, k in seen if mask is None and q == k and q > 1]
    # causal self-attention without padding (an encoder-decoder's decoder inputs never are) and without T5's position
    # bias: one square maskless call per layer, 3 prefix rows in front of the queries
    unpadded = not padded or task == "SEQ_2_SEQ_LM"
    queries = 4 if task == "SEQ_2_SEQ_LM" else 7
    assert square == ([(3 + queries, 3 + queries)] * 2 if unpadded and family != "t5" else [])
    monkeypatch.setattr(attention, "SQUARE_CAUSAL", False)  # the materialised mask: same loss and gradients
    seen.clear()
    reference_loss, reference_grads = step(model, batch)
    assert not [(q, k) for mask, q, k in seen if mask is None and q == k and q > 1]
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7)


def test_prefill_of_a_generate_call_is_square_and_maskless(monkeypatch):
    base, task = tiny_model("llama", "sdpa")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    seen = sdpa_calls(monkeypatch)
    prompt = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False
    )
    assert seen[0] == (None, 9, 9)  # 3 prefix rows + 6 prompt tokens, over the seeded cache's 3 + 6 keys
    assert all(mask is None and q == 1 for mask, q, _ in seen[2:])  # decoding steps over the seeded cache
    assert torch.equal(tokens, model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, use_cache=False))
