"""The Hugging Face Trainer with a PrefixPlus model: training, checkpoints with the MLP, resume, best-model reload."""

from __future__ import annotations

import torch
from conftest import multimodal_batch, site_kwargs, tiny_model
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from peft_prefix_plus import PrefixPlusConfig


class Rows(torch.utils.data.Dataset):
    def __init__(self, count: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 100, (count, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.ids[i]}


def make_model():
    base, task_type = tiny_model("llama")
    torch.manual_seed(0)
    return get_peft_model(
        base, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=4, mlp_hidden_size=16, mlp_depth=2)
    )


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def make_trainer(model, out, max_steps: int, **kwargs) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(8, seed=1))


def test_trainer_trains_checkpoints_hold_the_mlp_and_resume_continues(tmp_path):
    model = make_model()
    initial = adapter_state(model)
    trainer = make_trainer(model, tmp_path, max_steps=4)
    trainer.train()
    final = adapter_state(model)
    assert all(not torch.equal(initial[n], final[n]) for n in initial)  # every adapter parameter was trained
    saved = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(".mlp." in key for key in saved) and any(".embedding." in key for key in saved)
    assert len(saved) == len(final)
    assert not any("layers." in key and "prefix_plus" not in key for key in saved)  # base model not saved

    # a fresh model resumed from checkpoint-2 continues to step 4 and ends where the uninterrupted run ended
    resumed_model = make_model()
    resumed = make_trainer(resumed_model, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    after = adapter_state(resumed_model)
    for name in final:
        torch.testing.assert_close(after[name], final[name], rtol=1e-5, atol=1e-6)


def test_trainer_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    model = make_model()
    # "best" is the *highest* eval loss, i.e. the first evaluation: the restored adapter must not be the last one
    trainer = make_trainer(
        model,
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    expected = load_file(f"{best}/adapter_model.safetensors")
    restored = {n.replace(".default", ""): p for n, p in adapter_state(model).items()}
    last = load_file(str(tmp_path / "checkpoint-6" / "adapter_model.safetensors"))
    assert set(expected) == set(restored)
    for key, value in expected.items():
        torch.testing.assert_close(restored[key], value)
    assert any(not torch.equal(expected[k], last[k]) for k in expected)
    # and the model evaluates as the best checkpoint did
    history = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert abs(trainer.evaluate()["eval_loss"] - history[0]) < 1e-5


class AudioRows(torch.utils.data.Dataset):
    """Whisper rows: log-mel features and decoder labels."""

    def __init__(self, count: int = 8) -> None:
        self.batch = multimodal_batch("whisper", batch_size=count)

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, i: int) -> dict:
        return {key: value[i] for key, value in self.batch.items()}


def test_seq2seq_trainer_trains_every_whisper_site(tmp_path):
    """Whisper from audio features: a Seq2SeqTrainer step changes every adapter parameter (encoder, decoder and
    cross-attention prefixes) and no base model weight."""
    base, task_type = tiny_model("whisper")
    model = get_peft_model(
        base, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=3, mlp_depth=2, **site_kwargs("SEQ_2_SEQ_LM"))
    )
    assert set(model.base_model._sites) == {"self", "encoder", "cross"}
    initial = adapter_state(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=AudioRows())
    assert trainer.train().training_loss > 0
    final = adapter_state(model)
    assert {n.split(".prefix_plus_sites.default.")[1].split(".")[0] for n in final} == {"self", "encoder", "cross"}
    assert all(not torch.equal(initial[n], final[n]) for n in initial)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
