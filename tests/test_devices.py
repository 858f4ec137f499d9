"""PrefixPlus on every device at hand: cached generation equals recomputation, and gradients match a float64
reference, in float32 and bfloat16.

The devices are the CPU and, where available, CUDA; ``PREFIX_PLUS_TEST_DEVICE=cuda`` (as
``benchmarks/gpu_checks.sh`` sets it) runs them on that device only, and fails if it is missing. For a tiny Llama
(grouped-query attention) and a tiny T5 (three prefix sites, ``position_bias``), with a left-padded row in every batch:

- the logits of cached greedy generation equal a forward pass without cache over the generated sequence;
- one training step's loss and prefix gradients equal those of the same weights in float64 on the CPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import batch_for, site_kwargs, tiny_model
from peft import get_peft_model

from peft_prefix_plus import PrefixPlusConfig

if "PREFIX_PLUS_TEST_DEVICE" in os.environ:
    DEVICES = [os.environ["PREFIX_PLUS_TEST_DEVICE"]]
else:
    DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Largest difference allowed, relative to the largest absolute value of the reference (logits or gradients).
#: bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9), and errors add up over layers.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
NEW_TOKENS = 6


def adapted(family: str) -> tuple[torch.nn.Module, str]:
    """A tiny model of ``family`` with a PrefixPlus adapter (MLP, distinct site lengths), in float32 on the CPU."""
    base, task_type = tiny_model(family, "sdpa")
    config = PrefixPlusConfig(task_type=task_type, num_virtual_tokens=4, **site_kwargs(task_type))
    return get_peft_model(base, config), task_type


def on(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` with weights and prefixes in ``dtype`` on ``device``."""
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double().cpu()
    return ((value.double().cpu() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_cached_generation_equals_recomputation(family: str, dtype: str, device: str) -> None:
    model, task_type = adapted(family)
    model = on(model, device, DTYPES[dtype]).eval()
    batch = {k: v.to(device) for k, v in batch_for(task_type).items() if k != "labels"}
    with torch.no_grad():
        cached = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
        cached_logits = torch.stack(cached.logits, dim=1)  # (batch, new tokens, vocab)
        # the same tokens again, all at once and without a cache: the logits that chose each generated token
        if task_type == "SEQ_2_SEQ_LM":
            decoder_ids = cached.sequences  # starts with the decoder start token
            recomputed = model(**batch, decoder_input_ids=decoder_ids[:, :-1], use_cache=False).logits
        else:
            mask = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones((2, NEW_TOKENS))], dim=1)
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() derives them from the mask
            ids = cached.sequences[:, :-1]
            recomputed = model(
                input_ids=ids, attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1], use_cache=False
            ).logits[:, -NEW_TOKENS:]
    assert cached_logits.shape == recomputed.shape
    error = relative_error(cached_logits, recomputed)
    assert error < TOLERANCE[dtype], f"{family} {dtype} on {device}: cached logits differ by {error:.2e} (relative)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_training_step_matches_a_float64_reference(family: str, dtype: str, device: str) -> None:
    model, task_type = adapted(family)
    batch = batch_for(task_type)
    results = {}
    for name, copied, inputs in (
        ("reference", copy.deepcopy(model).to(dtype=torch.float64), batch),
        ("device", on(model, device, DTYPES[dtype]), {k: v.to(device) for k, v in batch.items()}),
    ):
        copied.train()
        loss = copied(**inputs).loss
        loss.backward()
        grads = {n: p.grad for n, p in copied.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values()), f"{name}: a prefix parameter got no gradient"
        results[name] = (loss.detach(), grads)
    (loss, grads), (reference_loss, reference_grads) = results["device"], results["reference"]
    assert grads.keys() == reference_grads.keys()
    assert all(g.device.type == torch.device(device).type and g.dtype == DTYPES[dtype] for g in grads.values())
    assert relative_error(loss, reference_loss) < TOLERANCE[dtype], (loss.item(), reference_loss.item())
    errors = {n: relative_error(grads[n], reference_grads[n]) for n in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE[dtype], (
        f"{family} {dtype} on {device}: gradient of {worst} off by {errors[worst]:.2e}"
    )
