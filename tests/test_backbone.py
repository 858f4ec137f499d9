"""Every entry point sees the prefix: the full model, the backbone (as reward-model and value-head code call it) and
the encoder alone."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, site_kwargs, tiny_model
from peft import get_peft_model

from peft_prefix_plus import PrefixPlusConfig

# family -> path of the backbone inside the transformers model
BACKBONES = {"llama": "model", "gpt2": "transformer", "opt": "model.decoder", "bert": "bert"}


def adapted(family: str, **config_kwargs):
    base, task = tiny_model(family)
    config = PrefixPlusConfig(task_type=task, num_virtual_tokens=3, **site_kwargs(task), **config_kwargs)
    return get_peft_model(base, config).eval(), task


@pytest.mark.parametrize("offset", [False, True], ids=["positions-from-0", "offset-positions"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_decoder_backbone_sees_the_prefix(family, offset):
    model, task = adapted(family, offset_position_ids=offset)
    batch = batch_for(task)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    backbone = model.get_base_model().get_submodule(BACKBONES[family])
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states[-1]
        direct = backbone(**inputs).last_hidden_state
        decoder = model.get_base_model().get_decoder()(**inputs).last_hidden_state
        with model.disable_adapter():
            base = backbone(**inputs).last_hidden_state
    assert torch.allclose(direct, full, atol=1e-6)
    assert torch.allclose(decoder, full, atol=1e-6)
    assert not torch.allclose(direct, base, atol=1e-3), "the backbone ran without the prefix"


def test_encoder_only_backbone_sees_the_prefix():
    model, task = adapted("bert")
    batch = batch_for(task)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True).hidden_states[-1]
        direct = model.get_base_model().bert(**inputs).last_hidden_state
        with model.disable_adapter():
            base = model.get_base_model().bert(**inputs).last_hidden_state
    assert torch.allclose(direct, full, atol=1e-6)
    assert not torch.allclose(direct, base, atol=1e-3)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_and_decoder_called_alone_see_their_prefixes(family):
    model, task = adapted(family)
    batch = batch_for(task)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    decoder_ids = batch["labels"]
    base_model = model.get_base_model()
    with torch.no_grad():
        full = model(**inputs, decoder_input_ids=decoder_ids, output_hidden_states=True)
        encoded = base_model.get_encoder()(**inputs).last_hidden_state
        decoded = base_model.get_decoder()(
            input_ids=decoder_ids, encoder_hidden_states=encoded, encoder_attention_mask=inputs["attention_mask"]
        ).last_hidden_state
        with model.disable_adapter():
            base_encoded = base_model.get_encoder()(**inputs).last_hidden_state
    assert torch.allclose(encoded, full.encoder_last_hidden_state, atol=1e-6)
    assert torch.allclose(decoded, full.decoder_hidden_states[-1], atol=1e-6)
    assert not torch.allclose(encoded, base_encoded, atol=1e-3), "the encoder ran without its prefix"


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_a_loaded_model_in_training_mode_gets_its_prefix(family, tmp_path):
    """transformers 5.25 loads models with the `kernels` package on by default, and its `train()`/`eval()` re-kernelize
    a model whose mode changes, which `kernelize` refuses on the meta device where site discovery probes. A model
    loaded with `from_pretrained` and put in training mode (as any training loop does first) must still get its
    prefix: the probe sets eval mode without calling `eval()`."""
    import transformers

    base, task_type = tiny_model(family)
    base.save_pretrained(tmp_path)
    auto = transformers.AutoModelForSeq2SeqLM if task_type == "SEQ_2_SEQ_LM" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).train()
    batch = batch_for(task_type)
    with torch.no_grad():
        plain = loaded.eval()(**batch).logits
    loaded.train()
    model = get_peft_model(
        loaded, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=3, **site_kwargs(task_type))
    )
    with torch.no_grad():
        prefixed = model.eval()(**batch).logits
    assert prefixed.shape == plain.shape and not torch.allclose(prefixed, plain, atol=1e-4)
