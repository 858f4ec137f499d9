"""Which scaled-dot-product-attention kernel runs, for the base model and for PrefixPlus, with and without padding.

PyTorch's ``scaled_dot_product_attention`` picks a backend per call: on CUDA flash, memory-efficient, cuDNN or the
math fallback (which materialises the attention matrix); on the CPU its own flash kernel or math. Whether a prefix
keeps the fused kernels depends on what reaches sdpa (a mask tensor, ``is_causal``, a causal bias, the dtype), so
this tool does not ask the library: it runs the models under :class:`torch.profiler.profile` and reads which aten
kernel operations ran (``aten::_scaled_dot_product_flash_attention``, ``aten::_efficient_attention_forward``,
``aten::_scaled_dot_product_attention_math``, ``aten::_scaled_dot_product_flash_attention_for_cpu``, …), with the
arguments sdpa received (mask shape, ``is_causal``) and, on CUDA, the GPU kernels launched. Attention computed by
hand, outside sdpa, shows as ``none: eager softmax``.

Cases: the base model and the same model with a PrefixPlus adapter (prefix of 16, the default MLP), each on an
unpadded batch (attention mask of ones) and on a batch whose first row is left-padded; per case three phases:

- ``train``: one training forward and backward pass (query length = key length, causal);
- ``prefill``: the prompt's forward pass inside ``generate``;
- ``decode``: the last decoding step of that ``generate`` call (one query against the KV cache).

The phases of ``generate`` are told apart by a forward pre-hook and hook on the transformers model that wrap each
call in a profiler range (nothing in the library is hooked).

Example::

    python -m benchmarks.sdpa_kernels --device cuda --dtype bfloat16 --out benchmarks/results_cuda
    python -m benchmarks.sdpa_kernels --smoke --out /tmp/kernels     # tiny model on the CPU

It writes ``sdpa_kernels.json`` (every figure) and ``sdpa_kernels.md`` (one table) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also runs as `python benchmarks/sdpa_kernels.py`
    sys.path.insert(0, str(REPO))

import peft  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import DTYPES, build_llama  # noqa: E402
from peft_prefix_plus import PrefixPlusConfig  # noqa: E402

PREFIX_LENGTH = 16
NEW_TOKENS = 3
#: Range names that mark each forward call of the model inside ``generate``.
CALL_RANGE = "sdpa_kernels.call_"
#: Substrings of GPU kernel names that belong to attention (flash, cutlass memory-efficient "fmha", cuDNN sdpa).
GPU_ATTENTION_MARKERS = ("flash", "fmha", "attention", "sdpa", "attn")


def kernel_of(op_name: str) -> str | None:
    """The sdpa backend an aten operation belongs to, or ``None`` for any other operation.

    Example::

        >>> kernel_of("aten::_scaled_dot_product_flash_attention_for_cpu")
        'flash (CPU)'
        >>> kernel_of("aten::_efficient_attention_forward")
        'efficient'
    """
    name = op_name.removeprefix("aten::")
    if not name.startswith("_") or "attention" not in name:
        return None
    if "flash_attention" in name:
        return "flash (CPU)" if "for_cpu" in name else "flash"
    if "efficient_attention" in name:
        return "efficient"
    if "cudnn_attention" in name:
        return "cudnn"
    if "attention_math" in name:
        return "math"
    if "fused_attention_overrideable" in name:
        return "overrideable"
    return None


def _ancestors(event: Any) -> list[Any]:
    found, parent = [], getattr(event, "cpu_parent", None)
    while parent is not None:
        found.append(parent)
        parent = getattr(parent, "cpu_parent", None)
    return found


def _phase_call(event: Any) -> int | None:
    for ancestor in _ancestors(event):
        if ancestor.name.startswith(CALL_RANGE):
            return int(ancestor.name.removeprefix(CALL_RANGE))
    return None


def _gpu_kernels(event: Any) -> list[str]:
    """Names of the GPU kernels launched by ``event`` and the operations under it."""
    names = [k.name for k in getattr(event, "kernels", [])]
    for child in getattr(event, "cpu_children", []):
        names += _gpu_kernels(child)
    return names


def summarise(events: list[Any]) -> dict[str, Any]:
    """Kernel counts (forward and backward), sdpa arguments and GPU attention kernels of a list of profiler events.

    A kernel operation is counted once, at its outermost level (``_scaled_dot_product_efficient_attention`` calls
    ``_efficient_attention_forward``: one call).
    """
    forward, backward, calls, gpu = Counter(), Counter(), Counter(), Counter()
    for event in events:
        if event.name == "aten::softmax" and not any(kernel_of(a.name) for a in _ancestors(event)):
            forward["none: eager softmax"] += 1  # attention computed by hand, outside any sdpa kernel
        kernel = kernel_of(event.name)
        if kernel is not None and not any(kernel_of(a.name) for a in _ancestors(event)):
            (backward if "backward" in event.name else forward)[kernel] += 1
            gpu.update(name for name in _gpu_kernels(event) if any(m in name.lower() for m in GPU_ATTENTION_MARKERS))
        if event.name == "aten::scaled_dot_product_attention":
            # arguments: query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
            shapes = list(event.input_shapes or [])
            values = list(getattr(event, "concrete_inputs", None) or [])
            mask = shapes[3] if len(shapes) > 3 and shapes[3] else None
            is_causal = values[5] if len(values) > 5 else None
            gqa = values[7] if len(values) > 7 else None
            query, key = (shapes[0], shapes[1]) if len(shapes) > 1 else (None, None)
            calls[
                json.dumps({"query": query, "key": key, "mask": mask, "is_causal": is_causal, "enable_gqa": gqa})
            ] += 1
    return {
        "forward": dict(forward),
        "backward": dict(backward),
        "sdpa_calls": [{**json.loads(k), "count": n} for k, n in calls.items()],
        "gpu_kernels": dict(gpu.most_common()),
    }


def _inputs(batch: int, seq: int, vocab: int, padded: bool, device: str, seed: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    if padded:  # the first row is left-padded by a quarter of its length
        input_ids[0, : seq // 4] = 0
        attention_mask[0, : seq // 4] = 0
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _activities(device: str) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]


def profile_train(model: torch.nn.Module, inputs: dict, device: str) -> dict[str, Any]:
    """Kernels of one training forward and backward pass (after one unprofiled warm-up pass)."""
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model(**inputs, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    with profile(activities=_activities(device), record_shapes=True) as prof:
        model(**inputs, labels=labels).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return summarise(list(prof.events()))


def profile_generate(model: torch.nn.Module, inputs: dict, device: str) -> dict[str, dict[str, Any]]:
    """Kernels of the prefill call and of the last decoding step of one greedy ``generate`` call."""
    model.eval()
    transformers_model = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    open_ranges: list[record_function] = []
    calls_seen = 0

    def enter(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        nonlocal calls_seen
        open_ranges.append(record_function(f"{CALL_RANGE}{calls_seen}"))
        open_ranges[-1].__enter__()
        calls_seen += 1

    def leave(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(**inputs, **kwargs)  # warm-up
        handles = [
            transformers_model.register_forward_pre_hook(enter, with_kwargs=True),
            transformers_model.register_forward_hook(leave, with_kwargs=True),
        ]
        try:
            with profile(activities=_activities(device), record_shapes=True) as prof:
                model.generate(**inputs, **kwargs)
                if device == "cuda":
                    torch.cuda.synchronize()
        finally:
            for handle in handles:
                handle.remove()
    events = list(prof.events())
    calls = [_phase_call(e) for e in events]
    last = max((c for c in calls if c is not None), default=None)
    if last is None or last == 0:
        raise RuntimeError(f"expected {NEW_TOKENS} forward calls in generate, the hooks saw {calls_seen}")
    return {
        "prefill": summarise([e for e, c in zip(events, calls, strict=True) if c == 0]),
        "decode": summarise([e for e, c in zip(events, calls, strict=True) if c == last]),
    }


def report_kernels(
    device: str = "cuda", dtype: str = "bfloat16", smoke: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Profile every case and return the results (settings, environment, one row per model × padding × phase).

    Args:
        device: ``"cuda"`` or ``"cpu"``.
        dtype: ``"bfloat16"`` or ``"float32"``: the dtype of the weights and prefixes.
        smoke: The 2-layer, 64-wide benchmark Llama and a 32-token batch instead of the ~20M-parameter Llama
            (head dim 64) and 256 tokens.
        seed: Seed of the weights and the batch.

    Example::

        result = report_kernels("cpu", "bfloat16", smoke=True)
        print(result["rows"][0]["forward"])   # {'flash (CPU)': 2}
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    torch_dtype = DTYPES[dtype]
    base = build_llama(seed, smoke)
    models = {
        "base": copy.deepcopy(base),
        "prefix_plus": peft.get_peft_model(
            copy.deepcopy(base), PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LENGTH)
        ),
    }
    batch, seq = 2, 32 if smoke else 256
    rows = []
    for name, model in models.items():
        model = model.to(device=device, dtype=torch_dtype)
        for padded in (False, True):
            inputs = _inputs(batch, seq, base.config.vocab_size, padded, device, seed + 1)
            phases = {"train": profile_train(model, inputs, device), **profile_generate(model, inputs, device)}
            for phase, found in phases.items():
                rows.append({"model": name, "padding": padded, "phase": phase, **found})
                print(f"[sdpa_kernels] {name:11s} padding={padded!s:5s} {phase:7s} {_kernels_text(found)}", flush=True)
    return {
        "settings": {
            "model": f"Llama, hidden {base.config.hidden_size}, {base.config.num_hidden_layers} layers, "
            f"{base.config.num_attention_heads} query / {base.config.num_key_value_heads} key-value heads, head dim "
            f"{base.config.hidden_size // base.config.num_attention_heads}, attn_implementation sdpa",
            "prefix": f"PrefixPlusConfig(num_virtual_tokens={PREFIX_LENGTH}), default MLP",
            "batch": batch,
            "seq": seq,
            "padding": f"first row left-padded by {seq // 4} tokens",
            "new_tokens": NEW_TOKENS,
            "device": device,
            "dtype": dtype,
        },
        "environment": _environment(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows,
    }


def _environment(device: str) -> dict[str, Any]:
    env = report.environment(device)
    if device == "cuda":
        env |= {
            "gpu": torch.cuda.get_device_name(0),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "sdpa_backends_enabled": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        }
    return env


def _kernels_text(found: dict[str, Any]) -> str:
    def counts(counter: dict[str, int]) -> str:
        return ", ".join(f"{k} ×{n}" for k, n in counter.items()) or "none"

    text = f"forward: {counts(found['forward'])}"
    if found["backward"]:
        text += f"; backward: {counts(found['backward'])}"
    return text


def _shape(shape: list[int] | None) -> str:
    return "×".join(map(str, shape)) if shape else "?"


def _calls_text(row: dict[str, Any]) -> str:
    calls, parts = row["sdpa_calls"], []
    if not calls:
        if any(not k.startswith("none") for k in row["forward"]):  # e.g. a causal_lower_right bias calls the kernel
            return "no `aten::scaled_dot_product_attention` call: the kernel was called directly"
        return "no `aten::scaled_dot_product_attention` call"
    for call in calls:
        mask = "no mask" if call["mask"] is None else f"mask {_shape(call['mask'])}"
        parts.append(
            f"q {_shape(call['query'])}, k {_shape(call['key'])}, {mask}, is_causal={call['is_causal']} ×{call['count']}"
        )
    return "; ".join(parts)


def render_markdown(result: dict[str, Any]) -> str:
    """One table: model, padding, phase, the kernels that ran, what sdpa received and the GPU attention kernels."""
    lines = [
        "# Which sdpa kernel runs",
        "",
        f"Written by `python -m benchmarks.sdpa_kernels` on {result['date']}; see the module's docstring for the "
        "method.",
        "",
        "Settings:",
        "",
        *[f"- {k}: {v}" for k, v in result["settings"].items()],
        "",
        "| model | padding | phase | kernels | sdpa calls (query and key shapes, mask, is_causal) | GPU kernels |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        gpu = ", ".join(f"`{name[:60]}` ×{n}" for name, n in row["gpu_kernels"].items()) or "–"
        lines.append(
            f"| {row['model']} | {'yes' if row['padding'] else 'no'} | {row['phase']} | {_kernels_text(row)} | "
            f"{_calls_text(row)} | {gpu} |"
        )
    lines += ["", f"Environment: {result['environment']}", ""]
    return "\n".join(lines)


def write(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``sdpa_kernels.json`` and ``sdpa_kernels.md`` into ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sdpa_kernels.json", out_dir / "sdpa_kernels.md"]
    for path, text in zip(paths, (json.dumps(result, indent=1) + "\n", render_markdown(result)), strict=True):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer, 64-wide Llama and 32 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results_cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available (use --device cpu)", file=sys.stderr)
        return 2
    result = report_kernels(args.device, args.dtype, args.smoke, args.seed)
    for path in write(result, args.out):
        print(f"[sdpa_kernels] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
