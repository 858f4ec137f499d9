"""Where a PrefixPlus training step spends its time beyond the frozen base model (issue 14, section 2b).

On a small Llama (hidden 256, 4 layers, 8 query / 4 key-value heads, vocab 8192), prefix 16, batch 16 x 128, AdamW,
one run times, alternating:

- ``floor``: the frozen base model, forward and backward (input embeddings require grad, so the backward pass
  crosses every layer as it must for a prefix);
- ``pp_raw`` / ``pp_mlp``: PrefixPlus with raw prefixes / with its default MLP (``pp_mlp512``: MLP width 512);
- ``stock_proj``: stock PEFT ``PrefixTuningConfig(prefix_projection=True)`` with its default widths.

It then splits what the MLP adds over raw prefixes into the parts its arithmetic and optimizer state justify (the
prefix encoder's forward and backward alone, AdamW's step and ``zero_grad`` over its parameters), and lists the aten
operations whose self time differs most between ``pp_mlp`` and ``pp_raw`` in a ``torch.profiler`` trace.

Run from the repository root (``PYTHONPATH=<checkout>`` profiles another checkout of the package)::

    python -m benchmarks.profile_step --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from peft_prefix_plus import PrefixPlusConfig

METHODS = ("floor", "pp_raw", "pp_mlp", "pp_mlp512", "stock_proj")


def small_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def build(method: str, base: torch.nn.Module, batch: torch.Tensor, prefix: int) -> tuple[Callable, dict]:
    """One training step of ``method`` on a copy of ``base``, and its parts (model, optimizer, encoder)."""
    model = copy.deepcopy(base)
    if method == "floor":
        model.requires_grad_(False)

        def floor_step() -> None:
            embeddings = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            model(inputs_embeds=embeddings, labels=batch).loss.backward()

        return floor_step, {}
    if method == "stock_proj":
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix, prefix_projection=True)
    else:
        config = PrefixPlusConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix,
            prefix_projection=method != "pp_raw",
            mlp_hidden_size=512 if method == "pp_mlp512" else None,
        )
    model = peft.get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = {"model": model, "optimizer": optimizer}
    if method.startswith("pp"):
        parts["encoder"] = model.base_model.prefix_plus_layer.prefix_plus_sites["default"]["self"]
    return step, parts


def median_time(fn: Callable, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def component_times(parts: dict, repeats: int) -> dict[str, float]:
    """Seconds of the prefix encoder's forward and backward alone, and of AdamW's step and zero_grad."""
    encoder, optimizer = parts["encoder"], parts["optimizer"]

    def produce() -> None:
        encoder().sum().backward()

    def optimize() -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"encoder_fwd_bwd_s": median_time(produce, repeats), "adamw_s": median_time(optimize, repeats)}


def op_times(step: Callable, steps: int = 3) -> dict[str, float]:
    """Self CPU seconds per step of every aten operation in a profiler trace of ``steps`` steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {event.key: event.self_cpu_time_total / 1e6 / steps for event in prof.key_averages()}


def run(repeats: int = 9, prefix: int = 16, seed: int = 0) -> dict:
    base = small_llama(seed)
    batch = torch.randint(3, base.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(seed + 1))
    built = {method: build(method, base, batch, prefix) for method in METHODS}
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_index in range(repeats + 1):  # one warm-up round, then methods alternate A B C, C B A, ...
        for method in METHODS if round_index % 2 == 0 else METHODS[::-1]:
            start = time.perf_counter()
            built[method][0]()
            if round_index:
                times[method].append(time.perf_counter() - start)
    step_s = {method: statistics.median(values) for method, values in times.items()}
    components = {m: component_times(built[m][1], repeats) for m in ("pp_raw", "pp_mlp", "pp_mlp512")}
    raw_ops, mlp_ops = op_times(built["pp_raw"][0]), op_times(built["pp_mlp"][0])
    deltas = sorted(
        ((name, mlp_ops.get(name, 0.0) - raw_ops.get(name, 0.0)) for name in set(raw_ops) | set(mlp_ops)),
        key=lambda item: -abs(item[1]),
    )[:10]
    trainable = {
        m: sum(p.numel() for p in parts["model"].parameters() if p.requires_grad)
        for m, (_, parts) in built.items()
        if parts
    }
    return {
        "settings": {
            "model": "Llama, hidden 256, 4 layers, 8 query / 4 key-value heads, vocab 8192",
            "batch": "16 x 128",
            "prefix": prefix,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "step_s": step_s,
        "ratio_to_floor": {m: step_s[m] / step_s["floor"] for m in METHODS},
        "trainable_params": trainable,
        "components": components,
        "op_deltas_mlp_minus_raw_s": deltas,
    }


def markdown(result: dict) -> str:
    lines = ["| method | median step (ms) | x floor | trainable params |", "|---|---|---|---|"]
    for method in METHODS:
        lines.append(
            f"| {method} | {result['step_s'][method] * 1e3:.1f} | {result['ratio_to_floor'][method]:.3f} | "
            f"{result['trainable_params'].get(method, 0):,} |"
        )
    lines += ["", "| method | encoder forward+backward (ms) | AdamW step + zero_grad (ms) |", "|---|---|---|"]
    for method, parts in result["components"].items():
        lines.append(f"| {method} | {parts['encoder_fwd_bwd_s'] * 1e3:.2f} | {parts['adamw_s'] * 1e3:.2f} |")
    lines += ["", "| aten operation | pp_mlp − pp_raw self time per step (ms) |", "|---|---|"]
    lines += [f"| `{name}` | {delta * 1e3:+.2f} |" for name, delta in result["op_deltas_mlp_minus_raw_s"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="write profile_step.json and profile_step.md here")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    result = run(args.repeats)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_step.json").write_text(json.dumps(result, indent=2))
        (args.out / "profile_step.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
