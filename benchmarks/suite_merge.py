"""Suite ``merge`` (measurement 5): time and peak memory of ``merge_mlp_files`` on disk, with no base model.

The adapter has the shape PrefixPlus gives Llama-2-7B: 32 layers, hidden 4096, 32 heads (32 key/value heads of
dimension 128), prefix 30, one MLP layer of width 512, float32. It is written directly from a
:class:`~peft_prefix_plus.PrefixSiteEncoder` of that shape (random weights; the values do not change the work), so
no 7B model is needed. Each merge runs in a fresh Python process: the time is that of the ``merge_mlp_files`` call
(imports excluded, reported separately), the memory is the process's peak resident set size (``VmHWM``; not ``ru_maxrss``,
which Linux carries over from the parent at fork and exec) and its
growth over the resident size just before the call. The source file was just written, so it is in the page cache.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.tuner import PrefixSiteEncoder

from .common import RunOptions

SEVEN_B = {"layers": 32, "hidden": 4096, "kv_heads": 32, "head_dim": 128, "prefix": 30, "mlp_width": 512}
SMOKE = {"layers": 2, "hidden": 64, "kv_heads": 4, "head_dim": 16, "prefix": 4, "mlp_width": 16}
KEY_PREFIX = "base_model.model.prefix_plus_layer.prefix_plus_sites.self."
TARGET_S = 5.0

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from peft_prefix_plus import merge_mlp_files
import_s = time.perf_counter() - t0
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
t = time.perf_counter()
merge_mlp_files(sys.argv[1], sys.argv[2])
elapsed = time.perf_counter() - t
def high_water_mark():
    # VmHWM belongs to this process's address space; ru_maxrss would also count the parent's size at fork time,
    # which Linux keeps across exec (a parent that ran other suites first made it report gigabytes too many)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = high_water_mark()
print(json.dumps({"merge_s": elapsed, "import_s": import_s, "rss_before": before, "peak_rss": peak}))
"""


def write_adapter(directory: Path, shape: dict, seed: int) -> int:
    """Write a PrefixPlus adapter of ``shape`` (as ``save_pretrained`` lays it out); returns its weight bytes."""
    torch.manual_seed(seed)
    config = PrefixPlusConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=shape["prefix"],
        prefix_projection=True,
        mlp_hidden_size=shape["mlp_width"],
        token_dim=shape["hidden"],
        site_shapes={
            "self": {
                "num_layers": shape["layers"],
                "num_key_value_heads": shape["kv_heads"],
                "head_dim": shape["head_dim"],
            }
        },
    )
    encoder = PrefixSiteEncoder(
        shape["prefix"], list(range(shape["layers"])), shape["kv_heads"], shape["head_dim"], config
    )
    tensors = {KEY_PREFIX + name: value.detach().contiguous() for name, value in encoder.state_dict().items()}
    directory.mkdir(parents=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return os.path.getsize(directory / "adapter_model.safetensors")


def _merge_in_process(src: Path, dst: Path) -> dict:
    import resource
    import time

    from peft_prefix_plus import merge_mlp_files

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    merge_mlp_files(src, dst)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # smoke runs only: in-process
    return {"merge_s": elapsed, "import_s": 0.0, "rss_before": before, "peak_rss": peak}


def run(options: RunOptions) -> dict:
    """Run the suite and return its results."""
    shape = SMOKE if options.smoke else SEVEN_B
    repeats = options.n_repeats(3)
    runs = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # as many threads as this process (--threads)
    }
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "adapter"
        src_bytes = write_adapter(src, shape, options.seed)
        for i in range(repeats):
            dst = Path(tmp) / f"merged_{i}"
            if options.smoke:  # a fresh interpreter costs seconds of imports; the smoke run only checks the code path
                runs.append(_merge_in_process(src, dst))
                dst_bytes = os.path.getsize(dst / "adapter_model.safetensors")
                continue
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(src), str(dst)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"merge_mlp_files failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            dst_bytes = os.path.getsize(dst / "adapter_model.safetensors")
    merge_s = statistics.median(r["merge_s"] for r in runs)
    peak = max(r["peak_rss"] for r in runs)
    growth = max(r["peak_rss"] - r["rss_before"] for r in runs)
    rows = [
        {"what": "adapter shape", "value": json.dumps(shape)},
        {"what": "source adapter_model.safetensors (MiB)", "value": src_bytes / 2**20},
        {"what": "merged adapter_model.safetensors (MiB)", "value": dst_bytes / 2**20},
        {"what": f"merge_mlp_files time, median of {repeats} (s)", "value": merge_s},
        {"what": "merge_mlp_files time, each run (s)", "value": ", ".join(f"{r['merge_s']:.2f}" for r in runs)},
        {"what": "import peft_prefix_plus, median (s)", "value": statistics.median(r["import_s"] for r in runs)},
        {"what": "peak RSS of the merge process (MiB)", "value": peak / 2**20},
        {"what": "peak RSS growth during merge_mlp_files (MiB)", "value": growth / 2**20},
    ]
    return {
        "suite": "merge",
        "settings": {
            "shape": shape,
            "repeats": repeats,
            "memory_tool": "VmHWM (peak RSS) of a fresh process",
            "device": "cpu (merge_mlp_files works on files, without a model or an accelerator)",
        },
        "rows": rows,
        "runs": runs,
        "targets": [
            {
                "measurement": "merge time",
                "case": "Llama-2-7B-shaped adapter" if not options.smoke else "smoke shape",
                "comparison": "merge_mlp_files, on disk (s)",
                "ratio": merge_s,
                "target": f"< {TARGET_S} s",
                "met": merge_s < TARGET_S,
            }
        ],
    }
