"""Merging the prefix MLP into raw prefixes: in memory, on disk, and through save, reload and the Trainer."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import batch_for, site_kwargs, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_text_init import TEXT, tokenizer_dir  # noqa: F401 - the fixture, shared

from peft_prefix_plus import PrefixPlusConfig, inspect_adapter, merge_mlp_files
from peft_prefix_plus.tuner.config import site_layer_shapes

# (family, extra config): GPT-2, Llama with GQA and a deep gelu MLP of another width, T5 and BART with all three
# sites at different lengths (site_kwargs), and layers_to_transform subsets.
CASES = {
    "gpt2": ("gpt2", {}),
    "llama-deep-gelu": ("llama", {"mlp_depth": 3, "mlp_activation": "gelu", "mlp_hidden_size": 24}),
    "t5": ("t5", {"mlp_depth": 2}),
    "bart": ("bart", {}),
    "llama-layers": ("llama", {"layers_to_transform": [1]}),
    "t5-layers": ("t5", {"layers_to_transform": [0]}),
    "deepseek_v3-mla": ("deepseek_v3", {"mlp_depth": 2}),  # keys wider than values
    "gemma4-per-layer": ("gemma4", {}),  # the full layer's head dim differs
    "gemma4-layers": ("gemma4", {"layers_to_transform": [2, 3]}),  # one sliding and the full layer
}
FP32_TOLERANCE = 1e-5
# bf16 base: the merge computes in float32 and rounds once to the adapter's dtype. With the adapter in float32 (PEFT's
# default autocast) the logits are unchanged; with the adapter cast to bf16 the merged prefix can differ by one bf16
# ulp from the bf16 MLP's output. Measured max abs logit difference on the tiny Llama (|logits| <= 0.43): 0.0 and
# 0.00195 (one bf16 ulp at that magnitude). The documented tolerance is 1e-2.
BF16_TOLERANCE = 1e-2


def make_peft_model(family: str, seed: int = 0, dtype: torch.dtype | None = None, **overrides):
    base, task_type = tiny_model(family, seed=seed)
    if dtype is not None:
        base = base.to(dtype)
    config = PrefixPlusConfig(task_type=task_type, num_virtual_tokens=3, **{**site_kwargs(task_type), **overrides})
    return get_peft_model(base, config), task_type


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def raw_parameter_count(model) -> int:
    """Σ over sites and transformed layers of prefix length × heads × (key dim + value dim), from the config."""
    config = model.peft_config["default"]
    lengths = config.site_lengths(bool(getattr(model.base_model.model.config, "is_encoder_decoder", False)))
    total = 0
    for site, length in lengths.items():
        layer_shapes = site_layer_shapes(config.site_shapes[site])
        layers = config.layers_to_transform or range(len(layer_shapes))
        total += length * sum(heads * (keys + values) for heads, keys, values in (layer_shapes[i] for i in layers))
    return total


def site_encoders(model, adapter: str = "default"):
    return model.base_model.model.prefix_plus_layer.prefix_plus_sites[adapter]


@pytest.mark.parametrize("case", list(CASES))
def test_merge_mlp_in_memory_and_on_disk(case, tmp_path):
    family, overrides = CASES[case]
    model, task_type = make_peft_model(family, **overrides)
    batch = batch_for(task_type)
    before = logits(model, batch)
    mlp_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "src")  # a checkpoint: keeps the MLP

    assert model.merge_mlp() == ["default"]

    after = logits(model, batch)
    assert (before - after).abs().max().item() <= FP32_TOLERANCE
    # the MLP is gone: no embedding, no Linear, only raw prefixes, in float32
    for encoder in site_encoders(model).values():
        assert not encoder.is_projected
        assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in encoder.modules())
        assert encoder.prefix.dtype == torch.float32 and encoder.prefix.shape == encoder.shape
    config = model.peft_config["default"]
    assert config.prefix_projection is False
    assert config.merged_from["depth"] == overrides.get("mlp_depth", 1)
    assert config.merged_from["activation"] == overrides.get("mlp_activation", "tanh")
    assert config.merged_from["hidden_size"] == overrides.get("mlp_hidden_size", config.token_dim)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == raw_parameter_count(model) < mlp_params
    if family in ("t5", "bart"):
        assert set(site_encoders(model)) == {"self", "encoder", "cross"}

    # save: only raw prefixes, within 1% + 4 KiB of the raw tensor bytes
    model.save_pretrained(tmp_path / "memory")
    tensors = load_file(tmp_path / "memory" / "adapter_model.safetensors")
    assert all(key.endswith(".prefix") for key in tensors)
    raw_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert raw_bytes == trainable * 4
    size = (tmp_path / "memory" / "adapter_model.safetensors").stat().st_size
    assert size <= raw_bytes * 1.01 + 4096

    # on disk, from the checkpoint files only: identical tensors and config
    source_files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    merge_mlp_files(tmp_path / "src", tmp_path / "disk")
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == source_files  # SRC untouched
    on_disk = load_file(tmp_path / "disk" / "adapter_model.safetensors")
    assert on_disk.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(on_disk[key], tensors[key]), key
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("memory", "disk")]
    assert configs[0] == configs[1]
    assert inspect_adapter(tmp_path / "disk")["merged"] is True
    assert "yes, from" in (tmp_path / "disk" / "README.md").read_text()  # the copied model card shows the merge

    # both reload onto a fresh base model with the same outputs
    for directory in ("memory", "disk"):
        base, _ = tiny_model(family)
        reloaded = PeftModel.from_pretrained(base, tmp_path / directory)
        assert (logits(reloaded, batch) - before).abs().max().item() <= FP32_TOLERANCE


def test_on_disk_merge_of_a_text_initialised_mlp_equals_the_in_memory_merge(tokenizer_dir, tmp_path):  # noqa: F811
    """The saved ``prefix_init`` buffer reaches the on-disk merge: it uses the real encoders and merge function."""
    text = {"init_weights": "text", "init_text": TEXT, "tokenizer_name_or_path": tokenizer_dir}
    model, _ = make_peft_model("llama", mlp_depth=2, **text)
    with torch.no_grad():  # a trained-looking MLP, so that the merge adds the MLP's output to prefix_init
        for param in site_encoders(model)["self"].mlp.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "src")
    assert any(key.endswith("prefix_init") for key in load_file(tmp_path / "src" / "adapter_model.safetensors"))
    model.merge_mlp()
    model.save_pretrained(tmp_path / "memory")
    merge_mlp_files(tmp_path / "src", tmp_path / "disk")
    memory, disk = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("memory", "disk"))
    assert memory.keys() == disk.keys() and all(torch.equal(memory[key], disk[key]) for key in memory)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_merge_bf16_base(adapter_dtype, tmp_path):
    """A bf16 base model: the merge runs in float32 and the outputs agree within BF16_TOLERANCE."""
    model, task_type = make_peft_model("llama", dtype=torch.bfloat16, mlp_depth=2, mlp_activation="gelu")
    if adapter_dtype == torch.bfloat16:
        model = model.to(torch.bfloat16)
    encoder = site_encoders(model)["self"]
    assert encoder.mlp[0].weight.dtype == adapter_dtype
    # the reference: the same MLP run in float32 from the (possibly bf16) weights, rounded once to the adapter dtype
    with torch.no_grad():
        reference_mlp = copy.deepcopy(encoder.mlp).float()
        out = reference_mlp(encoder.embedding.weight.float())
        layers, _, heads, length, head_dim = encoder.shape
        reference = out.view(length, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4).to(adapter_dtype)
    batch = batch_for(task_type)
    before = logits(model, batch)
    model.merge_mlp()
    after = logits(model, batch)
    merged = site_encoders(model)["self"].prefix
    assert merged.dtype == adapter_dtype
    assert torch.equal(merged, reference)  # computed in float32, not in bf16
    assert (before - after).abs().max().item() <= BF16_TOLERANCE
    model.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert [t.dtype for t in saved.values()] == [adapter_dtype]


def test_merge_raw_adapter_is_a_noop(tmp_path):
    model, task_type = make_peft_model("gpt2", prefix_projection=False)
    prefix = site_encoders(model)["self"].prefix.detach().clone()
    with pytest.warns(UserWarning, match="already holds raw prefixes"):
        assert model.merge_mlp() == []
    assert torch.equal(site_encoders(model)["self"].prefix, prefix)
    assert model.peft_config["default"].merged_from is None

    model.save_pretrained(tmp_path / "raw")
    with pytest.warns(UserWarning, match="already holds raw prefixes"):
        merge_mlp_files(tmp_path / "raw", tmp_path / "copy")
    copied = load_file(tmp_path / "copy" / "adapter_model.safetensors")
    original = load_file(tmp_path / "raw" / "adapter_model.safetensors")
    assert copied.keys() == original.keys() and all(torch.equal(copied[k], original[k]) for k in copied)


def test_merge_named_adapter_only():
    model, _ = make_peft_model("gpt2")
    model.add_adapter("other", PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, mlp_depth=2))
    assert model.merge_mlp(adapter_names=["other"]) == ["other"]
    assert site_encoders(model, "default")["self"].is_projected
    assert not site_encoders(model, "other")["self"].is_projected
    with pytest.raises(ValueError, match="No PrefixPlus adapter named"):
        model.merge_mlp(adapter_names=["missing"])


def test_save_keeps_mlp_and_merged_adapter_keeps_training(tmp_path):
    model, task_type = make_peft_model("llama", mlp_depth=2)
    model.save_pretrained(tmp_path / "checkpoint")
    saved = json.loads((tmp_path / "checkpoint" / "adapter_config.json").read_text())
    keys = load_file(tmp_path / "checkpoint" / "adapter_model.safetensors")
    assert saved["prefix_projection"] is True and saved["merged_from"] is None  # nothing merges implicitly
    assert any(".mlp." in key for key in keys) and any(".embedding." in key for key in keys)

    model.merge_mlp()
    model.save_pretrained(tmp_path / "merged")
    base, _ = tiny_model("llama")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "merged", is_trainable=True)
    trainable = {n: p for n, p in reloaded.named_parameters() if p.requires_grad}
    assert all(name.endswith(".prefix") for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == raw_parameter_count(reloaded)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    batch = batch_for(task_type)
    reloaded.train()
    losses = []
    for _ in range(5):
        loss = reloaded(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(start[n], p) for n, p in trainable.items())


def test_trainer_load_best_model_at_end_keeps_mlp(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, task_type = make_peft_model("gpt2", mlp_depth=2)
    rows = [
        {k: v[i] for k, v in batch_for(task_type, batch_size=4, seed=s).items()} for s in range(2) for i in range(4)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        logging_strategy="no",
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4])
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    keys = load_file(f"{best}/adapter_model.safetensors")
    assert any(".mlp." in key for key in keys)  # the checkpoint keeps the MLP: resumable
    assert json.loads((tmp_path / "out" / best.split("/")[-1] / "adapter_config.json").read_text())[
        "prefix_projection"
    ]
    assert site_encoders(model)["self"].is_projected  # the best model was loaded back, MLP and all
    best_tensors = load_file(f"{best}/adapter_model.safetensors")
    for name, param in site_encoders(model)["self"].named_parameters():
        key = f"base_model.model.prefix_plus_layer.prefix_plus_sites.self.{name}"
        assert torch.equal(param.detach().cpu(), best_tensors[key])
    assert model.merge_mlp() == ["default"]  # and it merges afterwards


def test_merging_one_model_leaves_a_shared_config_object_alone(tmp_path):
    """PEFT keeps the config object passed to `get_peft_model`; merging one model must not mark another's config."""
    config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    merged = get_peft_model(tiny_model("llama")[0], config)
    other = get_peft_model(tiny_model("llama")[0], config)
    merged.merge_mlp()
    assert merged.peft_config["default"].prefix_projection is False
    assert config.prefix_projection is True and config.merged_from is None
    other.save_pretrained(tmp_path)  # still an MLP adapter, saved and loaded as one
    batch = batch_for("CAUSAL_LM")
    loaded = PeftModel.from_pretrained(tiny_model("llama")[0], tmp_path).eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, other(**batch).logits)


@pytest.mark.parametrize("family", ["deepseek_v3", "gemma4"])
def test_per_layer_geometry_is_described_and_refused_by_stock_export(family, tmp_path):
    """`inspect` and the model card show each layer's shape; stock PEFT has one shape for all layers, so export is
    refused naming the shapes, and nothing is written."""
    from peft_prefix_plus import AdapterFileError, export_to_peft

    model, _ = make_peft_model(family, offset_position_ids=True, prefix_projection=False)
    model.save_pretrained(tmp_path / "src")
    shapes = inspect_adapter(tmp_path / "src")["sites"]["self"]["layer_shapes"]
    expected = {"deepseek_v3": [[4, 24, 12]] * 2, "gemma4": [[2, 16, 16]] * 3 + [[2, 32, 32]]}[family]
    assert shapes == expected
    card = (tmp_path / "src" / "README.md").read_text()
    assert {"deepseek_v3": "4 × 24 keys, 12 values", "gemma4": "3 layers 2 × 16, 1 layer 2 × 32"}[family] in card
    with pytest.raises(AdapterFileError, match="layers differ in key/value heads or head dimension"):
        export_to_peft(tmp_path / "src", tmp_path / "stock")
    assert not (tmp_path / "stock").exists()
