"""Save a tiny random causal LM (Llama) or seq2seq LM (T5) with a small BPE tokenizer to a directory, offline.

The tokenizer is trained with the `tokenizers` library on the example's training data, so the example's smoke test
runs on a model that loads with `from_pretrained` like any Hub model.

Usage: ``python tests/scripts/make_tiny_model.py OUT_DIR [llama|t5]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "train.jsonl"


def make_tiny_model(out_dir: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random `family` model and its tokenizer to `out_dir` and return it.

    Args:
        out_dir (`str` or `Path`): Target directory.
        family (`str`): `"llama"` (decoder-only) or `"t5"` (encoder-decoder).
        seed (`int`): Seed of the random weights.

    Example:

    ```py
    >>> make_tiny_model("/tmp/tiny-llama")
    ```
    """
    out = Path(out_dir)
    texts = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["mr"], row["text"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<unk>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts + ["Describe the restaurant in one sentence.\nData:\nSentence:"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", bos_token="<s>"
    )
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=3,
        )
        model = transformers.LlamaForCausalLM(config)
    elif family == "t5":
        config = transformers.T5Config(
            vocab_size=vocab,
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=2,
            dropout_rate=0.0,
        )
        model = transformers.T5ForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown family {family!r}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    make_tiny_model(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama")
