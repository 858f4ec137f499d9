"""``init_weights="text"``: the prefixes start as the base model's keys and values of a real text."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import VOCAB, tiny_model
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peft_prefix_plus import PrefixPlusConfig

TEXT = "w10 w11 w12 w13 w14"  # five tokens: ids 10..14


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A word-level tokenizer over the tiny models' vocabulary ("wN" is token N), saved for `tokenizer_name_or_path`."""
    vocab = {f"w{i}": i for i in range(3, VOCAB)} | {"[UNK]": 0}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def text_config(task: str, tokenizer_dir: str, length: int = 5, **kwargs) -> PrefixPlusConfig:
    return PrefixPlusConfig(
        task_type=task,
        num_virtual_tokens=length,
        init_weights="text",
        init_text=TEXT,
        tokenizer_name_or_path=tokenizer_dir,
        **kwargs,
    )


def encoder_of(model, site: str = "self"):
    return model.base_model.model.prefix_plus_layer.prefix_plus_sites["default"][site]


@pytest.mark.parametrize("projection", [True, False], ids=["mlp", "raw"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_at_step_zero_the_model_sees_the_text_in_front_of_its_input(family, attn, projection, tokenizer_dir):
    """With positions offset by the prefix length, logits on x equal the base model's logits on text + x."""
    base, task = tiny_model(family, attn)
    base.eval()
    text_ids = torch.arange(10, 15)[None]
    x = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=torch.cat([text_ids, x], dim=1)).logits[:, 5:]
    config = text_config(task, tokenizer_dir, offset_position_ids=True, prefix_projection=projection)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        got = model(input_ids=x).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert not torch.allclose(plain, expected, atol=1e-3), "the text must make a difference"


def test_the_text_is_repeated_or_truncated_to_the_prefix_length(tokenizer_dir):
    base, task = tiny_model("llama")
    repeated = encoder_of(get_peft_model(base, text_config(task, tokenizer_dir, length=12))).project()
    assert torch.equal(repeated[..., 5:10, :], repeated[..., :5, :]) and torch.equal(
        repeated[..., 10:, :], repeated[..., :2, :]
    )
    truncated = encoder_of(
        get_peft_model(tiny_model("llama")[0], text_config(task, tokenizer_dir, length=3))
    ).project()
    # only the 3 tokens used run (causal: their states are the same, up to the rounding of another call shape)
    torch.testing.assert_close(truncated, repeated[..., :3, :], rtol=0, atol=1e-6)


def test_t5_sites_start_from_the_text_states(tokenizer_dir):
    """Encoder self-attention keys and cross-attention keys equal the base model's projections of the text."""
    base, task = tiny_model("t5")
    base.eval()
    ids = torch.arange(10, 15)[None]
    with torch.no_grad():
        first = base.encoder.block[0].layer[0]
        hidden = first.layer_norm(base.shared(ids))
        encoder_keys = first.SelfAttention.k(hidden).view(1, 5, 4, 8).transpose(1, 2)
        cross = base.decoder.block[0].layer[1].EncDecAttention
        cross_keys = cross.k(base.encoder(input_ids=ids).last_hidden_state).view(1, 5, 4, 8).transpose(1, 2)
    model = get_peft_model(
        base, text_config(task, tokenizer_dir, encoder_num_virtual_tokens=5, cross_num_virtual_tokens=5)
    )
    assert torch.allclose(encoder_of(model, "encoder").project()[0, 0], encoder_keys[0], atol=1e-6)
    assert torch.allclose(encoder_of(model, "cross").project()[0, 0], cross_keys[0], atol=1e-6)
    assert encoder_of(model, "self").project().abs().sum() > 0


def test_text_init_trains_saves_reloads_and_merges_exactly(tmp_path, tokenizer_dir):
    """The captured prefix is a saved buffer; reloading for inference needs no tokenizer and merging stays exact."""
    base, task = tiny_model("llama")
    model = get_peft_model(base, text_config(task, tokenizer_dir, offset_position_ids=True))
    encoder = encoder_of(model)
    assert not encoder.prefix_init.requires_grad and encoder.mlp[-1].weight.abs().sum() == 0
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert encoder.mlp[-1].weight.abs().sum() > 0, "the MLP did not train"
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert any(key.endswith("self.prefix_init") for key in f.keys())  # noqa: SIM118 - safe_open is not iterable
    loaded = PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
        loaded.merge_mlp()
        assert (loaded(**batch).logits - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_weights": "text"}, "needs `init_text`"),
        ({"init_weights": "text", "init_text": "  "}, "needs `init_text`"),
        ({"init_text": "hello"}, 'only used with `init_weights="text"`'),
    ],
)
def test_text_init_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixPlusConfig(task_type="CAUSAL_LM", **kwargs)


def test_a_missing_tokenizer_is_named(tmp_path):
    config = PrefixPlusConfig(
        task_type="CAUSAL_LM", init_weights="text", init_text="hello", tokenizer_name_or_path=str(tmp_path / "none")
    )
    with pytest.raises(ValueError, match="could not load the tokenizer .*tokenizer_name_or_path"):
        get_peft_model(tiny_model("llama")[0], config)


def test_an_adapter_created_for_inference_still_starts_from_the_text(tokenizer_dir):
    """`inference_mode=True` in `get_peft_model` creates an adapter: the text pass runs (loading one does not)."""
    base, task = tiny_model("llama")
    trained = get_peft_model(base, text_config(task, tokenizer_dir, prefix_projection=False))
    expected = encoder_of(trained).prefix.detach().clone()
    created = get_peft_model(
        tiny_model("llama")[0], text_config(task, tokenizer_dir, prefix_projection=False, inference_mode=True)
    )
    assert torch.equal(encoder_of(created).prefix, expected)


@pytest.mark.parametrize("how", ["is_trainable", "load_adapter"])
def test_loading_a_text_initialised_adapter_needs_no_tokenizer(how, tmp_path, tokenizer_dir):
    """The saved prefixes replace the text pass, so the tokenizer may be gone by the time the adapter is loaded."""
    tokenizer_copy = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tokenizer_copy)
    base, task = tiny_model("llama")
    model = get_peft_model(base, text_config(task, str(tokenizer_copy), prefix_projection=False))
    with torch.no_grad():
        encoder_of(model).prefix.add_(1.0)  # trained: no longer the text's states
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tokenizer_copy)
    if how == "is_trainable":
        loaded = PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path / "adapter", is_trainable=True)
        name = "default"
    else:
        other = get_peft_model(tiny_model("llama")[0], PrefixPlusConfig(task_type=task, num_virtual_tokens=2))
        other.load_adapter(tmp_path / "adapter", adapter_name="loaded")
        loaded, name = other, "loaded"
    weight = loaded.base_model.model.prefix_plus_layer.prefix_plus_sites[name]["self"].prefix
    assert torch.equal(weight, encoder_of(model).prefix)


def test_a_text_longer_than_the_models_positions_runs_only_the_tokens_used(tokenizer_dir):
    """GPT-2 has 128 positions; a 300-token text initialises a 5-token prefix from its first 5 tokens alone."""
    long_text = " ".join(f"w{10 + i % 80}" for i in range(300))
    base, task = tiny_model("gpt2")
    config = text_config(task, tokenizer_dir, prefix_projection=False)
    config.init_text = long_text
    model = get_peft_model(base, config)
    short = get_peft_model(tiny_model("gpt2")[0], text_config(task, tokenizer_dir, prefix_projection=False))
    assert torch.equal(encoder_of(model).prefix, encoder_of(short).prefix)  # TEXT is the same first five tokens


def test_a_tokenizer_beyond_the_models_vocabulary_is_named(tmp_path):
    vocab = {f"w{i}": i for i in range(3, 3 * VOCAB)} | {"[UNK]": 0}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    base, task = tiny_model("llama")
    config = PrefixPlusConfig(
        task_type=task, init_weights="text", init_text="w10 w250", tokenizer_name_or_path=str(tmp_path)
    )
    with pytest.raises(ValueError, match=rf"token id 250, but the model's vocabulary has {VOCAB} tokens"):
        get_peft_model(base, config)
