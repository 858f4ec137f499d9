"""Pushing PrefixPlus adapters to the Hub and loading them by repo id, against the test Hub server.

The real ``huggingface_hub`` client talks to :class:`tests.hub_server.HubServer` on 127.0.0.1. ``huggingface_hub``
reads its settings (endpoint, cache, offline mode, Xet) into module constants at import, so the ``hub`` fixture sets
both the environment variables and those constants, with a fresh ``HF_HOME`` per test.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.hf_api
import peft
import pytest
import torch
import transformers.utils.hub
from conftest import batch_for, tiny_model
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_prefix_plus import HubPushError, PrefixPlusConfig, push_adapter
from peft_prefix_plus.cli import main as cli_main
from peft_prefix_plus.files import card as card_module
from peft_prefix_plus.files.card import SECTION_END, SECTION_START, write_card
from peft_prefix_plus.hub.push import summaries_from_dir
from peft_prefix_plus.tuner.geometry import build_site_encoders

REPO = "user/tiny-prefix-plus"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running test Hub, with huggingface_hub pointed at it, online, Xet off and a fresh HF_HOME."""
    server = HubServer().start()
    home = tmp_path / "hf_home"
    settings = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    # Module-level clients were built at import with the default endpoint: huggingface_hub's `file_exists` & co.
    # (used by PEFT) and transformers' cached HfApi.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.stop()


def go_offline(monkeypatch, server: HubServer) -> None:
    """Stop the server and switch huggingface_hub to offline mode: only the cache is left."""
    server.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def saved_base(tmp_path, family: str = "gpt2"):
    """A tiny model saved to ``tmp_path/base`` and reloaded from there (so its name_or_path is that directory)."""
    model, task = tiny_model(family)
    path = tmp_path / f"base-{family}"
    if not path.exists():
        model.save_pretrained(path)
    return type(model).from_pretrained(path).eval(), task, str(path)


def prefix_plus_model(tmp_path, family: str = "gpt2", **config):
    base, task, _ = saved_base(tmp_path, family)
    torch.manual_seed(3)
    return get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=4, **config)).eval()


def logits(model, task: str = "CAUSAL_LM") -> torch.Tensor:
    batch = batch_for(task)
    batch.pop("labels")
    if task == "SEQ_2_SEQ_LM":
        batch["decoder_input_ids"] = batch["input_ids"][:, :3]
    with torch.no_grad():
        return model(**batch).logits


def tree_digest(path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path."""
    digests = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as file:
                digests[os.path.relpath(full, path)] = hashlib.sha256(file.read()).hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------------------- 1. load
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_push_then_load_by_repo_id_gives_identical_logits(hub, tmp_path, merged):
    model = prefix_plus_model(tmp_path)
    revision = None
    if merged:
        model.merge_mlp()
        assert model.peft_config["default"].merged_from is not None
        revision = "merged"  # merged adapters go to a branch, as a user comparing both would do
    expected = logits(model)

    commit = model.push_to_hub(REPO, revision=revision, token=hub.token)
    assert commit.oid == hub.repos[REPO].branches[revision or "main"]
    files = set(hub.repos[REPO].resolve(revision or "main").files)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files

    base, _, _ = saved_base(tmp_path)
    loaded = PeftModel.from_pretrained(base, REPO, revision=revision, token=hub.token).eval()
    assert loaded.peft_config["default"].prefix_projection is not merged
    assert torch.equal(logits(loaded), expected)


def test_auto_peft_model_and_card_snippet_load_by_repo_id(hub, tmp_path, monkeypatch):
    model = prefix_plus_model(tmp_path, mlp_depth=2, mlp_activation="gelu")
    expected = logits(model)
    monkeypatch.setenv("HF_TOKEN", hub.token)  # token from the environment this time
    model.push_to_hub(REPO)

    auto = AutoPeftModelForCausalLM.from_pretrained(REPO).eval()  # the base model is a local directory
    assert torch.equal(logits(auto), expected)

    # The card's "How to use" snippet runs as written and loads the same adapter.
    card = ModelCard.load(REPO)
    snippet = re.search(r"```python\n(.*?)```", card.text, re.DOTALL).group(1)
    assert snippet.index("import peft_prefix_plus") < snippet.index("from_pretrained")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert torch.equal(logits(namespace["model"].eval()), expected)


# ---------------------------------------------------------------------------------------------------------- 2. card
def test_pushed_card_parses_and_carries_the_metadata(hub, tmp_path):
    model = prefix_plus_model(tmp_path, layers_to_transform=[1])
    model.peft_config["default"].base_model_name_or_path = "org/tiny-gpt2"
    model.push_to_hub(REPO, token=hub.token, metrics={"eval_loss": 1.25, "epochs": 3})

    card = ModelCard(hub.file(REPO, "README.md").decode())
    card.validate()  # the server's validate-yaml endpoint
    data = card.data
    assert data.library_name == "peft"
    assert data.base_model == "org/tiny-gpt2"
    assert {"prefix-plus", "peft", "causal-lm", "base_model:adapter:org/tiny-gpt2"} <= set(data.tags)
    assert data.pipeline_tag == "text-generation"
    text = card.text
    assert text.index("import peft_prefix_plus") < text.index("PeftModel.from_pretrained")
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in text
    assert "| self-attention | 4 | 1 (of 2) | 4 × 8 |" in text
    assert "MLP: depth 1, width 32, activation `tanh`" in text
    assert "| MLP merged into raw prefixes | no |" in text
    assert "| eval_loss | 1.25 |" in text and "| epochs | 3 |" in text
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"| Trainable parameters | {n_params:,} |" in text


def test_card_of_a_merged_encoder_decoder_adapter(hub, tmp_path):
    model = prefix_plus_model(tmp_path, "t5", encoder_num_virtual_tokens=2, cross_num_virtual_tokens=0)
    model.merge_mlp()
    model.push_to_hub(REPO, token=hub.token)
    card = ModelCard(hub.file(REPO, "README.md").decode())
    assert card.data.pipeline_tag == "text2text-generation"
    assert "seq2seq-lm" in card.data.tags
    assert "| encoder self-attention | 2 | all 2 | 4 × 8 |" in card.text
    assert "| decoder cross-attention | 0 | none | 4 × 8 |" in card.text
    assert "| Prefixes produced by | raw (no MLP) |" in card.text
    assert "| MLP merged into raw prefixes | yes, from" in card.text
    assert "AutoModelForSeq2SeqLM" in card.text


def test_save_pretrained_writes_the_card_and_keeps_user_text(tmp_path):
    model = prefix_plus_model(tmp_path)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nMy own notes.\n")
    model.save_pretrained(out)
    model.save_pretrained(out)  # saving again replaces the generated section, nothing else

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "peft"
    assert card.data.tags[0] == "mine" and "prefix-plus" in card.data.tags
    assert card.text.count(SECTION_START) == 1 and card.text.count(SECTION_END) == 1
    assert card.text.index("My own notes.") < card.text.index(SECTION_START)
    assert "import peft_prefix_plus" in card.text


def test_other_peft_types_keep_the_stock_behaviour(hub, tmp_path):
    base, _, _ = saved_base(tmp_path)
    lora = get_peft_model(base, LoraConfig(target_modules=["c_attn"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    card = ModelCard.load(tmp_path / "lora" / "README.md")
    assert card.data.library_name == "peft"
    assert "prefix-plus" not in (card.data.tags or []) and SECTION_START not in card.text
    assert "push_adapter" in PeftModel.push_to_hub.__doc__
    with pytest.raises(HubPushError, match="PrefixPlus PeftModel"):
        push_adapter(lora, REPO)
    lora.push_to_hub("user/lora", token=hub.token)  # transformers' stock push_to_hub
    pushed = ModelCard(hub.file("user/lora", "README.md").decode())
    assert "prefix-plus" not in (pushed.data.tags or []) and SECTION_START not in pushed.text
    assert "adapter_config.json" in hub.repos["user/lora"].resolve("main").files


# ---------------------------------------------------------------------------------------------------------- 3. update
def test_second_push_updates_and_branch_push_leaves_main_intact(hub, tmp_path):
    model = prefix_plus_model(tmp_path)
    model.push_to_hub(REPO, token=hub.token, commit_message="first")
    first = hub.file(REPO, "adapter_model.safetensors")

    # The owner edits the card on the Hub; the next push must keep the edit.
    card = ModelCard(hub.file(REPO, "README.md").decode())
    card.data.license = "apache-2.0"
    card.text = card.text + "\n## Notes by the owner\n\nTrained on my data.\n"
    HfApi().upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=REPO, token=hub.token)

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)
    model.push_to_hub(REPO, token=hub.token, commit_message="second")
    second = hub.file(REPO, "adapter_model.safetensors")
    assert second != first
    updated = ModelCard(hub.file(REPO, "README.md").decode())
    assert updated.data.license == "apache-2.0" and "prefix-plus" in updated.data.tags
    assert "Trained on my data." in updated.text and updated.text.count(SECTION_START) == 1
    repo = hub.repos[REPO]
    assert repo.commits[repo.branches["main"]].message == "second"

    main_head = repo.branches["main"]
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)
    model.push_to_hub(REPO, token=hub.token, revision="experiment")
    assert repo.branches["main"] == main_head
    assert hub.file(REPO, "adapter_model.safetensors") == second
    assert hub.file(REPO, "adapter_model.safetensors", "experiment") not in (first, second)
    assert 'revision="experiment"' in hub.file(REPO, "README.md", "experiment").decode()
    assert "Trained on my data." in hub.file(REPO, "README.md", "experiment").decode()


# ---------------------------------------------------------------------------------------------------------- 4. private
def test_private_flag_reaches_the_server(hub, tmp_path, capsys):
    model = prefix_plus_model(tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    code = cli_main(["push", REPO, str(tmp_path / "adapter"), "--private", "--token", hub.token])
    assert code == 0, capsys.readouterr().err
    assert f"Pushed {tmp_path / 'adapter'} to {REPO}" in capsys.readouterr().out

    (create,) = hub.requests_to("POST", r"^/api/repos/create$")
    assert create["body"]["visibility"] == "private" and create["authorized"]
    assert hub.repos[REPO].private
    with pytest.raises(HfHubHTTPError):  # anonymous readers do not see it
        HfApi().model_info(REPO, token=False)

    model.push_to_hub("user/public-one", token=hub.token)
    assert not hub.repos["user/public-one"].private


# ---------------------------------------------------------------------------------------------------------- 5. 500
def test_server_error_during_commit_is_clear_and_changes_nothing(hub, tmp_path, capsys):
    model = prefix_plus_model(tmp_path)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    before = tree_digest(adapter)
    hub.fail_commits = True

    assert cli_main(["push", REPO, str(adapter), "--token", hub.token]) == 1
    err = capsys.readouterr().err
    assert "prefix-plus push: error: Pushing the adapter to user/tiny-prefix-plus failed (HTTP 500)" in err
    assert "The local adapter files were not changed" in err
    with pytest.raises(HubPushError, match="HTTP 500") as raised:
        model.push_to_hub(REPO, token=hub.token)
    assert raised.value.__cause__.response.status_code == 500

    assert tree_digest(adapter) == before
    assert set(hub.repos[REPO].resolve("main").files) == {".gitattributes"}  # nothing was committed
    assert hub.requests_to("POST", r"/commit/main$")  # the commit really was attempted


# ---------------------------------------------------------------------------------------------------------- 6. offline
def test_offline_load_from_cache_after_a_push(hub, tmp_path, monkeypatch):
    model = prefix_plus_model(tmp_path)
    expected = logits(model)
    model.push_to_hub(REPO, token=hub.token)
    base, _, _ = saved_base(tmp_path)
    PeftModel.from_pretrained(base, REPO, token=hub.token)  # first load fills the cache

    go_offline(monkeypatch, hub)
    base, _, _ = saved_base(tmp_path)
    offline = PeftModel.from_pretrained(base, REPO).eval()
    assert torch.equal(logits(offline), expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(REPO).eval()
    assert torch.equal(logits(auto), expected)


# ---------------------------------------------------------------------------------------------------------- 7. token
def test_token_is_never_printed_logged_or_written(hub, tmp_path, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    model = prefix_plus_model(tmp_path)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)

    model.push_to_hub(REPO, token=hub.token, revision="dev")  # token passed in
    monkeypatch.setenv("HF_TOKEN", hub.token)  # token from the environment
    assert cli_main(["push", REPO, str(adapter), "--private"]) == 0
    hub.fail_commits = True  # errors must not reveal it either (new repos: unchanged files are not re-committed)
    assert cli_main(["push", "user/second", str(adapter)]) == 1
    with pytest.raises(HubPushError) as raised:
        push_adapter(adapter, "user/third", token=hub.token)
    assert all(r["authorized"] for r in hub.requests_to("POST", "/commit/"))  # the token was used

    out, err = capfd.readouterr()
    assert out and err and caplog.records
    logged = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    for text in (out, err, logged, caplog.text, str(raised.value), repr(raised.value.__cause__)):
        assert hub.token not in text
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                assert hub.token.encode() not in file.read(), os.path.join(root, name)
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            assert not any(hub.token.encode() in content for content in commit.files.values())


# ---------------------------------------------------------------------------------------------------------- 8. which
def saved_run(tmp_path):
    """A ``save_pretrained`` directory holding adapters "default" (root) and "other" (subfolder), and beside them a
    Trainer checkpoint that also holds an adapter_config.json."""
    model = prefix_plus_model(tmp_path)
    model.add_adapter("other", PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    run = tmp_path / "run"
    model.save_pretrained(run)
    model.save_pretrained(run / "checkpoint-500", selected_adapters=["default"])
    (run / "checkpoint-500" / "trainer_state.json").write_text("{}")
    return run


@pytest.mark.parametrize("named", [[], ["other"]], ids=["root-only", "other-named"])
def test_only_named_adapters_are_pushed_and_listed_never_checkpoints(hub, tmp_path, named):
    run = saved_run(tmp_path)
    with pytest.warns(UserWarning, match="Not pushed: subfolders checkpoint-500"):
        push_adapter(run, REPO, token=hub.token, adapter_names=named)
    files = set(hub.repos[REPO].resolve("main").files)
    expected = {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    expected |= {f"other/{name}" for name in ("adapter_config.json", "adapter_model.safetensors") if named}
    assert files == expected
    text = hub.file(REPO, "README.md").decode()
    assert "checkpoint-500" not in text
    assert ("#### Adapter `other` (subfolder `other`)" in text) is bool(named)
    assert [s.name for s in summaries_from_dir(run, named)] == ["default", *named]


def test_model_push_lists_every_adapter_of_the_model(hub, tmp_path):
    model = prefix_plus_model(tmp_path)
    model.add_adapter("other", PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.push_to_hub(REPO, token=hub.token)
    assert "other/adapter_model.safetensors" in hub.repos[REPO].resolve("main").files
    assert "#### Adapter `other` (subfolder `other`)" in hub.file(REPO, "README.md").decode()


# ---------------------------------------------------------------------------------------------------------- 9. local
def _bin_only(adapter):
    torch.save({}, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()


def _nan(adapter):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, path)


def _config(**changes):
    def edit(adapter):
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _file(name: str, text: str):
    return lambda adapter: (adapter.parent / name).write_text(text)


GOOD = ["{repo}", "{dir}", "--token", "{token}"]
BAD_LOCAL_INPUTS = {
    # case: (arguments after `push`, what spoils the saved adapter {dir} or its parent {tmp}, expected message)
    "metrics-missing": ([*GOOD, "--metrics", "{tmp}/missing.json"], None, "missing.json"),
    "metrics-not-json": ([*GOOD, "--metrics", "{tmp}/m.json"], _file("m.json", "{"), "not valid JSON"),
    "metrics-not-a-mapping": ([*GOOD, "--metrics", "{tmp}/m.json"], _file("m.json", "[1]"), "must be a mapping"),
    "bin-only": (GOOD, _bin_only, "only safetensors is supported"),
    "nan-in-weights": (GOOD, _nan, "non-finite values (NaN or Inf)"),
    "config-edited": (GOOD, _config(mlp_depth=2), "mlp_depth is 2"),
    "not-prefix-plus": (GOOD, _config(peft_type="LORA"), "peft_type 'LORA'"),
    "dir-missing": (["{repo}", "{tmp}/nope"], None, "nope"),
    "arguments-swapped": (["{dir}", "{repo}"], None, "not a valid Hub repo id"),
    "bad-repo-id": (["a/b/c", "{dir}"], None, "not a valid Hub repo id"),
    "pr-to-a-branch": ([*GOOD, "--create-pr", "--revision", "dev"], None, "pull request is opened against main"),
    "subfolder-not-an-adapter": ([*GOOD, "--adapter", "nope"], None, "nope"),
    "adapter-name-is-a-path": ([*GOOD, "--adapter", "../adapter"], None, "is not the name of a subfolder"),
}


@pytest.mark.parametrize("case", list(BAD_LOCAL_INPUTS))
def test_bad_local_input_is_refused_before_any_request(hub, tmp_path, capsys, case):
    args, spoil, message = BAD_LOCAL_INPUTS[case]
    adapter = tmp_path / "adapter"
    prefix_plus_model(tmp_path).save_pretrained(adapter)
    if spoil:
        spoil(adapter)
    before = tree_digest(tmp_path)

    argv = [arg.format(repo=REPO, dir=adapter, tmp=tmp_path, token=hub.token) for arg in args]
    assert cli_main(["push", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert hub.requests == [] and hub.repos == {}  # no repo, no branch: nothing reached the Hub
    assert tree_digest(tmp_path) == before


def test_missing_metrics_creates_no_repo_and_no_branch(hub, tmp_path):
    model = prefix_plus_model(tmp_path)
    with pytest.raises(HubPushError, match="missing.json.*Nothing was sent to the Hub"):
        model.push_to_hub(REPO, token=hub.token, revision="dev", metrics=str(tmp_path / "missing.json"))
    assert hub.requests == [] and hub.repos == {}


def test_unreachable_hub_is_a_clear_error(hub, tmp_path, monkeypatch):
    model = prefix_plus_model(tmp_path)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "HF_ENDPOINT": closed, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "hf_home")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env.pop("HF_HUB_OFFLINE", None)

    command = [sys.executable, "-m", "peft_prefix_plus.cli", "push", REPO, str(adapter)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"prefix-plus push: error: Could not reach the Hub at {closed} to push {REPO}" in result.stderr
    assert "Traceback" not in result.stderr and hub.token not in result.stderr + result.stdout

    hub.stop()  # in process too: the fixture's endpoint no longer answers
    with pytest.raises(HubPushError, match="Could not reach the Hub.*Check the network connection and HF_ENDPOINT"):
        model.push_to_hub(REPO, token=hub.token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set. Unset it to push. Nothing was sent to the Hub."):
        model.push_to_hub(REPO, token=hub.token)


# ---------------------------------------------------------------------------------------------------------- 10. CLI
def test_cli_follows_hf_upload_conventions(hub, tmp_path, monkeypatch, capsys):
    adapter = tmp_path / REPO.split("/")[1]
    prefix_plus_model(tmp_path).save_pretrained(adapter)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", hub.token)

    # LOCAL_DIR defaults to the folder named like the repository; no --token, no warning.
    assert cli_main(["push", REPO, "--commit-message", "First", "--commit-description", "BLEU 35.2"]) == 0
    out, err = capsys.readouterr()
    assert f"Pushed {adapter.name} to {REPO}" in out and "shell history" not in err
    repo = hub.repos[REPO]
    first = repo.commits[repo.branches["main"]]
    assert (first.message, first.description) == ("First", "BLEU 35.2")

    assert cli_main(["push", REPO, str(adapter), "--revision", "dev", "--token", hub.token]) == 0
    assert "`--token <value>` leaves your token in your shell history" in capsys.readouterr().err
    assert "dev" in repo.branches

    assert cli_main(["push", REPO, str(adapter), "--create-pr", "--metrics", _metrics(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{REPO}/discussions/1" in out
    assert repo.branches["main"] == first.sha  # a pull request leaves main as it was
    assert "| eval_loss | 0.5 |" in hub.file(REPO, "README.md", "refs/pr/1").decode()


def _metrics(tmp_path) -> str:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"eval_loss": 0.5}))
    return str(path)


# ---------------------------------------------------------------------------------------------------------- 11. card
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # PEFT looks for the base model's config
@pytest.mark.parametrize(
    "recorded, named",
    [
        (SMOLLM2, SMOLLM2),  # what the example records
        (f"/home/me/.cache/huggingface/hub/models--{SMOLLM2.replace('/', '--')}/snapshots/0123abc", SMOLLM2),
        ("/home/me/models/smollm2", None),  # a local directory: no Hub id is known
    ],
    ids=["hub-id", "hf-cache-snapshot", "local-dir"],
)
def test_card_names_the_hub_id_of_the_base_model(tmp_path, recorded, named):
    model = prefix_plus_model(tmp_path)
    model.peft_config["default"].base_model_name_or_path = recorded
    model.get_base_model().name_or_path = recorded  # what PEFT's own card writer reads
    out = tmp_path / "adapter"
    model.save_pretrained(out)

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == named
    adapter_tags = [tag for tag in card.data.tags if tag.startswith("base_model:adapter:")]
    assert adapter_tags == ([f"base_model:adapter:{named}"] if named else [])
    base = named or recorded
    assert f'base = AutoModelForCausalLM.from_pretrained("{base}")' in card.text
    assert ("The base model was a local directory" in card.text) is (named is None)


def test_card_opens_with_the_import_and_the_install_from_source(tmp_path, monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as file:
        urls = tomllib.load(file)["project"]["urls"]
    assert urls["Repository"].startswith("https://")
    installed = email.message.Message()
    for name, url in urls.items():
        installed["Project-URL"] = f"{name}, {url}"
    monkeypatch.setattr(card_module.metadata, "metadata", lambda name: installed)  # as pip installs it

    out = tmp_path / "adapter"
    prefix_plus_model(tmp_path).save_pretrained(out)
    text = ModelCard.load(out / "README.md").text
    callout = text[text.index(SECTION_START) + len(SECTION_START) :].strip().split("\n\n")[0]  # the first lines
    assert callout.startswith("> [!IMPORTANT]\n> Run `import peft_prefix_plus` before loading")
    assert "KeyError: 'PREFIX_PLUS'" in callout and f"`pip install git+{urls['Repository']}`" in callout
    usage = text[text.index("### How to use") :]
    assert usage.index(f"pip install git+{urls['Repository']}") < usage.index("import peft_prefix_plus")
    assert "pip install peft-prefix-plus" not in text


def test_card_builds_on_peft_writer_and_keeps_user_tags(tmp_path):
    model = prefix_plus_model(tmp_path)
    model.get_base_model().add_model_tags(["trl", "sft"])  # as TRL's SFTTrainer does; PEFT's writer copies them
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text("---\ntags:\n- mine\nbase_model: org/chosen-by-me\n---\n\nNotes.\n")
    model.save_pretrained(out)
    data = ModelCard.load(out / "README.md").data
    assert data.tags[0] == "mine" and {"trl", "sft", "transformers", "prefix-plus"} <= set(data.tags)
    assert data.base_model == "org/chosen-by-me"
    assert (out / "README.md").read_text().count(f"- PEFT {peft.__version__}") == 1


def test_card_counts_trainable_parameters_not_the_text_init_buffer():
    config = PrefixPlusConfig(
        num_virtual_tokens=4,
        init_weights="text",
        init_text="hello",
        site_shapes={"self": {"num_layers": 2, "num_key_value_heads": 2, "head_dim": 8}},
        token_dim=16,
    )
    encoders = build_site_encoders(config, device="cpu")
    state = {f"base_model.model.prefix_plus_layer.prefix_plus_sites.{k}": v for k, v in encoders.state_dict().items()}
    assert any(key.endswith("prefix_init") for key in state)  # saved with the adapter, but not trained
    summary = card_module.adapter_summary("default", config, state)
    assert summary.num_parameters == sum(p.numel() for p in encoders.parameters() if p.requires_grad)


def test_card_describes_modules_to_save(tmp_path):
    config = PrefixPlusConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=4,
        site_shapes={"self": {"num_layers": 2, "num_key_value_heads": 2, "head_dim": 8}},
        token_dim=16,
        base_model_name_or_path="org/bert-tiny",
    )
    config.modules_to_save = ["classifier", "score"]  # what PEFT fills in for SEQ_CLS
    tensors = {
        "base_model.model.classifier.weight": torch.zeros(3, 16),
        "base_model.model.classifier.bias": torch.zeros(3),
    }
    summary = card_module.adapter_summary("default", config, tensors)
    assert summary.num_labels == 3
    text = card_module.update_card(None, [summary], "me/cls").text
    assert 'AutoModelForSequenceClassification.from_pretrained("org/bert-tiny", num_labels=3)' in text
    assert "AutoPeftModelForSequenceClassification" in text
    assert "| Modules saved in full (`modules_to_save`) | `classifier` |" in text  # `score` holds no weights here
    assert "trained weights of `classifier` (PEFT's `modules_to_save`)" in text


def test_classifier_card_snippet_loads_the_trained_head(hub, tmp_path):
    base, task, _ = saved_base(tmp_path, "bert")
    torch.manual_seed(3)
    model = get_peft_model(base, PrefixPlusConfig(task_type=task, num_virtual_tokens=4)).eval()
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # a head unlike the base's
    expected = logits(model, task)
    model.push_to_hub(REPO, token=hub.token)

    text = ModelCard.load(REPO).text
    assert "num_labels=3)" in text and "| Modules saved in full (`modules_to_save`) | `classifier` |" in text
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert torch.equal(logits(namespace["model"].eval(), task), expected)


INVALID_YAML = "---\ntags: [unclosed\n---\n\n# Mine\n"


def test_readme_with_invalid_yaml_is_left_unchanged_with_a_warning(hub, tmp_path):
    model = prefix_plus_model(tmp_path)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text(INVALID_YAML)
    with pytest.warns(
        UserWarning, match="README.md could not be updated: its YAML front matter does not parse.*left unchanged"
    ):
        model.save_pretrained(out)
    assert (out / "README.md").read_text() == INVALID_YAML
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.warns(UserWarning, match="YAML front matter does not parse"):
        assert write_card(out, summaries_from_dir(out)) is None
    assert (out / "README.md").read_text() == INVALID_YAML


def test_push_leaves_a_card_with_invalid_yaml_unchanged_and_pushes_the_adapter(hub, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    prefix_plus_model(tmp_path).save_pretrained(adapter)
    (adapter / "README.md").write_text(INVALID_YAML)
    with pytest.warns(UserWarning, match="YAML front matter does not parse"):
        assert cli_main(["push", REPO, str(adapter), "--token", hub.token]) == 0, capsys.readouterr().err
    assert (adapter / "README.md").read_text() == INVALID_YAML
    files = hub.repos[REPO].resolve("main").files
    assert "adapter_model.safetensors" in files and "README.md" not in files

    # A card on the Hub that does not parse stays as it is, too (the client refuses to upload one: edit the server).
    repo = hub.repos[REPO]
    repo.add_commit("main", {**repo.resolve("main").files, "README.md": INVALID_YAML.encode()}, "edited on the Hub")
    with pytest.warns(UserWarning, match="YAML front matter does not parse"):
        push_adapter(adapter, REPO, token=hub.token)
    assert hub.file(REPO, "README.md") == INVALID_YAML.encode()
