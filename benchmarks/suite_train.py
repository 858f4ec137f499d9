"""Suite ``train`` (measurements 1 and 2): training step time and peak memory, PrefixPlus against stock PEFT.

One step is forward, backward and optimizer step (AdamW) on a fixed random batch of the ~20M-parameter Llama from
:func:`benchmarks.common.build_llama`, with a prefix of 32 virtual tokens. Methods, each on its own copy of the same
weights:

- ``floor``: the frozen base model, forward and backward with no prefix (the input embeddings require grad, so the
  backward pass runs through every layer as it must for prefixes; no optimizer step, nothing is trainable);
- ``stock_proj`` / ``stock_raw``: stock PEFT ``PrefixTuningConfig`` with ``prefix_projection=True`` (MLP width
  ``mlp_width``, ``encoder_hidden_size``) and ``False``;
- ``pp_proj`` / ``pp_raw``: PrefixPlus with the same MLP as stock's (width ``mlp_hidden_size``, input width
  ``token_dim`` set to stock's key/value width, see :func:`stock_token_dim`) and raw prefixes.

PrefixPlus's default MLP input width is the hidden size (384 here), as in Li & Liang's code; stock PEFT uses the
key/value width (128) on grouped-query models. Both are the same family of functions (the embedding has rank at most
the prefix length, 32), so the suite gives both methods the same MLP and compares the mechanics, not the default.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
import transformers

from peft_prefix_plus import PrefixPlusConfig

from .common import (
    RunOptions,
    alternate,
    build_llama,
    count_parameters,
    fresh_copy,
    measure_peak_memory,
    median,
    paired_ratio,
)

PREFIX_LENGTH = 32
MLP_WIDTH = 512
LEARNING_RATE = 1e-3
METHODS = ("floor", "stock_proj", "stock_raw", "pp_proj", "pp_raw")
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_SEQS = (128, 512)


def stock_token_dim(config: transformers.PretrainedConfig) -> int:
    """Stock PEFT's prefix embedding width: the key/value width (``hidden // heads * kv_heads``) on GQA models."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.hidden_size // config.num_attention_heads * kv_heads


def _peft_config(method: str, prefix_length: int, mlp_width: int, token_dim: int) -> peft.PeftConfig:
    if method.startswith("stock"):
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix_length,
            prefix_projection=method == "stock_proj",
            encoder_hidden_size=mlp_width,
        )
    return PrefixPlusConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prefix_length,
        prefix_projection=method == "pp_proj",
        mlp_hidden_size=mlp_width,
        token_dim=token_dim,
    )


def build_method(
    method: str,
    base: torch.nn.Module,
    device: str,
    prefix_length: int,
    mlp_width: int,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The model of ``method`` on a copy of ``base`` and a closure that runs one training step.

    The base weights, and the prefix parameters (hence the AdamW state), are in ``dtype`` on ``device``.
    """
    model = fresh_copy(base).to(device=device, dtype=dtype)
    if method == "floor":
        for param in model.parameters():
            param.requires_grad_(False)

        def floor_step(batch: torch.Tensor) -> None:
            embeddings = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            model(inputs_embeds=embeddings, labels=batch).loss.backward()

        return model, floor_step, 0
    config = _peft_config(method, prefix_length, mlp_width, stock_token_dim(base.config))
    model = peft.get_peft_model(model, config).to(dtype=dtype)  # PEFT may create the adapter in float32
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    model.train()

    def step(batch: torch.Tensor) -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, sum(p.numel() for p in trainable)


def run(options: RunOptions, batches: tuple[int, ...] = DEFAULT_BATCHES, seqs: tuple[int, ...] = DEFAULT_SEQS) -> dict:
    """Run the suite and return its results (settings, one row per batch x sequence x method, targets)."""
    device = options.device
    if options.smoke:
        batches, seqs = (2,), (16,)
    prefix_length = 4 if options.smoke else PREFIX_LENGTH
    mlp_width = 16 if options.smoke else MLP_WIDTH
    base = build_llama(options.seed, options.smoke)
    methods = {}
    for method in METHODS:
        model, step, trainable = build_method(method, base, device, prefix_length, mlp_width, options.torch_dtype)
        # persistent parameter and two AdamW moments, in the parameters' dtype; gradients are allocated within the
        # step (set to None after it), so the step's peak already holds them wherever they coincide with it
        state = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        methods[method] = {"model": model, "step": step, "trainable": trainable, "trainable_state_bytes": state}
    repeats, warmup = options.n_repeats(5), options.n_warmup()
    rows, memory_tool = [], None
    generator = torch.Generator().manual_seed(options.seed + 1)
    vocab = base.config.vocab_size
    for batch_size in batches:
        for seq in seqs:
            batch = torch.randint(3, vocab, (batch_size, seq), generator=generator).to(device)
            fns = {name: (lambda m=m, b=batch: m["step"](b)) for name, m in methods.items()}
            times, _ = alternate(fns, repeats, warmup, device)
            medians = ", ".join(f"{name} {median(t):.3f}s" for name, t in times.items())
            print(f"[train] batch {batch_size} seq {seq}: {medians}", flush=True)
            for name, entry in methods.items():
                peak, memory_tool = measure_peak_memory(lambda e=entry, b=batch: e["step"](b), device)
                rows.append(
                    {
                        "batch": batch_size,
                        "seq": seq,
                        "method": name,
                        "median_s": median(times[name]),
                        "times_s": times[name],
                        "peak_step_bytes": peak,
                        "trainable_params": entry["trainable"],
                        "peak_with_trainable_state_bytes": peak + entry["trainable_state_bytes"],
                    }
                )
    return {
        "suite": "train",
        "settings": {
            "model": f"Llama, {count_parameters(base) / 1e6:.1f}M parameters, hidden {base.config.hidden_size}, "
            f"{base.config.num_hidden_layers} layers, {base.config.num_attention_heads} query / "
            f"{base.config.num_key_value_heads} key-value heads (GQA), vocab {vocab}",
            "prefix_length": prefix_length,
            "mlp_width": mlp_width,
            "mlp_input_width": f"{stock_token_dim(base.config)} for stock and PrefixPlus (stock's key/value width)",
            "optimizer": f"AdamW lr {LEARNING_RATE}",
            "batches": list(batches),
            "seqs": list(seqs),
            "repeats": repeats,
            "warmup": warmup,
            "memory_tool": memory_tool,
            "device": device,
            "dtype": options.dtype,
        },
        "rows": rows,
        "targets": targets(rows),
        "notes": floor_notes(rows),
    }


def floor_notes(rows: list[dict]) -> list[str]:
    """How close to stock PEFT even a free prefix could get: the floor's step time over stock's, per configuration."""
    notes = []
    for batch, seq in sorted({(r["batch"], r["seq"]) for r in rows}):
        bounds = ", ".join(
            f"{_lookup(rows, batch, seq, 'floor', 'median_s') / _lookup(rows, batch, seq, stock, 'median_s'):.2f}x "
            f"{stock}"
            for stock in ("stock_proj", "stock_raw")
        )
        notes.append(f"Batch {batch}, seq {seq}: the floor (no prefix at all) takes {bounds}.")
    return [
        "Lower bound of the step-time ratios: a prefix method that cost nothing would run at the floor's speed. "
        + " ".join(notes)
    ]


def _lookup(rows: list[dict], batch: int, seq: int, method: str, key: str) -> float:
    return next(r[key] for r in rows if (r["batch"], r["seq"], r["method"]) == (batch, seq, method))


def targets(rows: list[dict]) -> list[dict]:
    """Compare the rows with the issue's targets; one verdict per (target, batch, seq)."""
    verdicts = []
    configs = sorted({(r["batch"], r["seq"]) for r in rows})
    checks = [
        # (what, numerator, denominator, key, limit, applies to batch >= )
        ("step time", "pp_proj", "stock_proj", "median_s", 0.9, 8),
        ("step time", "pp_raw", "stock_raw", "median_s", 1.0, 1),
        ("step time", "pp_proj", "floor", "median_s", 1.15, 1),
        ("step time", "pp_raw", "floor", "median_s", 1.15, 1),
        ("step time (issue 14)", "pp_proj", "floor", "median_s", 1.05, 8),
        ("peak memory", "pp_proj", "stock_proj", "peak_with_trainable_state_bytes", 1.0, 1),
        ("peak memory", "pp_raw", "stock_raw", "peak_with_trainable_state_bytes", 1.0, 1),
    ]
    for what, num, den, key, limit, min_batch in checks:
        for batch, seq in configs:
            ratio = _lookup(rows, batch, seq, num, key) / max(_lookup(rows, batch, seq, den, key), 1e-12)
            applies = batch >= min_batch
            paired = None
            if key == "median_s":
                paired = paired_ratio(
                    _lookup(rows, batch, seq, num, "times_s"), _lookup(rows, batch, seq, den, "times_s")
                )
            verdicts.append(
                {
                    "measurement": what,
                    "case": f"batch {batch}, seq {seq}",
                    "comparison": f"{num} / {den}",
                    "ratio": ratio,
                    "paired_ratio": paired,
                    "target": f"<= {limit}" if applies else f"(target <= {limit} applies at batch >= {min_batch})",
                    "met": (ratio <= limit) if applies else None,
                }
            )
    return verdicts


def plot(result: dict, out_dir: str) -> list[str]:
    """Bar charts of median step time and peak memory per configuration and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    configs = sorted({(r["batch"], r["seq"]) for r in rows})
    files = []
    for key, label, scale, name in (
        ("median_s", "median step time (s)", 1.0, "train_step_time.png"),
        ("peak_with_trainable_state_bytes", "peak step memory (MiB)", 2**-20, "train_peak_memory.png"),
    ):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            values = [_lookup(rows, b, s, method, key) * scale for b, s in configs]
            ax.bar([c + i * width for c in range(len(configs))], values, width, label=method)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(configs))])
        ax.set_xticklabels([f"b{b} s{s}" for b, s in configs])
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"Training step, prefix {result['settings']['prefix_length']} ({result['settings']['device']})")
        fig.tight_layout()
        path = f"{out_dir}/{name}"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(name)
    return files
