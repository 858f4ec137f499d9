"""Shared helpers of the benchmark suites: models, alternating timers, peak-memory measurement and settings."""

from __future__ import annotations

import copy
import inspect
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import transformers
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import peft_prefix_plus  # noqa: F401 - registers PREFIX_PLUS with PEFT

transformers.logging.set_verbosity_error()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The dtypes the train and decode suites run in (``--dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: The keyword the installed transformers' models take their KV cache by: ``cache`` where the forward has it (5.24 and
#: 5.25 do, and deprecate ``past_key_values`` with a FutureWarning, "Both ... are set" when a call has both; removal is
#: announced for 5.40), ``past_key_values`` in older versions. Read from the signature of the benchmarks' model, so
#: that a version is judged by what it accepts, not by its number.
CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword arguments that hand ``cache`` to a transformers model's forward under the installed version's name
    (:data:`CACHE_KWARG`), and only under that one.

    Example::

        logits = model(input_ids=prompt, attention_mask=mask, use_cache=True, **cache_kwargs(DynamicCache())).logits
    """
    return {CACHE_KWARG: cache}


@dataclass
class RunOptions:
    """Options shared by every suite.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        smoke: Tiny sizes and one repeat, to check that the suite runs (used by the tests).
        repeats: Timed repeats per method (medians are reported); ``None`` means the suite's default.
        warmup: Untimed warm-up repeats per method before the timed ones.
        seed: Seed of every model and batch.
        dtype: ``"float32"`` or ``"bfloat16"``: the dtype of the weights and prefixes in the ``train`` and ``decode``
            suites (the other suites measure files or train in float32 and ignore it).

    Example::

        options = RunOptions(device="cuda", dtype="bfloat16", repeats=3)
        model = build_llama(options.seed).to(device=options.device, dtype=options.torch_dtype)
    """

    device: str = "cpu"
    smoke: bool = False
    repeats: Optional[int] = None
    warmup: int = 1
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def n_repeats(self, default: int = 5) -> int:
        if self.smoke:
            return 1
        return default if self.repeats is None else self.repeats

    def n_warmup(self) -> int:
        return 0 if self.smoke else self.warmup


def synchronize(device: str) -> None:
    """Wait for queued GPU work so that wall-clock timings are complete (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def llama_config(smoke: bool = False) -> transformers.LlamaConfig:
    """The benchmark's Llama-shaped model: about 19.8M parameters, grouped-query attention (6 query, 2 kv heads).

    In smoke mode a 2-layer, 64-wide model of the same shape family.
    """
    if smoke:
        return transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    return transformers.LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=8192, attn_implementation="sdpa",
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def build_llama(seed: int, smoke: bool = False) -> transformers.LlamaForCausalLM:
    """A randomly initialised (seeded) benchmark Llama in eval-free default (train) mode."""
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(smoke))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of ``model`` (every method wraps its own copy of identical weights)."""
    return copy.deepcopy(model)


def alternate(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each function ``warmup + repeats`` times, alternating between them (A B C, C B A, A B C, …).

    The order reverses every round so that slow drifts of the machine (other processes, thermal state) fall evenly
    on every method. Only the rounds after the warm-up are kept.

    Returns:
        The timings in seconds per name, and the last return value of each function.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    names = list(fns)
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            last[name] = fns[name]()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times, last


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]``: both timed in the same round, so a slow spell of the
    machine that hits one round cancels out (less sensitive to other processes than the ratio of medians)."""
    return median([n / d for n, d in zip(numerator, denominator, strict=True) if d > 0])


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the ``with`` block and still alive, on CPU.

    Neither ``tracemalloc`` (it sees Python's allocator only, not tensor storage) nor the CUDA allocator statistics
    apply to CPU tensors, so this mode watches every aten operation (forward, backward and optimizer step): each
    output storage that is new, that is, shared with none of the operation's inputs, is counted until its last
    reference dies. Views and in-place results share an input's storage and are not counted, so storages that existed
    before the block (weights, the optimizer state after warm-up) never are. Scratch buffers internal to one kernel
    are not seen either.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    @staticmethod
    def _storages(tree: Any) -> set[int]:
        return {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        self._sweep()
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = self._storages((args, kwargs))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in inputs or ref.cdata in self._live:
                continue
            self._live[ref.cdata] = (ref, storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out


def measure_peak_memory(fn: Callable[[], Any], device: str) -> tuple[int, str]:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it, and the tool used."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "torch.cuda allocator statistics (max_memory_allocated)"
    with PeakMemory() as tracker:
        fn()
    return tracker.peak, "live tensor storage tracked by a TorchDispatchMode (tracemalloc does not see tensors)"


def load_average() -> Optional[tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return None
