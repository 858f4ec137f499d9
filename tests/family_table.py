"""The table of supported and refused model families in README.md and CONTRIBUTING.md, generated from the tests.

The rows come from the test suite's own lists: the families of the shared matrix (`conftest.FAMILY_SPECS`), the
vision-language and speech families (`conftest.MULTIMODAL_SPECS`), and the families the tests check are refused. Each
tested family's sites are found by adapting its tiny test model; each refused family's reason is the first sentence
of the error PrefixPlus raises for it. `tests/test_family_table.py` fails when a document's table differs from the
generated one; regenerate both with:

```bash
python tests/family_table.py --write
```
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DOCUMENTS = (REPO / "README.md", REPO / "CONTRIBUTING.md")
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"
#: The transformers version the committed tables are generated with (the newest supported).
GENERATED_WITH = "5.25"

#: How each group of tested families is tested.
MATRIX_TESTS = "the shared matrix"
MULTIMODAL_TESTS = "{inputs}: forward, training step, cached generation"
#: What a family shows beyond the common checks (the notes column).
NOTES = {
    "llama": "grouped-query attention",
    "falcon": "multi-query attention",
    "deepseek_v3": "multi-head latent attention: keys 24 wide, values 12; the cache holds latents",
    "gemma4": "per-layer shapes: sliding layers head dim 16, the full layer 32",
    "gemma3": "sliding and full layers",
    "whisper": "leave `task_type` unset (PEFT's seq2seq wrapper passes `input_ids`)",
}
#: Families the tests check are refused: model type -> (config class, model class, sizes).
REFUSED = {
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", {"num_labels": 2}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"n_layer": 2, "n_head": 4}),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        {"num_layers": 2, "num_heads": 4, "attention_types": [[["global"], 2]]},
    ),
}
SITE_ORDER = ("encoder", "self", "cross")


def _sites(model) -> str:
    tuner = model.base_model
    names = [site for site in SITE_ORDER if site in tuner._sites]
    encoder_decoder = tuner._is_encoder_decoder
    return ", ".join("self (decoder)" if site == "self" and encoder_decoder else site for site in names)


def rows() -> tuple[list[list[str]], list[list[str]]]:
    """The tested rows (family, model class, sites, how tested, notes) and the refused rows (family, reason)."""
    import transformers
    from conftest import FAMILY_SPECS, MULTIMODAL_SPECS, tiny_model
    from peft import get_peft_model

    from peft_prefix_plus import PrefixPlusConfig
    from peft_prefix_plus.errors import UnsupportedError

    tested = []
    for family, (_, _, model_cls, _) in {**FAMILY_SPECS, **MULTIMODAL_SPECS}.items():
        model, task = tiny_model(family)
        adapted = get_peft_model(model, PrefixPlusConfig(task_type=task, num_virtual_tokens=2))
        if family in FAMILY_SPECS:
            how = MATRIX_TESTS
        else:
            inputs = "audio features" if family == "whisper" else "images"
            how = MULTIMODAL_TESTS.format(inputs=inputs)
        tested.append([family, f"`{model_cls.__name__}`", _sites(adapted), how, NOTES.get(family, "")])
    refused = []
    for model_type, (config_name, model_name, sizes) in REFUSED.items():
        config = getattr(transformers, config_name)(
            vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64, **sizes
        )
        if "num_hidden_layers" in config.to_dict():
            config.num_hidden_layers = 2
        model = getattr(transformers, model_name)(config)
        task = "SEQ_CLS" if "Classification" in model_name else "CAUSAL_LM"
        try:
            get_peft_model(model, PrefixPlusConfig(task_type=task, num_virtual_tokens=2))
        except UnsupportedError as error:
            first = str(error).split("; see")[0].split(". ")[0]
            refused.append([model_type, f"`{model_name}`", first.replace("|", "\\|") + "; use LoRA"])
        else:
            raise AssertionError(f"{model_type} is listed as refused but was adapted")
    return tested, refused


def render() -> str:
    """The table, as markdown, between the markers."""
    tested, refused = rows()
    lines = [
        START,
        f"Generated from the tests by `python tests/family_table.py --write` (transformers {GENERATED_WITH}); every "
        "test runs under eager and sdpa attention. Vision-language models: the language model gets the prefixes, the "
        "vision tower none.",
        "",
        "| family | model class | sites | tested | notes |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in tested),
        "",
        "| refused | model class | why |",
        "|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in refused),
        END,
    ]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """``text`` with its table (between the markers) replaced by ``table``."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} block")
    return pattern.sub(lambda _: table, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables in README.md and CONTRIBUTING.md")
    args = parser.parse_args(argv)
    table = render()
    if not args.write:
        print(table)
        return 0
    for document in DOCUMENTS:
        document.write_text(replace_table(document.read_text(), table))
        print(f"updated {document.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
