"""Each benchmark suite runs end to end in ``--smoke`` mode (tiny sizes, one repeat), so the scripts do not rot.

Timings are never asserted: only that every suite writes its results (table, JSON, plots) with the expected rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import run as bench  # noqa: E402
from benchmarks import suite_quality  # noqa: E402

EXPECTED_METHODS = {
    "train": {"floor", "stock_proj", "stock_raw", "pp_proj", "pp_raw"},
    "decode": {"base", "stock", "pp_unmerged", "pp_merged", "pp_merged_beside"},
}


def _is_stock_prefix_tuning_call(frame) -> bool:  # noqa: ANN001 - a frame
    """Whether a frame on the stack is stock PEFT prefix tuning's own code (a `PeftModel` method with PREFIX_TUNING)."""
    import peft

    while frame is not None:
        if frame.f_code.co_filename.replace("\\", "/").endswith("/peft/peft_model.py"):
            model = frame.f_locals.get("self")
            if isinstance(model, peft.PeftModel) and model.active_peft_config.peft_type == peft.PeftType.PREFIX_TUNING:
                return True
        frame = frame.f_back
    return False


def run_recording_cache_warnings(argv: list[str]) -> tuple[int, list[str]]:
    """Run the benchmarks; return the exit code and the FutureWarnings about the cache keyword (the deprecated
    `past_key_values`, or both names in one call) that the benchmarks' own calls caused.

    Stock PEFT prefix tuning causes some itself, upstream, which are left out: its forward always hands its prefix over
    as `past_key_values`, and its `generate` adds `past_key_values` beside the `cache` that transformers' `generate`
    passes ("Both ... are set", inside transformers' generation code). A benchmark naming a cache twice or by the old
    name, or handing a cache to stock's forward ("Both" outside `generate`), is returned.
    """
    ours: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' hook
        text = str(message)
        if not issubclass(category, FutureWarning) or "past_key_values" not in text:
            return
        frame = sys._getframe(1)
        stack = []
        probe = frame
        while probe is not None:
            stack.append(probe.f_code.co_filename.replace("\\", "/"))
            probe = probe.f_back
        in_generate = any("/transformers/generation/" in name for name in stack)
        if _is_stock_prefix_tuning_call(frame) and (in_generate or not text.startswith("Both")):
            return  # upstream: stock PEFT's own calls
        ours.append(f"{text[:120]} (from {[name for name in stack if '/benchmarks/' in name][:3]})")

    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)
        warnings.showwarning = record
        code = bench.main(argv)
    return code, ours


@pytest.mark.parametrize("suite", ["train", "decode", "size", "merge", "quality"])
def test_suite_runs_in_smoke_mode(suite: str, tmp_path: Path) -> None:
    code, cache_warnings = run_recording_cache_warnings(["--suite", suite, "--smoke", "--out", str(tmp_path)])
    assert code == 0
    # every call the suite makes names its KV cache once, by the installed transformers' keyword (issue 24, item 9)
    assert not cache_warnings, cache_warnings
    results = json.loads((tmp_path / "results.json").read_text())
    result = results["suites"][suite]
    assert result["rows"], "the suite produced no rows"
    markdown = (tmp_path / "results.md").read_text()
    assert f"## {suite}" in markdown
    for plot in result["plots"]:
        assert (tmp_path / plot).stat().st_size > 0
    if suite in EXPECTED_METHODS:
        assert {row["method"] for row in result["rows"]} == EXPECTED_METHODS[suite]
    if suite == "decode":  # neither merging the MLP nor the prefix's place in the cache changes greedy outputs
        assert all(all(same.values()) for same in result["settings"]["same_tokens"].values())
    if suite == "size":
        assert all(t["met"] for t in result["targets"]), result["targets"]
    if suite == "quality":
        assert {row["part"] for row in result["rows"]} == {"seq2seq", "smollm2_full", "smollm2_low"}
        for part in ("smollm2_full", "smollm2_low"):
            runs = result["runs"][part]
            generated = [run for run in runs if "bleu" in run]
            assert {run["method"] for run in generated} == set(suite_quality.LM_METHODS)
            # every run has a validation loss curve that ends at the final evaluation's step
            assert all(run["curve_steps"][-1] == len(run["train_losses"]) for run in generated)
            # where stock generate() drops its prefix, the stock prefix generates through an exact PrefixPlus copy
            drops = "drops its prefix" in result["settings"][part]["stock_generation"]
            for run in generated:
                if run["method"].startswith("stock") and drops:
                    assert float(run["generated_by"].split("difference| ")[1].rstrip(")")) < 1e-4, run["generated_by"]
        low = {run["train_examples"] for run in result["runs"]["smollm2_low"] if "train_examples" in run}
        full = {run["train_examples"] for run in result["runs"]["smollm2_full"] if "train_examples" in run}
        assert len(low) == len(full) == 1 and min(low) < min(full)
        # the issue-13 targets are measured per setting (never asserted), with mean ± std in the table
        assert {t["case"] for t in result["targets"]} == {"full", "low"}
        assert "loss (mean ± std)" in markdown


def test_cache_keyword_is_the_one_the_installed_transformers_takes() -> None:
    """`cache` where the model's forward has it (transformers 5.24 and 5.25 deprecate `past_key_values`), once."""
    import inspect

    import transformers

    from benchmarks.common import CACHE_KWARG, cache_kwargs

    parameters = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    assert ("cache" if "cache" in parameters else "past_key_values") == CACHE_KWARG
    assert CACHE_KWARG in parameters
    marker = object()
    assert cache_kwargs(marker) == {CACHE_KWARG: marker}


def test_stock_decoding_steps_attend_the_prefix() -> None:
    """The decode suite's interleaved steps run stock PEFT through its base model with its prefix seeded into the
    cache: the prompt's pass and each later step compute stock's own forward logits (prefix attended), where handing
    a cache to stock's forward would name it twice and drop the prefix."""
    import peft
    import torch

    from benchmarks.common import build_llama, cache_kwargs, fresh_copy
    from benchmarks.suite_decode import decoding_start

    base = build_llama(0, smoke=True).eval()
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
    )
    stock = peft.get_peft_model(fresh_copy(base), config).eval()
    prompt = torch.randint(3, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stock's forward names its prefix `past_key_values` (upstream)
        with torch.no_grad():
            reference = stock(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits
            plain = base(input_ids=prompt).logits
    assert not torch.allclose(reference, plain, atol=1e-4)  # the prefix changes the logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        runner, cache, mask = decoding_start(stock, prompt[:, :7])
        assert runner is stock.get_base_model() and mask.shape == (2, 4 + 7)
        with torch.no_grad():
            logits = runner(input_ids=prompt[:, :7], attention_mask=mask, use_cache=True, **cache_kwargs(cache)).logits
            torch.testing.assert_close(logits, reference[:, :7], rtol=0, atol=1e-5)
            for position in range(7, 10):
                mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
                step = runner(
                    input_ids=prompt[:, position : position + 1],
                    attention_mask=mask,
                    use_cache=True,
                    **cache_kwargs(cache),
                ).logits
                torch.testing.assert_close(step[:, -1], reference[:, position], rtol=0, atol=1e-5)
    runner, cache, mask = decoding_start(base, prompt)  # every other method: called as it is, with an empty cache
    assert runner is base and cache.get_seq_length() == 0 and mask.shape == prompt.shape


def _published_files() -> dict[str, str]:
    """Hashes of the published results: every file in benchmarks/results/ but the git-ignored local/ folder."""
    published = REPO / "benchmarks" / "results"
    return {
        str(path.relative_to(published)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(published.rglob("*"))
        if path.is_file() and bench.DEFAULT_OUT not in path.parents
    }


def test_default_output_is_a_git_ignored_local_folder() -> None:
    """Without `--out`, results go to benchmarks/results/local/, which git ignores (issue 24, item 5)."""
    assert bench.parse_args([]).out == bench.DEFAULT_OUT == REPO / "benchmarks" / "results" / "local"
    assert bench.parse_args(["--out", "benchmarks/results"]).out == Path("benchmarks/results")
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("results.json", "results.md", "size_ratio.png"):
        ignored = subprocess.run(
            [git, "check-ignore", "-q", str(bench.DEFAULT_OUT / name)], cwd=REPO, capture_output=True
        )
        assert ignored.returncode == 0, f"{bench.DEFAULT_OUT / name} is not ignored by git"
    published = subprocess.run(
        [git, "check-ignore", "-q", str(REPO / "benchmarks" / "results" / "results.json")], cwd=REPO
    )
    assert published.returncode == 1  # the published figures stay tracked


def test_smoke_run_without_out_leaves_the_published_results_alone(tmp_path: Path) -> None:
    """`python benchmarks/run.py --smoke` (no `--out`) writes the git-ignored local folder: the published files are
    unchanged, and so is `git status --porcelain benchmarks/results`. A local folder that was there is restored."""
    git = shutil.which("git") if (REPO / ".git").exists() else None

    def status() -> str:
        command = [git, "status", "--porcelain", "--", "benchmarks/results"]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout

    before_files, before_status = _published_files(), status() if git else None
    backup = tmp_path / "local"
    existed = bench.DEFAULT_OUT.exists()
    if existed:
        shutil.copytree(bench.DEFAULT_OUT, backup)
    try:
        assert bench.main(["--suite", "size", "--smoke"]) == 0
        assert "size" in json.loads((bench.DEFAULT_OUT / "results.json").read_text())["suites"]
        assert _published_files() == before_files
        if git:
            assert status() == before_status
    finally:
        shutil.rmtree(bench.DEFAULT_OUT, ignore_errors=True)
        if existed:
            shutil.copytree(backup, bench.DEFAULT_OUT)


def test_train_and_decode_run_in_bfloat16(tmp_path: Path) -> None:
    """`--dtype bfloat16` puts the weights and prefixes in bf16: the AdamW state counted is 2 bytes per number."""
    argv = ["--suite", "train", "decode", "--smoke", "--dtype", "bfloat16", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    suites = json.loads((tmp_path / "results.json").read_text())["suites"]
    assert suites["train"]["settings"]["dtype"] == suites["decode"]["settings"]["dtype"] == "bfloat16"
    for row in suites["train"]["rows"]:  # parameter and two AdamW moments, in bf16
        state = row["peak_with_trainable_state_bytes"] - row["peak_step_bytes"]
        assert state == row["trainable_params"] * 2 * 3, row
    assert {row["method"] for row in suites["decode"]["rows"]} == EXPECTED_METHODS["decode"]


def test_results_accumulate_across_suites(tmp_path: Path) -> None:
    """Running suites one at a time into one folder keeps the earlier suites."""
    assert bench.main(["--suite", "size", "--smoke", "--out", str(tmp_path)]) == 0
    assert bench.main(["--suite", "merge", "--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["suites"]) == {"size", "merge"}


def test_several_suites_in_one_command(tmp_path: Path) -> None:
    """`--suite size merge` runs both, in that order, into one results folder."""
    assert bench.main(["--suite", "size", "merge", "--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["suites"]) == ["size", "merge"]


def test_quality_parts_run_separately_are_combined(tmp_path: Path) -> None:
    """Parts run one at a time into one folder keep each other's figures, each with its own command."""
    for part in ("seq2seq", "smollm2_low", "smollm2_full"):
        assert bench.main(["--suite", "quality", "--quality-part", part, "--smoke", "--out", str(tmp_path)]) == 0
        if part == "seq2seq":
            seq2seq_rows = json.loads((tmp_path / "results.json").read_text())["suites"]["quality"]["rows"]
    quality = json.loads((tmp_path / "results.json").read_text())["suites"]["quality"]
    assert [r for r in quality["rows"] if r["part"] == "seq2seq"] == seq2seq_rows
    assert {r["part"] for r in quality["rows"]} == {"seq2seq", "smollm2_low", "smollm2_full"}
    for part in ("seq2seq", "smollm2_low", "smollm2_full"):
        assert f"--quality-part {part}" in quality["part_runs"][part]["command"]
    assert {"quality_seq2seq_loss.png", "quality_smollm2_loss.png"} <= set(quality["plots"])
    assert {t["case"] for t in quality["targets"]} == {"full", "low"}  # targets come from the combined parts


def test_quality_runs_of_one_part_combine_across_commands(tmp_path: Path) -> None:
    """More seeds of some methods, run later, are added to the stored runs of the part (the grid can be split)."""
    out = ["--suite", "quality", "--smoke", "--out", str(tmp_path), "--quality-part", "smollm2_low"]
    assert bench.main(out) == 0
    assert bench.main([*out, "--quality-methods", "pp_text", "lora_r8", "--quality-seeds", "1", "2"]) == 0
    quality = json.loads((tmp_path / "results.json").read_text())["suites"]["quality"]
    seeds = {}
    for run in quality["runs"]["smollm2_low"]:
        seeds.setdefault(run["method"], set()).add(run["seed"])
    assert seeds.pop("untuned") == {None}
    assert seeds == {m: ({0, 1, 2} if m in ("pp_text", "lora_r8") else {0}) for m in suite_quality.LM_METHODS}
    rows = {row["method"]: row for row in quality["rows"] if row["part"] == "smollm2_low"}
    assert rows["pp_text"]["seeds"] == 3 and "±" in rows["pp_text"]["loss_pm"]
    assert quality["settings"]["smollm2_low"]["seeds"] == [0, 1, 2]
    assert len(quality["part_runs"]["smollm2_low"]["earlier"]) == 1
    with pytest.raises(ValueError, match="unknown quality method.*choose from"):
        bench.main([*out, "--quality-methods", "pp_nothing"])
    # a narrowed run into an empty folder: the table and the plot show the methods that ran
    fresh = ["--suite", "quality", "--smoke", "--out", str(tmp_path / "fresh"), "--quality-part", "smollm2_low"]
    assert bench.main([*fresh, "--quality-methods", "pp_text"]) == 0
    quality = json.loads((tmp_path / "fresh" / "results.json").read_text())["suites"]["quality"]
    assert [row["method"] for row in quality["rows"]] == ["pp_text"]
    assert (tmp_path / "fresh" / "quality_smollm2_loss.png").stat().st_size > 0


def test_quality_combine_drops_the_single_seed_smollm2_part() -> None:
    """Results of the earlier single-part SmolLM2 suite are not mixed with the per-setting parts."""
    previous = {
        "runs": {"seq2seq": [], "smollm2": [{"method": "untuned", "lr": None, "seed": None, "eval_loss": 2.0}]},
        "settings": {"seq2seq": {}, "smollm2": {}},
        "part_runs": {"seq2seq": {"command": "old"}, "smollm2": {"command": "old"}},
    }
    result = suite_quality.combine(previous, {"settings": {"smollm2_low": {}}, "runs": {"smollm2_low": []}})
    assert list(result["runs"]) == ["seq2seq", "smollm2_low"]
    assert set(result["part_runs"]) == {"seq2seq", "smollm2_low"}


def test_peak_memory_counts_new_storage_only() -> None:
    """Views and in-place updates of tensors that existed before the block (weights) are not allocations."""
    import torch

    from benchmarks.common import PeakMemory

    weight = torch.randn(256, 256)
    with PeakMemory() as tracker:
        transposed = weight.t()  # a view of existing storage
        weight.mul_(1.0)  # in place
    assert tracker.peak == 0 and transposed.shape == (256, 256)
    with PeakMemory() as tracker:
        first = weight @ weight  # 256 KiB
        second = first + 1  # another 256 KiB while the first is alive
        del first
        third = second * 2  # the first is freed: still two alive at most
    assert tracker.peak == 2 * 256 * 256 * 4
    assert third.shape == (256, 256)


@pytest.mark.parametrize("projection", [False, True], ids=["raw", "mlp"])
def test_prefix_plus_step_needs_no_more_memory_than_stock(projection: bool) -> None:
    """Peak tensor memory of a training step (bytes, not time): PrefixPlus at most stock PEFT's, with the same MLP.

    Guards against holding the prefixes or the extended masks beyond the forward pass, and against per-layer
    full-size gradient buffers for the prefix.
    """
    import torch

    from benchmarks.common import build_llama, measure_peak_memory
    from benchmarks.suite_train import build_method

    base = build_llama(0, smoke=True)
    batch = torch.randint(3, base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for method in ("stock_proj", "pp_proj") if projection else ("stock_raw", "pp_raw"):
        _, step, _ = build_method(method, base, "cpu", prefix_length=4, mlp_width=16)
        step(batch)  # creates the optimizer state
        peaks[method] = measure_peak_memory(lambda step=step: step(batch), "cpu")[0]
    stock, ours = peaks.values()
    assert 0 < ours <= stock, peaks


def test_sdpa_kernel_report_names_the_kernels_that_ran(tmp_path: Path) -> None:
    """On the CPU, the unpadded base model's training pass runs sdpa's CPU flash kernel with `is_causal` and no mask,
    once per layer forward and once backward; a padded batch hands sdpa a mask."""
    from benchmarks import sdpa_kernels

    assert sdpa_kernels.main(["--device", "cpu", "--dtype", "bfloat16", "--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sdpa_kernels.json").read_text())
    rows = {(r["model"], r["padding"], r["phase"]): r for r in result["rows"]}
    assert set(rows) == {
        (model, padded, phase)
        for model in ("base", "prefix_plus")
        for padded in (False, True)
        for phase in ("train", "prefill", "decode")
    }
    layers = 2  # the smoke Llama
    unpadded = rows["base", False, "train"]
    assert unpadded["forward"] == unpadded["backward"] == {"flash (CPU)": layers}
    assert [(c["mask"], c["is_causal"], c["count"]) for c in unpadded["sdpa_calls"]] == [(None, True, layers)]
    assert all(c["mask"] for c in rows["base", True, "train"]["sdpa_calls"])
    assert rows["base", False, "decode"]["sdpa_calls"][0]["query"][2] == 1  # one new token against the cache
    markdown = (tmp_path / "sdpa_kernels.md").read_text()
    assert markdown.count("| base |") == markdown.count("| prefix_plus |") == 6


def test_sdpa_kernel_report_counts_a_cuda_kernel_once() -> None:
    """CUDA's entry operations call inner ones (efficient -> _efficient_attention_forward): one call, one count, with
    the GPU kernel launched inside it. Events built by hand, as the profiler gives them on a GPU, since CI has none."""
    from types import SimpleNamespace

    from benchmarks.sdpa_kernels import summarise

    def event(name, parent=None, kernels=(), shapes=None, values=None):
        node = SimpleNamespace(name=name, cpu_parent=parent, cpu_children=[], input_shapes=shapes)
        node.kernels = [SimpleNamespace(name=k) for k in kernels]
        node.concrete_inputs = values
        if parent is not None:
            parent.cpu_children.append(node)
        return node

    sdpa = event(
        "aten::scaled_dot_product_attention",
        shapes=[[2, 6, 8, 64], [2, 6, 24, 64], [2, 6, 24, 64], [2, 1, 8, 24], [], [], [], []],
        values=[None, None, None, None, 0.0, False, None, False],
    )
    entry = event("aten::_scaled_dot_product_efficient_attention", sdpa)
    inner = event("aten::_efficient_attention_forward", entry, kernels=["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"])
    flash_bwd = event("aten::_scaled_dot_product_flash_attention_backward", kernels=["flash_bwd_kernel"])
    softmax = event("aten::softmax")
    summary = summarise([sdpa, entry, inner, flash_bwd, softmax, event("aten::mm", kernels=["gemm"])])
    assert summary["forward"] == {"efficient": 1, "none: eager softmax": 1}
    assert summary["backward"] == {"flash": 1}
    assert summary["gpu_kernels"] == {"fmha_cutlassF_bf16_aligned_64x64_rf_sm80": 1, "flash_bwd_kernel": 1}
    assert summary["sdpa_calls"] == [
        {"query": [2, 6, 8, 64], "key": [2, 6, 24, 64], "mask": [2, 1, 8, 24], "is_causal": False, "enable_gqa": False,
         "count": 1}
    ]  # fmt: skip


def test_quality_recipe_parts_run_their_recipes_with_their_schedules(tmp_path: Path) -> None:
    """The sweep part runs named recipes at seed 0 (a longer prefix, a cosine schedule with warmup, raw prefixes from
    text); each run records its recipe, and the learning rate follows the recipe's schedule."""
    out = ["--suite", "quality", "--smoke", "--out", str(tmp_path), "--quality-part", "smollm2_sweep"]
    methods = ["pp_text_p30", "pp_text_cosine", "raw_text"]
    assert bench.main([*out, "--quality-methods", *methods]) == 0
    quality = json.loads((tmp_path / "results.json").read_text())["suites"]["quality"]
    runs = {run["method"]: run for run in quality["runs"]["smollm2_sweep"]}
    assert set(runs) == set(methods)  # a narrowed run measures no untuned baseline
    assert all(run["seed"] == 0 for run in runs.values())
    assert runs["pp_text_p30"]["recipe"]["prefix"] == 30 and runs["raw_text"]["recipe"]["projection"] is False
    assert runs["pp_text_p30"]["trainable_params"] > runs["pp_text_cosine"]["trainable_params"]  # 30 embedding rows
    recipe = suite_quality.LM_RECIPES["pp_text_cosine"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    scheduler = suite_quality.lm_scheduler(recipe, optimizer, steps=30)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[recipe.warmup] == pytest.approx(recipe.lr)  # linear warmup to the peak
    assert rates[-1] < 0.05 * recipe.lr  # cosine to 0 at the last step
    with pytest.raises(ValueError, match="has no default methods"):
        bench.main(["--suite", "quality", "--smoke", "--out", str(tmp_path), "--quality-part", "smollm2_best_low"])


def test_run_py_spells_out_the_quality_parts() -> None:
    assert bench.QUALITY_PARTS == suite_quality.PARTS


@pytest.mark.parametrize("init", ["zero", "random"])
def test_fan_in_rates_give_the_mlp_a_raw_prefix_step(init: str) -> None:
    """Under uniform rates one AdamW step moves every output of a prefix MLP by up to ``0.45 * hidden * lr`` (the
    weight's entries move together); under :func:`fan_in_param_groups` by a small multiple of ``lr``, as a raw
    prefix moves. The groups put each linear weight at ``lr / in_features`` and everything else at ``lr``."""
    from peft_prefix_plus import PrefixPlusConfig

    lr = 1e-2
    steps = {}
    for rates in ("uniform", "fan_in"):
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
        )  # fmt: skip
        config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, init_weights=init, token_dim=96)
        model = peft.get_peft_model(base, config)
        groups = suite_quality.fan_in_param_groups(model, lr) if rates == "fan_in" else model.parameters()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        encoder = model.base_model.prefix_plus_layer.prefix_plus_sites["default"]["self"]
        before = encoder.project().detach().clone()
        model(input_ids=torch.randint(0, 64, (2, 6)), labels=torch.randint(0, 64, (2, 6))).loss.backward()
        optimizer.step()
        steps[rates] = (encoder.project().detach() - before).abs().mean().item() / lr
        if rates == "fan_in":
            by_rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
            assert {by_rate[id(p)] for p in encoder.mlp.parameters() if p.ndim == 2} == {lr / 96}
            assert by_rate[id(encoder.embedding.weight)] == lr
            assert {by_rate[id(p)] for p in encoder.mlp.parameters() if p.ndim == 1} == {lr}
            assert len(by_rate) == len(params)
    assert steps["uniform"] > 10 * steps["fan_in"]
    assert steps["fan_in"] < 3


def test_issue_26_targets_judge_the_best_prefix_recipe_against_the_best_lora() -> None:
    """Only the part's best PrefixPlus recipe carries the loss and gap targets, measured against the best LoRA run
    of the part; the other recipes' gaps are stated without a target."""

    def rows(part: str, losses: dict[str, float]) -> list[dict]:
        return [{"part": part, "method": m, "loss": v, "seeds": 3} for m, v in losses.items()]

    found = suite_quality.lm_targets(
        rows("smollm2_best_low", {"pp_text": 0.68, "pp_text_p100": 0.61, "lora_r8": 0.70, "lora_r8_3e-3": 0.65})
        + rows("smollm2_long", {"pp_text_p100": 0.40, "stock_proj": 0.45, "lora_r8_3e-3": 0.39})
    )
    by = {(t["case"], t["comparison"]): t for t in found}
    assert by[("best_low", "pp_text_p100")]["met"] is True  # 0.61 <= 0.62
    gap = by[("best_low", "pp_text_p100 − lora_r8_3e-3")]  # the better LoRA run is the reference
    assert gap["ratio"] == "-0.0400" and gap["met"] is True
    assert by[("best_low", "pp_text − lora_r8_3e-3")]["met"] is None
    assert ("best_low", "pp_text") not in by  # only the best recipe gets the loss target
    long_gap = by[("long", "pp_text_p100 − lora_r8_3e-3")]
    assert long_gap["target"] == "≤ +0.02" and long_gap["met"] is True
    assert by[("long", "stock_proj − lora_r8_3e-3")]["met"] is None


def test_prefix_length_plot_comes_from_the_sweep_runs(tmp_path: Path) -> None:
    runs = [{"method": m, "seed": 0, "lr": 2e-3, "eval_loss": v, "bleu": 30.0} for m, v in
            (("pp_text", 0.57), ("pp_text_p30", 0.59), ("pp_text_p100", 0.57), ("lora_r8", 0.5))]  # fmt: skip
    assert suite_quality.plot_prefix_length({"runs": {"smollm2_sweep": runs}}, str(tmp_path)) == [
        "quality_prefix_length.png"
    ]
    assert (tmp_path / "quality_prefix_length.png").stat().st_size > 1000
    assert suite_quality.plot_prefix_length({"runs": {"smollm2_sweep": runs[:1]}}, str(tmp_path / "none")) == []


def test_long_part_runs_its_three_methods_at_their_own_rates(tmp_path: Path) -> None:
    """``smollm2_long`` (200 steps in a real run; 2 in a smoke run) trains the best PrefixPlus recipe, stock with
    projection and LoRA at its 200-step rate, with the untuned baseline, and records each run's rate and curve."""
    out = ["--suite", "quality", "--smoke", "--out", str(tmp_path), "--quality-part", "smollm2_long"]
    assert bench.main(out) == 0
    quality = json.loads((tmp_path / "results.json").read_text())["suites"]["quality"]
    runs = {run["method"]: run for run in quality["runs"]["smollm2_long"]}
    assert set(runs) == {"untuned", *suite_quality.LM_SETTINGS["long"].methods}
    assert runs["lora_r8_3e-3"]["lr"] == 3e-3 and runs["pp_text_p100"]["recipe"]["prefix"] == 100
    assert all(run["curve_steps"] == [0, 1, 2] for name, run in runs.items() if name != "untuned")
    assert suite_quality.LM_SETTINGS["long"].steps == 200
    assert {t["case"] for t in quality["targets"]} == {"long"}  # the gap to LoRA, judged for the best recipe
