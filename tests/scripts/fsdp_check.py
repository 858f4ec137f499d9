"""Launched by tests/test_ddp.py with ``torchrun --nproc_per_node 2`` on CPU: FSDP2 (`fully_shard`) training of a
PrefixPlus adapter; writes its findings as JSON.

Every prefix encoder (one per attention site: its embedding and MLP) is sharded with `fully_shard` on a 2-process CPU
mesh; the frozen base model is replicated. Each rank trains on its half of every global batch, in float64, and the
gathered adapter parameters are compared with a plain single-process run on the whole global batches. Accelerate's
FSDP plugin is ignored on CPU and FSDP1 needs an accelerator, hence raw FSDP2 here.

Usage: ``torchrun --nproc_per_node 2 tests/scripts/fsdp_check.py OUT.json``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_model  # noqa: E402

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.tuner import PrefixSiteEncoder  # noqa: E402

torch.set_default_dtype(torch.float64)
STEPS, GLOBAL_BATCH, SEQ, LR = 3, 4, 6, 1e-2
SITES = {"num_virtual_tokens": 4, "encoder_num_virtual_tokens": 2, "cross_num_virtual_tokens": 5}


def build(family: str):
    model, task_type = tiny_model(family, seed=0)
    kwargs = SITES if task_type == "SEQ_2_SEQ_LM" else {"num_virtual_tokens": 4}
    config = PrefixPlusConfig(task_type=task_type, mlp_hidden_size=16, mlp_depth=2, **kwargs)
    torch.manual_seed(1)
    return get_peft_model(model, config), task_type


def batches(task_type: str) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, 100, (GLOBAL_BATCH, SEQ), generator=g)
        labels = torch.randint(3, 100, (GLOBAL_BATCH, 4), generator=g) if task_type == "SEQ_2_SEQ_LM" else ids.clone()
        out.append({"input_ids": ids, "labels": labels})
    return out


def vector(model: torch.nn.Module) -> torch.Tensor:
    parts = []
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            parts.append((p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1))
    return torch.cat(parts)


def train(model: torch.nn.Module, data: list[dict], rank: int = 0, world: int = 1) -> torch.Tensor:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    share = GLOBAL_BATCH // world
    for batch in data:
        local = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
        model(**local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return vector(model)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    result: dict = {"world_size": world}
    sharded = total = 0
    worst = moved = 0.0
    for family in ("llama", "t5"):
        model, task_type = build(family)
        initial = vector(model)
        for module in model.modules():
            if isinstance(module, PrefixSiteEncoder):
                fully_shard(module, mesh=mesh)
        trainable = [p for p in model.parameters() if p.requires_grad]
        total += len(trainable)
        sharded += sum(isinstance(p, DTensor) for p in trainable)
        data = batches(task_type)
        mine = train(model, data, rank, world)
        if rank == 0:
            reference = train(build(family)[0], data)
            worst = max(worst, float((mine - reference).abs().max()))
            moved = max(moved, float((mine - initial).abs().max()))
        dist.barrier()
    result.update(
        sharded_params=sharded,
        all_adapter_params_sharded=sharded == total,
        reference_max_diff=worst,
        moved_from_init=moved,
    )
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
