"""Offloaded and meta-device bases: the attention sites are found without reading a weight, and the offloaded model
generates exactly what the in-memory model generates."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights
from conftest import FAMILY_SPECS, site_kwargs, tiny_model
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from peft_prefix_plus import PrefixPlusConfig

PROMPT = torch.tensor([[5, 6, 7, 8, 9]])
#: the first decoder layer on disk: the first attention module's weights are "meta" between calls
DISK_MAPS = {
    "llama": {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    },
    "t5": {"shared": "cpu", "encoder.block.0": "disk", "encoder.block.1": "cpu", "encoder.final_layer_norm": "cpu", "encoder.embed_tokens": "cpu",
           "decoder": "cpu", "lm_head": "cpu"},
}  # fmt: skip


def trained_adapter(family: str, tmp_path):
    """The in-memory reference: a saved base, an adapter with non-zero prefixes saved beside it, and its tokens."""
    base, task_type = tiny_model(family)
    base.eval().save_pretrained(tmp_path / "base")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=4, **site_kwargs(task_type)))
    torch.manual_seed(0)
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.5)
    model.eval().save_pretrained(tmp_path / "adapter")
    disabled = None
    with model.disable_adapter():
        disabled = generate(model)
    reference = generate(model)
    assert not torch.equal(reference, disabled), (
        "the adapter must change the tokens for the comparison to mean anything"
    )
    return model, reference


def generate(model) -> torch.Tensor:
    return model.generate(input_ids=PROMPT, max_new_tokens=6, do_sample=False)


def auto_class(family: str):
    return AutoModelForSeq2SeqLM if FAMILY_SPECS[family][3] == "SEQ_2_SEQ_LM" else AutoModelForCausalLM


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_a_disk_offloaded_base_loads_the_adapter_through_from_pretrained(family, tmp_path, monkeypatch):
    # peft 0.21.2's offload bookkeeping (`PeftModel._update_offload`) writes a copy of the base model's safetensors
    # file under a relative path made from its absolute one: keep it inside the test's folder
    monkeypatch.chdir(tmp_path)
    _, reference = trained_adapter(family, tmp_path)
    device_map = DISK_MAPS[family]
    base = auto_class(family).from_pretrained(
        tmp_path / "base", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert any(param.is_meta for param in base.parameters()), "the disk-offloaded layer's weights must be meta"
    peft_map = {f"base_model.model.{name}": device for name, device in device_map.items()}
    peft_map["base_model.model.prefix_plus_layer"] = "cpu"
    model = PeftModel.from_pretrained(
        base.eval(), tmp_path / "adapter", device_map=peft_map, offload_folder=tmp_path / "offload-peft"
    )
    assert torch.equal(generate(model), reference)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_get_peft_model_on_a_disk_offloaded_base(family, tmp_path):
    trained, reference = trained_adapter(family, tmp_path)
    base = auto_class(family).from_pretrained(
        tmp_path / "base", device_map=DISK_MAPS[family], offload_folder=tmp_path / "offload"
    )
    model = get_peft_model(base.eval(), trained.peft_config["default"])
    encoders = [param for param in model.parameters() if param.requires_grad]
    assert encoders and all(param.device.type == "cpu" for param in encoders), "encoders go to the execution device"
    set_peft_model_state_dict(model, get_peft_model_state_dict(trained))
    assert torch.equal(generate(model), reference)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_a_cpu_offloaded_base(family, tmp_path):
    trained, reference = trained_adapter(family, tmp_path)
    base = cpu_offload(auto_class(family).from_pretrained(tmp_path / "base").eval(), execution_device="cpu")
    assert all(param.is_meta for param in base.parameters())
    model = get_peft_model(base, trained.peft_config["default"])
    set_peft_model_state_dict(model, get_peft_model_state_dict(trained))
    assert torch.equal(generate(model), reference)


def test_a_meta_initialised_base_gets_its_sites_without_a_real_pass():
    _, sizes, model_cls, _ = FAMILY_SPECS["llama"]
    config = tiny_model("llama")[0].config
    with init_empty_weights():
        base = model_cls(config)
    before = config.to_dict()
    model = get_peft_model(base, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    layer = model.base_model.model.prefix_plus_layer
    assert len(model.base_model._sites["self"].modules) == sizes["num_hidden_layers"]
    assert all(not param.is_meta for param in layer.parameters()), "the prefix encoders are real, trainable tensors"
    model.unload()
    assert config.to_dict() == before
