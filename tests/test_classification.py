"""Classification with PrefixPlus: the head is filled into `modules_to_save`, trained, saved and reloaded."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_config
from peft import PeftModel, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from peft_prefix_plus import AdapterFileError, PrefixPlusConfig, export_to_peft, inspect_adapter, merge_mlp_files

# case: (family, model class, PEFT task type, name of the head module)
CLASSIFIERS = {
    "bert-sequence": ("bert", transformers.BertForSequenceClassification, "SEQ_CLS", "classifier"),
    "bert-token": ("bert", transformers.BertForTokenClassification, "TOKEN_CLS", "classifier"),
    "llama-sequence": ("llama", transformers.LlamaForSequenceClassification, "SEQ_CLS", "score"),
}
SEQ_LEN = 8
GROUP = 6


def toy_task(task_type: str, size: int, seed: int) -> list[dict]:
    """A separable two-class task (chance 0.5): a token's class is the group of 6 token ids it comes from.

    For sequence classification every token of a sequence comes from the group of its label; for token
    classification each token is labelled by its own group.
    """
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(size):
        if task_type == "SEQ_CLS":
            label = torch.randint(0, 2, (), generator=generator)
            labels = torch.full((SEQ_LEN,), int(label))
        else:
            labels = torch.randint(0, 2, (SEQ_LEN,), generator=generator)
            label = labels
        input_ids = 4 + labels * GROUP + torch.randint(0, GROUP, (SEQ_LEN,), generator=generator)
        examples.append(
            {"input_ids": input_ids, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": label}
        )
    return examples


def pretrained(case: str, directory, seed: int):
    """The classifier as `from_pretrained` gives it: the backbone from ``directory``, the head drawn with ``seed``."""
    family, model_cls, _, _ = CLASSIFIERS[case]
    if not (directory / "config.json").exists():  # the "pretrained" backbone, saved once
        torch.manual_seed(0)
        model_cls(tiny_config(family, num_labels=2)).base_model.save_pretrained(directory)
    torch.manual_seed(seed)
    return model_cls.from_pretrained(directory, num_labels=2)


def head_of(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    module = getattr(model, name)
    if hasattr(module, "modules_to_save"):
        module = module.modules_to_save["default"]
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def accuracy(model, examples: list[dict]) -> float:
    batch = transformers.default_data_collator(examples)
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    return (predicted == batch["labels"]).float().mean().item()


def train(model, examples: list[dict], output_dir) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=80,
        per_device_train_batch_size=16,
        learning_rate=3e-2,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=examples).train()


@pytest.mark.parametrize("case", list(CLASSIFIERS))
def test_classifier_learns_saves_and_reloads_on_a_fresh_base(case, tmp_path):
    _, _, task_type, head = CLASSIFIERS[case]
    base = pretrained(case, tmp_path / "pretrained", seed=0)
    reference = copy.deepcopy(base).eval()
    initial_head = head_of(base, head)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=4))
    assert head in model.peft_config["default"].modules_to_save  # filled in as PEFT does for its own methods
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(f"{head}.modules_to_save.default." in n for n in trainable)
    prefix_before = {n: p.detach().clone() for n, p in model.named_parameters() if "prefix_plus_sites" in n}

    train(model, toy_task(task_type, 512, seed=1), tmp_path / "run")
    model.eval()
    held_out = toy_task(task_type, 128, seed=2)
    assert accuracy(model, held_out) >= 0.9  # chance is 0.5
    trained_head = head_of(model.base_model.model, head)
    assert any(not torch.equal(trained_head[k], initial_head[k]) for k in initial_head)  # the head was trained
    assert all(not torch.equal(p, prefix_before[n]) for n, p in model.named_parameters() if n in prefix_before)

    # disabling the adapter disables its head too: the base model with its own head
    batch = transformers.default_data_collator(held_out[:8])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            assert torch.equal(model(**inputs).logits, reference(**inputs).logits)

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / SAFETENSORS_WEIGHTS_NAME)
    for key, value in trained_head.items():
        assert torch.equal(saved[f"base_model.model.{head}.{key}"], value)

    fresh = pretrained(case, tmp_path / "pretrained", seed=1)
    assert not torch.equal(head_of(fresh, head)["weight"], initial_head["weight"])  # another random head
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)

    # unload gives back the base model, with its own head
    unloaded = model.unload()
    assert type(getattr(unloaded, head)) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(unloaded(**inputs).logits, reference(**inputs).logits)


def test_each_adapter_has_its_own_head(tmp_path):
    base = pretrained("bert-sequence", tmp_path / "pretrained", seed=0)
    model = get_peft_model(base, PrefixPlusConfig(task_type="SEQ_CLS", num_virtual_tokens=3)).eval()
    model.add_adapter("other", PrefixPlusConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    wrapper = model.base_model.model.classifier
    assert set(wrapper.modules_to_save) == {"default", "other"}
    with torch.no_grad():
        wrapper.modules_to_save["other"].weight.add_(1.0)
    inputs = {"input_ids": torch.arange(4, 12).view(1, -1)}
    with torch.no_grad():
        default_logits = model(**inputs).logits
        model.set_adapter("other")
        assert not torch.allclose(model(**inputs).logits, default_logits)
    assert wrapper.modules_to_save["other"].weight.requires_grad
    assert not wrapper.modules_to_save["default"].weight.requires_grad

    model.delete_adapter("other")
    assert set(wrapper.modules_to_save) == {"default"}
    assert model.active_adapters == ["default"]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, default_logits)


def test_modules_to_save_chosen_by_the_user_are_trained_and_saved(tmp_path):
    """Outside classification, `modules_to_save` works as in LoRA: here Llama's final norm."""
    base = transformers.LlamaForCausalLM(tiny_config("llama"))
    reference = copy.deepcopy(base)
    model = get_peft_model(
        base, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, modules_to_save=["norm"])
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    input_ids = torch.arange(4, 12).view(1, -1)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    model.eval()
    trained = model.base_model.model.model.norm.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained, reference.model.norm.weight)
    model.save_pretrained(tmp_path)
    assert torch.equal(load_file(tmp_path / SAFETENSORS_WEIGHTS_NAME)["base_model.model.model.norm.weight"], trained)
    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_merge_and_inspect_carry_a_saved_head_export_refuses_it(tmp_path):
    """The file tools keep a classification head: merge carries it unchanged, inspect lists it, export refuses it."""
    base = pretrained("llama-sequence", tmp_path / "pretrained", seed=0)
    model = get_peft_model(base, PrefixPlusConfig(task_type="SEQ_CLS", num_virtual_tokens=3, mlp_depth=2)).eval()
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)  # a head unlike any fresh one
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / SAFETENSORS_WEIGHTS_NAME)

    assert inspect_adapter(tmp_path / "adapter")["modules_to_save"] == ["base_model.model.score.weight"]

    merge_mlp_files(tmp_path / "adapter", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / SAFETENSORS_WEIGHTS_NAME)
    assert torch.equal(merged["base_model.model.score.weight"], saved["base_model.model.score.weight"])
    assert inspect_adapter(tmp_path / "merged")["mlp"] == "raw"
    inputs = {"input_ids": torch.arange(4, 12).view(1, -1)}
    loaded = PeftModel.from_pretrained(
        pretrained("llama-sequence", tmp_path / "pretrained", seed=1), tmp_path / "merged"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)

    with pytest.raises(AdapterFileError, match="task_type is 'SEQ_CLS'.*CAUSAL_LM"):
        export_to_peft(tmp_path / "adapter", tmp_path / "stock")
    assert not (tmp_path / "stock").exists()


def test_export_to_stock_peft_carries_modules_to_save(tmp_path):
    """A causal LM adapter with `modules_to_save` exports to stock prefix tuning with the module, same logits."""
    base = transformers.LlamaForCausalLM(tiny_config("llama"))
    reference = copy.deepcopy(base)
    config = PrefixPlusConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, offset_position_ids=True, modules_to_save=["model.norm"]
    )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(2.0)
    model.save_pretrained(tmp_path / "adapter")
    export_to_peft(tmp_path / "adapter", tmp_path / "stock")
    stock = PeftModel.from_pretrained(reference, tmp_path / "stock").eval()
    assert stock.peft_config["default"].peft_type == "PREFIX_TUNING"
    input_ids = torch.arange(4, 12).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            stock(input_ids=input_ids).logits, model(input_ids=input_ids).logits, rtol=0, atol=1e-5
        )


def test_file_tools_read_what_peft_saves_for_a_module_name_suffix(tmp_path):
    """PEFT matches `modules_to_save` by string suffix: ["norm"] also saves Llama's per-layer norms."""
    base = transformers.LlamaForCausalLM(tiny_config("llama"))
    config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, modules_to_save=["norm"])
    get_peft_model(base, config).save_pretrained(tmp_path)
    assert len(inspect_adapter(tmp_path)["modules_to_save"]) == 5  # the final norm and two norms per layer


@pytest.mark.parametrize("case", ["bert-sequence", "bert-token"])
def test_mixed_batch_rows_use_their_own_adapters_head(case, tmp_path):
    """With `adapter_names`, each row gets its adapter's prefix and its adapter's copy of the head ("__base__": none)."""
    _, _, task_type, head = CLASSIFIERS[case]
    base = pretrained(case, tmp_path / "pretrained", seed=0)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=3)).eval()
    model.add_adapter("other", PrefixPlusConfig(task_type=task_type, num_virtual_tokens=2))
    with torch.no_grad():
        getattr(model.base_model.model, head).modules_to_save["other"].weight.add_(1.0)
    input_ids = torch.arange(4, 28).view(3, -1)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=input_ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=input_ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=0, atol=1e-6)
