"""``adapter_names``: one batch serves several adapters, each row exactly as if it ran alone with its adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, site_kwargs, tiny_model
from peft import get_peft_model

from peft_prefix_plus import PrefixPlusConfig

ROWS = ["a", "__base__", "b", "a"]


def two_adapter_model(family: str, attn: str = "sdpa", offset: bool = False):
    """Adapters "a" (3 tokens, MLP) and "b" (5 tokens, raw prefixes) on a tiny model."""
    base, task = tiny_model(family, attn)
    extra = {"offset_position_ids": offset} if task == "CAUSAL_LM" else {}
    model = get_peft_model(
        base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3, **site_kwargs(task), **extra), "a"
    )
    torch.manual_seed(1)
    b_sites = {"encoder_num_virtual_tokens": 4, "cross_num_virtual_tokens": 2} if task == "SEQ_2_SEQ_LM" else {}
    model.add_adapter(
        "b", PrefixPlusConfig(task_type=task, num_virtual_tokens=5, prefix_projection=False, **b_sites, **extra)
    )
    return model.eval(), task


def batch(rows: int, task: str) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB, (rows, 6), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1:3, :2] = 0  # left padding in two rows
    attention_mask[1:3, :2] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (rows, 3), generator=torch.Generator().manual_seed(4))
    return inputs


def alone(model, name: str):
    """A context in which the model runs as for one row of ``name`` (the base model for ``"__base__"``)."""
    if name == "__base__":
        return model.disable_adapter()
    model.set_adapter(name)
    return torch.no_grad()


def row(inputs: dict, i: int) -> dict:
    return {key: value[i : i + 1] for key, value in inputs.items()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    ("family", "offset"),
    [
        ("llama", False),
        ("llama", True),
        ("gpt2", False),
        ("gpt2", True),
        ("opt", False),
        ("opt", True),
        ("t5", False),
        ("bart", False),
        ("bert", False),
        ("deepseek_v3", False),
        ("gemma4", True),
    ],
)
def test_each_row_of_a_mixed_forward_equals_running_it_alone(family, offset, attn):
    model, task = two_adapter_model(family, attn, offset)
    inputs = batch(len(ROWS), task)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        with alone(model, name):
            expected = model(**row(inputs, i)).logits
        # a padding position attends to nothing real: its output is arbitrary, so compare real tokens only
        real = inputs["attention_mask"][i].bool() if task != "SEQ_2_SEQ_LM" else slice(None)
        if task == "SEQ_CLS":
            real = slice(None)
        assert (mixed[i][real] - expected[0][real]).abs().max().item() < 1e-5, f"row {i} ({name})"


@pytest.mark.parametrize(
    "generation",
    [{"do_sample": False}, {"num_beams": 2, "do_sample": False}, {"num_beams": 2, "num_return_sequences": 2}],
    ids=["greedy", "beam", "beam-return-2"],
)
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "deepseek_v3"])
def test_each_row_of_a_mixed_generate_equals_generating_it_alone(family, generation):
    model, task = two_adapter_model(family, offset=family == "llama")
    inputs = batch(len(ROWS), task)
    inputs.pop("decoder_input_ids", None)
    settings = {"max_new_tokens": 5, **generation}
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=ROWS, **settings)
        recomputed = model.generate(**inputs, adapter_names=ROWS, use_cache=False, **settings)
    assert torch.equal(mixed, recomputed)
    per_row = settings.get("num_return_sequences", 1)
    for i, name in enumerate(ROWS):
        with alone(model, name):
            expected = model.generate(**row(inputs, i), **settings)
        got = mixed[i * per_row : (i + 1) * per_row]
        assert torch.equal(got[:, : expected.shape[1]], expected), f"row {i} ({name})"


def test_mixed_batch_differs_per_row():
    """The rows really get different prefixes (a test that cannot fail otherwise would prove nothing)."""
    model, task = two_adapter_model("llama")
    inputs = batch(3, task)
    same = {key: value[:1].expand(3, -1).clone() for key, value in inputs.items()}
    with torch.no_grad():
        logits = model(**same, adapter_names=["a", "b", "__base__"]).logits
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        (["a", "nope"], ValueError, r"non-existing adapter\(s\): nope.*'__base__'"),
        (["a", "b", "a"], ValueError, r"3 entries, but the batch has 4 rows"),
        ("a", TypeError, r"list of adapter names"),
    ],
)
def test_bad_adapter_names_are_refused(names, error, message):
    model, task = two_adapter_model("llama")
    with pytest.raises(error, match=message):
        model(**batch(4, task), adapter_names=names)


def test_adapter_names_are_refused_in_training():
    model, task = two_adapter_model("llama")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**batch(4, task), adapter_names=ROWS)
