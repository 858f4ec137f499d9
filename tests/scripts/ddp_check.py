"""Launched by tests/test_ddp.py with 2 processes (``accelerate launch`` on CPU); writes its findings as JSON.

One launch checks several things, to keep CI fast:

- the launch really gives 2 processes and wraps the model in `DistributedDataParallel`;
- DDP equivalence in float64: after N optimizer steps both ranks hold identical adapter parameters, equal to a plain
  single-process run (no Accelerate) over the same global batches, with and without gradient accumulation, for a
  decoder-only model (Llama) and an encoder-decoder model (T5) with all three sites;
- configurations where parameters could go unused (``layers_to_transform``, a site of length 0) train under DDP
  without ``find_unused_parameters``;
- resume: a run resumed from its step-k checkpoint (``peft_prefix_plus.training.checkpointing``) holds, at step 2k, the
  parameters of the uninterrupted run, with a shuffled seeded dataloader (``examples/training_utils.py``), gradient
  accumulation, an epoch boundary, prefix dropout (so the RNG state must be restored too) and a learning-rate schedule
  prepared with Accelerate (saved as ``scheduler.bin``, loaded with ``weights_only=True``).

Usage: ``accelerate launch ... tests/scripts/ddp_check.py OUT.json WORK_DIR``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from conftest import tiny_model  # noqa: E402
from training_utils import make_dataloader, resume_position  # noqa: E402

from peft_prefix_plus import PrefixPlusConfig  # noqa: E402
from peft_prefix_plus.training.checkpointing import (  # noqa: E402
    load_checkpoint,
    register_adapter_checkpointing,
    save_checkpoint,
)

torch.set_default_dtype(torch.float64)
PER_RANK_BATCH, SEQ, LR = 2, 6, 1e-2


def make_rows(task_type: str, count: int, seed: int = 0) -> list[dict]:
    """Fixed-length, unpadded examples: every example has the same number of target tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 100, (SEQ,), generator=g)
        labels = torch.randint(3, 100, (4,), generator=g) if task_type == "SEQ_2_SEQ_LM" else ids.clone()
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels})
    return rows


def build(family: str, adapter_kwargs: dict):
    model, task_type = tiny_model(family, seed=0)
    config = PrefixPlusConfig(task_type=task_type, mlp_hidden_size=16, mlp_depth=2, **adapter_kwargs)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config)
    return peft_model, task_type


def adapter_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for n, p in sorted(model.named_parameters()) if p.requires_grad])


def run_accelerate(
    accelerator: Accelerator,
    family: str,
    adapter_kwargs: dict,
    accum: int,
    steps: int,
    rows,
    shuffle=False,
    checkpoint_at=None,
    resume_from=None,
    workdir=None,
    schedule_steps=None,
) -> torch.Tensor:
    """Train with Accelerate (DDP when launched with 2 processes); return this rank's adapter parameters."""
    accelerator.free_memory()
    accelerator._custom_objects.clear()
    accelerator.gradient_accumulation_steps = accum
    model, _ = build(family, adapter_kwargs)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    loader = make_dataloader(rows, PER_RANK_BATCH, shuffle=shuffle, seed=7)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = None
    if schedule_steps:
        # a prepared scheduler steps once per process at each optimizer step: lengths are given in those units
        world = accelerator.num_processes
        scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 2 * world, schedule_steps * world)
        scheduler = accelerator.prepare(scheduler)
    assert accelerator.num_processes == 1 or isinstance(model, DistributedDataParallel), type(model)
    step = 0
    if resume_from is not None:
        step = load_checkpoint(accelerator, resume_from)["step"]
    epoch, skip = resume_position(step, len(loader), accum)
    while step < steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                if checkpoint_at == step:
                    save_checkpoint(accelerator, Path(workdir) / "checkpoints", step)
                if step == steps:
                    break
        epoch += 1
    return adapter_vector(accelerator.unwrap_model(model))


def run_reference(family: str, adapter_kwargs: dict, accum: int, steps: int, rows, world: int) -> torch.Tensor:
    """Plain PyTorch, one process: each optimizer step on the whole global batch of the DDP run."""
    model, _ = build(family, adapter_kwargs)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    global_batch = PER_RANK_BATCH * world * accum
    for step in range(steps):
        chunk = rows[step * global_batch : (step + 1) * global_batch]
        batch = {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return adapter_vector(model)


def main() -> None:
    out_path, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    register_adapter_checkpointing(accelerator)
    world = accelerator.num_processes
    result: dict = {
        "num_processes": world,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "distributed_type": str(accelerator.distributed_type),
        "multi_cpu": accelerator.distributed_type == DistributedType.MULTI_CPU,
        "equivalence": {},
        "resume": {},
    }
    t5_sites = {"num_virtual_tokens": 4, "encoder_num_virtual_tokens": 2, "cross_num_virtual_tokens": 5}
    scenarios = {
        "llama": ("llama", {"num_virtual_tokens": 4}),
        "t5_all_sites": ("t5", t5_sites),
        "llama_layers_to_transform": ("llama", {"num_virtual_tokens": 4, "layers_to_transform": [1]}),
        "t5_encoder_length_0": ("t5", {**t5_sites, "encoder_num_virtual_tokens": 0}),
        "bart_cross_length_0_layer_0": (
            "bart",
            {"num_virtual_tokens": 3, "cross_num_virtual_tokens": 0, "layers_to_transform": [0]},
        ),
    }
    steps = 3
    for name, (family, kwargs) in scenarios.items():
        for accum in (1, 2) if name in ("llama", "t5_all_sites") else (2,):
            task_type = build(family, kwargs)[1]
            rows = make_rows(task_type, PER_RANK_BATCH * world * accum * steps)
            mine = run_accelerate(accelerator, family, kwargs, accum, steps, rows)
            everyone = accelerator.gather(mine.unsqueeze(0))
            entry = {"ranks_max_diff": float((everyone - everyone[0]).abs().max())}
            if accelerator.is_main_process:
                reference = run_reference(family, kwargs, accum, steps, rows, world)
                initial = adapter_vector(build(family, kwargs)[0])
                entry["reference_max_diff"] = float((mine - reference).abs().max())
                entry["moved_from_init"] = float((mine - initial).abs().max())
                entry["num_params"] = mine.numel()
            result["equivalence"][f"{name}/accum{accum}"] = entry
            accelerator.wait_for_everyone()

    # resume: k = 3 steps, then to 2k = 6; 16 examples, accumulation 2 -> 2 steps per epoch
    kwargs = {"num_virtual_tokens": 4, "prefix_dropout": 0.2}
    rows = make_rows("CAUSAL_LM", 16, seed=3)
    torch.manual_seed(123)
    straight = run_accelerate(
        accelerator, "llama", kwargs, 2, 6, rows, shuffle=True, checkpoint_at=3, workdir=workdir, schedule_steps=6
    )
    torch.manual_seed(999)  # a different RNG state before resuming: the checkpoint must restore it
    resumed = run_accelerate(
        accelerator,
        "llama",
        kwargs,
        2,
        6,
        rows,
        shuffle=True,
        resume_from=workdir / "checkpoints" / "checkpoint-3",
        schedule_steps=6,
    )
    torch.manual_seed(999)
    no_resume = run_accelerate(accelerator, "llama", kwargs, 2, 3, rows, shuffle=True, schedule_steps=6)
    result["resume"] = {
        "max_diff": float((straight - resumed).abs().max()),
        "diff_from_3_steps": float((straight - no_resume).abs().max()),
        "checkpoint_files": sorted(p.name for p in (workdir / "checkpoints" / "checkpoint-3").iterdir()),
    }
    if accelerator.is_main_process:
        out_path.write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
