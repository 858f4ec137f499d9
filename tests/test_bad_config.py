"""Wrong configurations, wrong models and hand-edited adapters meet a clear error, never a silently wrong model."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
import transformers
from conftest import batch_for, tiny_config, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.tuner.attention import model_configs


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prefix_projection": "False"}, "prefix_projection"),
        ({"offset_position_ids": 1}, "offset_position_ids"),
        ({"mlp_hidden_size": True}, "mlp_hidden_size"),
        ({"prefix_dropout": "0.5"}, "prefix_dropout"),
        ({"prefix_dropout": 1.0}, "prefix_dropout"),
        ({"mlp_activation": ["tanh"]}, "mlp_activation"),
        ({"mlp_activation": "nope"}, "mlp_activation"),
        ({"num_virtual_tokens": True}, "num_virtual_tokens"),
        ({"num_virtual_tokens": "8"}, "num_virtual_tokens"),
        ({"encoder_num_virtual_tokens": -1}, "encoder_num_virtual_tokens"),
        ({"mlp_depth": 0}, "mlp_depth"),
        ({"init_weights": ["zero"]}, "init_weights"),
        ({"layers_to_transform": "0,1"}, "layers_to_transform"),
        ({"layers_to_transform": [1, 1]}, "layers_to_transform"),
        ({"site_shapes": "garbage"}, "site_shapes"),
        ({"site_shapes": {"self": {"num_layers": 2}}}, "site_shapes"),
        ({"site_shapes": {"decoder": {"num_layers": 2, "num_key_value_heads": 2, "head_dim": 8}}}, "site_shapes"),
        ({"site_shapes": {"self": {"num_layers": "2", "num_key_value_heads": 2, "head_dim": 8}}}, "num_layers"),
        ({"token_dim": "abc"}, "token_dim"),
        ({"merged_from": "yes"}, "merged_from"),
    ],
)
def test_config_refuses_wrong_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrefixPlusConfig(task_type="CAUSAL_LM", **kwargs)


def test_a_hand_edited_config_is_refused_when_loaded(tmp_path):
    """Values edited in adapter_config.json go through the same validation as the constructor."""
    model = get_peft_model(tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, {"prefix_projection": "False"})
    with pytest.raises(ValueError, match="prefix_projection"):
        PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path)


@pytest.mark.parametrize(
    ("family", "task_type", "expected"),
    [
        ("llama", "SEQ_2_SEQ_LM", "CAUSAL_LM"),
        ("gpt2", "SEQ_2_SEQ_LM", "CAUSAL_LM"),
        ("t5", "CAUSAL_LM", "SEQ_2_SEQ_LM"),
    ],
)
def test_a_task_type_that_does_not_fit_the_model_is_refused(family, task_type, expected):
    base = tiny_model(family)[0]
    with pytest.raises(ValueError, match=rf"task_type='{task_type}'.*use `task_type='{expected}'`"):
        get_peft_model(base, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=3))
    assert all(c._attn_implementation == "sdpa" for c in model_configs(base)), "a refused adapter changed the model"


def test_a_task_type_whose_peft_wrapper_passes_input_ids_is_refused_on_whisper():
    """PEFT's SEQ_2_SEQ_LM wrapper calls the model with `input_ids`, which Whisper's forward refuses (LoRA alike)."""
    base = tiny_model("whisper")[0]
    with pytest.raises(ValueError, match=r"task_type='SEQ_2_SEQ_LM'.*'input_features' and no `input_ids`.*unset"):
        get_peft_model(base, PrefixPlusConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    assert all(c._attn_implementation == "sdpa" for c in model_configs(base)), "a refused adapter changed the model"


def test_a_model_whose_main_input_the_probe_cannot_build_is_refused():
    """A vision-only model (its main input is `pixel_values`) is refused by name, not with a failed probe pass."""
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8
    )
    with pytest.raises(ValueError, match=r"ViTForImageClassification: its main input is 'pixel_values'"):
        get_peft_model(transformers.ViTForImageClassification(config), PrefixPlusConfig(num_virtual_tokens=3))


def test_offset_position_ids_is_refused_on_an_encoder_only_model():
    base = tiny_model("bert")[0]
    with pytest.raises(ValueError, match="offset_position_ids=True.*encoder-only"):
        get_peft_model(base, PrefixPlusConfig(task_type="SEQ_CLS", num_virtual_tokens=3, offset_position_ids=True))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_an_adapter_with_only_empty_sites_warns(family):
    base, task = tiny_model(family)
    extra = {"encoder_num_virtual_tokens": 0, "cross_num_virtual_tokens": 0} if task == "SEQ_2_SEQ_LM" else {}
    with pytest.warns(UserWarning, match="nothing to train"):
        get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=0, **extra))


def test_wrapping_a_wrapped_model_again_says_what_happened():
    base = tiny_model("llama")[0]
    get_peft_model(base, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match=r"already carries PrefixPlus adapters.*add_adapter.*unload\(\)"):
        get_peft_model(base, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


def test_two_models_built_from_one_config_object_each_take_their_own_adapter():
    """`get_peft_model` switches the attention implementation on the config object, which a second model built from
    the same object shares: that second model is still a plain model, and adapting it works."""
    config = tiny_config("llama")
    torch.manual_seed(0)
    first_base = transformers.LlamaForCausalLM(config)
    second_base = copy.deepcopy(first_base)
    second_base.config = config  # one config object, as when both are built from it
    reference = copy.deepcopy(first_base).eval()
    batch = batch_for("CAUSAL_LM")
    first = get_peft_model(first_base, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        assert torch.equal(second_base.eval()(**batch).logits, reference(**batch).logits)  # still the base model
    second = get_peft_model(second_base, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        logits = [model(**batch).logits for model in (first, second, reference)]
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])
    first.unload()  # the other keeps its prefix
    with torch.no_grad():
        assert torch.equal(second(**batch).logits, logits[1])


@pytest.mark.parametrize(("start", "switch"), [("sdpa", "eager"), ("eager", "sdpa")])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_set_attn_implementation_after_wrapping_keeps_the_prefix(family, start, switch):
    base, task = tiny_model(family, start)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    batch = batch_for(task)
    with torch.no_grad():
        before = model(**batch).logits
        model.set_attn_implementation(switch)
        after = model(**batch).logits
        reference.set_attn_implementation(switch)
        base_logits = reference(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(after, base_logits, atol=1e-3), "the prefix was dropped"
    unloaded = model.unload()
    assert {c._attn_implementation for c in model_configs(unloaded)} == {switch}


def test_switching_to_an_unsupported_implementation_is_refused():
    model = get_peft_model(tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for config in model_configs(model.get_base_model()):
        config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'flex_attention'.*supports 'eager' and 'sdpa'"):
        model(**batch_for("CAUSAL_LM"))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_unload_of_a_deep_copy_restores_every_config_and_can_be_wrapped_again(family):
    base, task = tiny_model(family)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=3)).eval()
    batch = batch_for(task)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copied(**batch).logits, model(**batch).logits)
        unloaded = copied.unload()
        assert {c._attn_implementation for c in model_configs(unloaded)} == {"sdpa"}
        again = get_peft_model(unloaded, PrefixPlusConfig(task_type=task, num_virtual_tokens=2))
        assert again(**batch).logits.isfinite().all()
        assert model(**batch).logits.isfinite().all(), "the original stopped working"


@pytest.mark.parametrize("method", ["merge_adapter", "merge_and_unload"])
def test_merging_into_weights_says_what_to_use_instead(method):
    model = get_peft_model(tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises((NotImplementedError, ValueError), match=r"cannot be merged.*merge_mlp\(\).*unload\(\)"):
        getattr(model, method)()


def saved_adapter(tmp_path, **config_kwargs):
    model = get_peft_model(
        tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **config_kwargs)
    )
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(path, edit: dict) -> None:
    """Edit the saved adapter_config.json by hand, as a user might."""
    raw = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(raw | edit))


def edit_embedding(path, change) -> None:
    """Replace the saved self-attention embedding tensor by ``change(tensor)``."""
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("embedding.weight"))
    tensors[key] = change(tensors[key])
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"mlp_depth": 2}, r"mlp_depth is 2, but the file holds an MLP of depth 1"),
        ({"prefix_projection": False}, r"prefix_projection is false, but the file holds MLP tensors"),
        ({"num_virtual_tokens": 5}, r"calls for 5 PrefixPlus tensors with 1,440 values.*does not match the weights"),
        ({"mlp_depth": 50000}, r"mlp_depth is 50000"),
        ({"num_virtual_tokens": 2**40}, r"does not match the weights"),
    ],
)
def test_weights_that_do_not_match_a_hand_edited_config_are_refused_at_load(tmp_path, edit, message):
    """Checked against the safetensors header before anything is built (an absurd config costs nothing)."""
    path = saved_adapter(tmp_path)
    edit_config(path, edit)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_model("llama")[0], path)
    assert time.perf_counter() - started < 5, "the edited config was built before it was refused"


def test_the_in_model_check_names_weights_that_do_not_match(tmp_path):
    """The second line, for adapters whose files are not checked first (the Hub): the loaded tensors themselves."""
    path = saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(tiny_model("llama")[0], path)
    layer = model.base_model.model.prefix_plus_layer
    with pytest.raises(ValueError, match=r"do not match its config: .*missing \['self.mlp.0.bias'"):
        layer.check_saved_weights("default", {"self.embedding.weight": torch.zeros(3, 16)})


def test_a_base_model_tensor_planted_in_the_adapter_file_is_refused(tmp_path):
    path = saved_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(100, 32)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"neither PrefixPlus tensors nor modules_to_save.*lm_head.weight"):
        PeftModel.from_pretrained(tiny_model("llama")[0], path)
    # the same check where PEFT remaps the loaded state dict (adapters whose directory is not local)
    model = get_peft_model(tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match=r"neither PrefixPlus tensors nor `modules_to_save`.*lm_head.weight"):
        model.base_model._remap_adapter_state_dict_for_load(
            model.base_model.model, model.peft_config["default"], "default", tensors
        )


def test_an_oversized_config_file_is_refused_unread(tmp_path):
    path = saved_adapter(tmp_path)
    config = (path / "adapter_config.json").read_text()
    (path / "adapter_config.json").write_text(config[:-1] + " " * (2 << 20) + "}")
    with pytest.raises(ValueError, match=r"adapter_config.json is \d+ bytes; .*at most 1048576"):
        PeftModel.from_pretrained(tiny_model("llama")[0], path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_warn_at_load(tmp_path, value):
    path = saved_adapter(tmp_path)
    edit_embedding(path, lambda t: t.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(value)))
    with pytest.warns(UserWarning, match=r"self.embedding.weight holds 1 non-finite value"):
        PeftModel.from_pretrained(tiny_model("llama")[0], path)


def test_integer_weights_are_refused_at_load(tmp_path):
    path = saved_adapter(tmp_path)
    edit_embedding(path, lambda t: t.to(torch.int8))
    with pytest.raises(ValueError, match="self.embedding.weight' has dtype I8; adapter tensors must be floating"):
        PeftModel.from_pretrained(tiny_model("llama")[0], path)


def test_prefix_plus_tensors_under_another_peft_type_are_refused_at_load(tmp_path):
    """`peft_type: LORA` edited into a PrefixPlus adapter would load as a LoRA adapter that changes nothing."""
    path = saved_adapter(tmp_path)
    edit_config(path, {"peft_type": "LORA", "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match=r"holds PrefixPlus tensors.*peft_type 'LORA'.*PREFIX_PLUS"):
        PeftModel.from_pretrained(tiny_model("llama")[0], path)


def test_other_adapter_types_load_as_before(tmp_path):
    base = tiny_model("llama")[0]
    lora = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path)
    batch = batch_for("CAUSAL_LM")
    with torch.no_grad():
        expected = lora.eval()(**batch).logits
        loaded = PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path).eval()
        assert torch.equal(loaded(**batch).logits, expected)


def test_mixed_dtypes_are_refused_at_load(tmp_path):
    path = saved_adapter(tmp_path)
    edit_embedding(path, lambda t: t.to(torch.float16))
    with pytest.raises(ValueError, match=r"mixes dtypes \['torch.float16', 'torch.float32'\]"):
        PeftModel.from_pretrained(tiny_model("llama")[0], path)


@pytest.mark.parametrize("value", [True, False])
def test_peft_boolean_init_weights_mean_the_default_random_initialisation(value):
    assert PrefixPlusConfig(task_type="CAUSAL_LM", init_weights=value).init_weights == "random"


@pytest.mark.parametrize("how", ["get_peft_model", "add_adapter"])
def test_the_reserved_adapter_name_is_refused(how):
    base = tiny_model("llama")[0]
    config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    with pytest.raises(ValueError, match="'__base__' is reserved.*Choose another adapter name"):
        if how == "get_peft_model":
            get_peft_model(base, config, adapter_name="__base__")
        else:
            get_peft_model(base, config).add_adapter("__base__", copy.deepcopy(config))


def test_add_weighted_adapter_is_refused_with_the_way_to_combine_adapters():
    model = get_peft_model(tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.add_adapter("other", PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"add_weighted_adapter.*not supported.*set_adapter\(\['a', 'b'\]\)"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mixed")


def test_saving_warns_about_lora_layers_put_in_by_hand(tmp_path):
    from peft import inject_adapter_in_model

    model = get_peft_model(tiny_model("llama")[0], PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), model.base_model.model, adapter_name="lora")
    with pytest.warns(UserWarning, match=r"2 module\(s\) .*another PEFT method's adapter layers.*q_proj.*not in"):
        model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any("lora" in key for key in saved)  # the warning tells the truth
