"""TRL as a first-class path: `SFTTrainer` and `DPOTrainer` with `peft_config=PrefixPlusConfig(...)` on a tiny Llama,
and the SFT example."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_prefix_plus import PrefixPlusConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def load_example():
    """examples/sft_trl.py as a module, with examples/ on the path as when it is run as a script."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("sft_trl", EXAMPLES / "sft_trl.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_trains_a_prefix_plus_adapter(packing, example, tiny_chat_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    dataset = example.chat_dataset(EXAMPLES / "data" / "train.jsonl", limit=48)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=256,
        packing=packing,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    assert config.gradient_checkpointing  # TRL's default, which stock prefix tuning cannot train with
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, mlp_hidden_size=16),
    )
    if packing:  # several conversations per sequence
        assert len(trainer.train_dataset) < len(dataset)
        assert max(len(lengths) for lengths in trainer.train_dataset["seq_lengths"]) > 1
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all(".prefix_plus_sites.default." in n for n in before)

    trainer.train()

    assert trainer.model.base_model.model.is_gradient_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], value) for n, value in before.items())  # every prefix parameter moved

    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "PREFIX_PLUS"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model), tmp_path / "adapter")
    input_ids = torch.tensor([[3, 10, 20, 30]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=input_ids).logits, trainer.model(input_ids=input_ids).logits)


def test_sft_example_runs(example, tiny_chat_model, tmp_path):
    summary = example.main(
        [
            "--model",
            str(tiny_chat_model),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--batch_size",
            "4",
            "--max_length",
            "256",
            "--num_virtual_tokens",
            "4",
            "--mlp_hidden_size",
            "16",
            "--logging_steps",
            "1",
            "--max_new_tokens",
            "4",
            "--packing",
        ]
    )
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert summary["gradient_checkpointing"] and summary["packing"]
    assert (tmp_path / "out" / SAFETENSORS_WEIGHTS_NAME).is_file()
    assert (tmp_path / "out" / CONFIG_NAME).is_file()


def test_dpo_trainer_trains_a_prefix_plus_adapter(tiny_chat_model, tmp_path):
    """`DPOTrainer(peft_config=PrefixPlusConfig(...))` trains the prefix with TRL's default gradient checkpointing
    (`DPOConfig.gradient_checkpointing` defaults to True in TRL 1.16); the reference log-probs come from the same
    model with the adapter disabled (`peft_model.disable_adapter()`), as TRL does for a new PEFT adapter."""
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    dataset = Dataset.from_dict(
        {
            "prompt": [
                "Describe the restaurant in one sentence.",
                "Name: The Eagle, food: French.",
                "Area: city centre.",
            ]
            * 2,
            "chosen": [" The Eagle is a French restaurant.", " It serves French food.", " It is in the city centre."]
            * 2,
            "rejected": [" No.", " The Eagle is a coffee shop near the river.", " Riverside."] * 2,
        }
    )
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=64,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    assert config.gradient_checkpointing  # TRL's default, which stock prefix tuning cannot train with
    trainer = trl.DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, mlp_hidden_size=16),
    )
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    assert list(trainer.model.peft_config) == ["default"]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all(".prefix_plus_sites.default." in n for n in before)

    trainer.train()

    assert trainer.model.base_model.model.is_gradient_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and math.isfinite(losses[0])
    # the reference (adapter disabled) differs from the policy, whose prefix starts random: nonzero implicit reward
    assert trainer.state.log_history[0]["rewards/chosen"] != 0
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], value) for n, value in before.items())  # every prefix parameter moved
