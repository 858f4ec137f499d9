"""Suite ``size`` (measurement 4): checkpoint bytes, unmerged and merged, against the raw minimum.

The raw minimum of an adapter is ``sum over sites of layers x length x 2 x kv_dim x bytes`` (``kv_dim`` = key/value
heads x head dimension), the bytes of the prefix values themselves. The file measured is
``adapter_model.safetensors`` as written by ``save_pretrained``; ``adapter_config.json`` (a few KiB of text) is
reported separately. Models: the ~20M Llama of the train suite (one site, prefix 32, MLP width 512) and a small
random T5 (three sites: encoder 16, decoder 32, cross 8 virtual tokens).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import peft
import torch
import transformers

from peft_prefix_plus import PrefixPlusConfig, merge_mlp_files

from .common import RunOptions, build_llama, fresh_copy
from .suite_decode import merge_prefix_mlp

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def t5_model(seed: int, smoke: bool) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    width = 32 if smoke else 256
    config = transformers.T5Config(
        vocab_size=256 if smoke else 8192, d_model=width, d_ff=2 * width, num_layers=2 if smoke else 6,
        num_decoder_layers=2 if smoke else 6, num_heads=4, d_kv=width // 4, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def raw_minimum(config: PrefixPlusConfig, lengths: dict[str, int], bytes_per_value: int = 4) -> int:
    """Bytes of the prefix values alone: sites x layers x length x 2 x kv_dim x bytes."""
    total = 0
    for site, length in lengths.items():
        shape = config.site_shapes[site]
        layers = len(config.layers_to_transform) if config.layers_to_transform else shape["num_layers"]
        total += layers * length * 2 * shape["num_key_value_heads"] * shape["head_dim"] * bytes_per_value
    return total


def _saved_sizes(model: peft.PeftModel, directory: Path) -> tuple[int, int]:
    model.save_pretrained(str(directory))
    return os.path.getsize(directory / WEIGHTS), os.path.getsize(directory / CONFIG)


def _row(model_name: str, method: str, weights: int, config_bytes: int, minimum: int) -> dict:
    return {
        "model": model_name,
        "method": method,
        "adapter_bytes": weights,
        "config_bytes": config_bytes,
        "raw_minimum_bytes": minimum,
        "ratio_to_raw_minimum": weights / minimum,
        "overhead_bytes": weights - minimum,
    }


def run(options: RunOptions) -> dict:
    """Run the suite and return its results."""
    prefix = 4 if options.smoke else 32
    width = 16 if options.smoke else 512
    rows, targets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = build_llama(options.seed, options.smoke)
        plus_config = None
        for method in ("stock_proj", "stock_raw", "pp_proj", "pp_merged", "pp_raw", "pp_merge_adapter"):
            directory = tmp_path / f"llama_{method}"
            if method == "pp_merge_adapter":  # the on-disk merge of the saved pp_proj adapter
                merge_mlp_files(tmp_path / "llama_pp_proj", directory)
                weights, config_bytes = os.path.getsize(directory / WEIGHTS), os.path.getsize(directory / CONFIG)
            else:
                if method.startswith("stock"):
                    config = peft.PrefixTuningConfig(
                        task_type="CAUSAL_LM", num_virtual_tokens=prefix,
                        prefix_projection=method == "stock_proj", encoder_hidden_size=width,
                    )  # fmt: skip
                else:
                    config = PrefixPlusConfig(
                        task_type="CAUSAL_LM", num_virtual_tokens=prefix,
                        prefix_projection=method != "pp_raw", mlp_hidden_size=width,
                    )  # fmt: skip
                model = peft.get_peft_model(fresh_copy(base), config)
                if method == "pp_merged":
                    merge_prefix_mlp(model)
                if method == "pp_proj":
                    plus_config = model.peft_config["default"]
                weights, config_bytes = _saved_sizes(model, directory)
            minimum = raw_minimum(plus_config, {"self": prefix}) if plus_config else _stock_minimum(base, prefix)
            rows.append(_row("llama", method, weights, config_bytes, minimum))
        t5 = t5_model(options.seed, options.smoke)
        lengths = {"self": prefix, "encoder": prefix // 2, "cross": prefix // 4}
        for method in ("pp_proj", "pp_merged"):
            config = PrefixPlusConfig(
                task_type="SEQ_2_SEQ_LM", num_virtual_tokens=lengths["self"], encoder_num_virtual_tokens=lengths["encoder"],
                cross_num_virtual_tokens=lengths["cross"], mlp_hidden_size=width,
            )  # fmt: skip
            model = peft.get_peft_model(fresh_copy(t5), config)
            if method == "pp_merged":
                merge_prefix_mlp(model)
            weights, config_bytes = _saved_sizes(model, tmp_path / f"t5_{method}")
            rows.append(
                _row("t5 (3 sites)", method, weights, config_bytes, raw_minimum(model.peft_config["default"], lengths))
            )
    for row in rows:
        if row["method"] in ("pp_merged", "pp_merge_adapter"):
            limit = row["raw_minimum_bytes"] * 1.01 + 4096
            targets.append(
                {
                    "measurement": "checkpoint bytes",
                    "case": f"{row['model']}, {row['method']}",
                    "comparison": "adapter file / raw minimum",
                    "ratio": row["ratio_to_raw_minimum"],
                    "target": f"<= 1.01 x minimum + 4 KiB ({limit:,.0f} bytes)",
                    "met": row["adapter_bytes"] <= limit,
                }
            )
    return {
        "suite": "size",
        "settings": {
            "dtype": "float32 (4 bytes per value)",
            "llama": "~20M Llama of the train suite, prefix 32, MLP width 512",
            "t5": f"random T5, {t5.config.num_layers}+{t5.config.num_decoder_layers} layers, d_model "
            f"{t5.config.d_model}, prefixes {lengths}, MLP width {width}",
            "file measured": WEIGHTS + f" ({CONFIG} listed in results.json as config_bytes)",
            "device": "cpu (file sizes do not depend on the device)",
        },
        "rows": rows,
        "targets": targets,
    }


def _stock_minimum(base: torch.nn.Module, prefix: int) -> int:
    config = base.config
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * prefix * 2 * config.num_key_value_heads * head_dim * 4


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['model']}\n{r['method']}" for r in rows]
    ax.bar(range(len(rows)), [r["ratio_to_raw_minimum"] for r in rows])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("adapter file / raw minimum")
    ax.set_title("Checkpoint size")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/size_ratio.png", dpi=100)
    plt.close(fig)
    return ["size_ratio.png"]
