"""Suite ``decode`` (measurement 3): greedy generation throughput in tokens/s.

Prompt of 256 random tokens, 128 new tokens (``min_new_tokens`` forces all of them), greedy, batch 1 and 8, on the
~20M-parameter Llama of the train suite, prefix 32, projection MLP of width 512. Methods, each on its own copy of
the same weights:

- ``base``: the base model with no prefix;
- ``stock``: stock PEFT ``PrefixTuningConfig(prefix_projection=True)``; PEFT seeds the prefix into the KV cache once
  per ``generate`` call;
- ``pp_unmerged``: PrefixPlus with its projection MLP;
- ``pp_merged``: the same adapter after ``merge_mlp()`` (raw prefixes).
"""

from __future__ import annotations

import peft
import torch
import transformers

from peft_prefix_plus import PrefixPlusConfig

from .common import RunOptions, alternate, build_llama, count_parameters, fresh_copy, median, paired_ratio

PREFIX_LENGTH = 32
MLP_WIDTH = 512
PROMPT_LENGTH = 256
NEW_TOKENS = 128
BATCHES = (1, 8)
METHODS = ("base", "stock", "pp_unmerged", "pp_merged")


def merge_prefix_mlp(model: peft.PeftModel) -> str:
    """Merge the PrefixPlus MLP into raw prefixes with ``merge_mlp()``; returns how it was merged."""
    model.merge_mlp()
    return "peft_model.merge_mlp()"


def build_models(options: RunOptions, prefix_length: int, mlp_width: int) -> tuple[dict, str, torch.nn.Module]:
    base = build_llama(options.seed, options.smoke).eval()
    models: dict[str, torch.nn.Module] = {"base": fresh_copy(base)}
    stock = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=prefix_length, prefix_projection=True, encoder_hidden_size=mlp_width
    )
    models["stock"] = peft.get_peft_model(fresh_copy(base), stock)
    plus = PrefixPlusConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=prefix_length, prefix_projection=True, mlp_hidden_size=mlp_width
    )
    models["pp_unmerged"] = peft.get_peft_model(fresh_copy(base), plus)
    models["pp_merged"] = peft.get_peft_model(fresh_copy(base), plus)
    models["pp_merged"].load_state_dict(models["pp_unmerged"].state_dict())
    for name, model in models.items():
        models[name] = model.to(device=options.device, dtype=options.torch_dtype).eval()
    how = merge_prefix_mlp(models["pp_merged"])  # on the device, as the unmerged model computes its MLP
    return models, how, base


def stock_prefix_reaches_generate(seed: int = 0) -> bool:
    """Whether stock PEFT prefix tuning's ``generate`` uses the prefix at all, on a tiny model.

    With transformers 5.24 and PEFT 0.21.2 it does not: PEFT hands the prefix over as ``past_key_values`` while
    ``generate`` passes its own ``cache``, and the model keeps ``cache`` (with a FutureWarning), so the generated
    tokens equal the base model's although a plain forward pass differs. Checked here so that the results say which
    stock behaviour the "stock" column measured.
    """
    base = build_llama(seed, smoke=True).eval()
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=False)
    stock = peft.get_peft_model(fresh_copy(base), config).eval()
    with torch.no_grad():
        stock.prompt_encoder["default"].embedding.weight.normal_(0.0, 3.0)
        prompt = torch.randint(3, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
        kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 8, "min_new_tokens": 8}
        kwargs.update(do_sample=False, pad_token_id=0)
        same_tokens = torch.equal(
            base.generate(input_ids=prompt, **kwargs), stock.generate(input_ids=prompt, **kwargs)
        )
        forward_differs = not torch.allclose(base(input_ids=prompt).logits, stock(input_ids=prompt).logits)
    return forward_differs and not same_tokens


def run(options: RunOptions) -> dict:
    """Run the suite and return its results."""
    device = options.device
    prefix_length = 4 if options.smoke else PREFIX_LENGTH
    mlp_width = 16 if options.smoke else MLP_WIDTH
    prompt_length = 16 if options.smoke else PROMPT_LENGTH
    new_tokens = 8 if options.smoke else NEW_TOKENS
    batches = (1, 2) if options.smoke else BATCHES
    models, how, base = build_models(options, prefix_length, mlp_width)
    repeats, warmup = options.n_repeats(5), options.n_warmup()
    generator = torch.Generator().manual_seed(options.seed + 2)
    rows, agreement = [], {}
    for batch_size in batches:
        prompt = torch.randint(3, base.config.vocab_size, (batch_size, prompt_length), generator=generator).to(device)
        mask = torch.ones_like(prompt)

        def generate(model: torch.nn.Module, prompt: torch.Tensor = prompt, mask: torch.Tensor = mask) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(
                    input_ids=prompt,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        fns = {name: (lambda m=m: generate(m)) for name, m in models.items()}
        times, outputs = alternate(fns, repeats, warmup, device)
        agreement[f"batch {batch_size}"] = bool(torch.equal(outputs["pp_merged"], outputs["pp_unmerged"]))
        for name in models:
            generated = outputs[name].shape[1] - prompt_length
            rows.append(
                {
                    "batch": batch_size,
                    "method": name,
                    "median_s": median(times[name]),
                    "times_s": times[name],
                    "new_tokens": generated,
                    "tokens_per_s": batch_size * generated / median(times[name]),
                }
            )
    notes = []
    reaches = stock_prefix_reaches_generate(options.seed)
    if not reaches:
        notes.append(
            "Stock PEFT prefix tuning's generate() ignores the prefix in this stack (transformers "
            f"{transformers.__version__}, peft {peft.__version__}): PEFT passes the prefix as `past_key_values`, "
            "generate passes `cache`, and the model keeps `cache`. Checked on a tiny model: stock generates exactly "
            "the base model's tokens while its forward pass differs. The 'stock' column therefore measures the base "
            "model's decode speed plus PEFT's wrapper, not prefix decoding; 'pp_merged / base' is the meaningful "
            "decode comparison here."
        )
    if options.dtype != "float32" and not all(agreement.values()):
        notes.append(
            f"In {options.dtype}, merged and unmerged greedy tokens differ in some batches: the merged prefix is "
            f"computed once in float32 and rounded to {options.dtype}, while the unmerged MLP computes in "
            f"{options.dtype}, so the two prefixes round differently and a near-tie between two tokens can flip. "
            "The float32 run checks that merging is exact."
        )
    return {
        "suite": "decode",
        "notes": notes,
        "settings": {
            "model": f"Llama, {count_parameters(base) / 1e6:.1f}M parameters (as in the train suite)",
            "prefix_length": prefix_length,
            "mlp_width": mlp_width,
            "prompt_length": prompt_length,
            "new_tokens": new_tokens,
            "decoding": "greedy (do_sample=False), min_new_tokens = max_new_tokens, KV cache on",
            "batches": list(batches),
            "repeats": repeats,
            "warmup": warmup,
            "merged_with": how,
            "merged_equals_unmerged_tokens": agreement,
            "stock_prefix_reaches_generate": reaches,
            "device": device,
            "dtype": options.dtype,
        },
        "rows": rows,
        "targets": targets(rows),
    }


def targets(rows: list[dict]) -> list[dict]:
    def tps(batch: int, method: str) -> float:
        return next(r["tokens_per_s"] for r in rows if (r["batch"], r["method"]) == (batch, method))

    def times(batch: int, method: str) -> list[float]:
        return next(r["times_s"] for r in rows if (r["batch"], r["method"]) == (batch, method))

    verdicts = []
    for batch in sorted({r["batch"] for r in rows}):
        for num, den, limit in (
            ("pp_merged", "stock", 1.0),
            ("pp_merged", "base", 0.95),
            ("pp_unmerged", "stock", None),
            ("pp_unmerged", "base", None),
        ):
            ratio = tps(batch, num) / tps(batch, den)
            # tokens/s ratio = inverse time ratio, paired round by round
            paired = paired_ratio(times(batch, den), times(batch, num))
            verdicts.append(
                {
                    "measurement": "tokens/s",
                    "case": f"batch {batch}",
                    "comparison": f"{num} / {den}",
                    "ratio": ratio,
                    "paired_ratio": paired,
                    "target": f">= {limit}" if limit is not None else "(reported, no target)",
                    "met": (ratio >= limit) if limit is not None else None,
                }
            )
    return verdicts


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        values = [next(r["tokens_per_s"] for r in rows if (r["batch"], r["method"]) == (b, method)) for b in batches]
        ax.bar([x + i * width for x in range(len(batches))], values, width, label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(batches))])
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens / s")
    ax.legend(fontsize=8)
    s = result["settings"]
    ax.set_title(f"Greedy decoding, prompt {s['prompt_length']}, {s['new_tokens']} new ({s['device']})")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/decode_tokens_per_s.png", dpi=100)
    plt.close(fig)
    return ["decode_tokens_per_s.png"]
