"""Configuration of PrefixPlus adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from peft.config import PeftConfig
from peft.utils import PeftType
from peft.utils.constants import DUMMY_TARGET_MODULES
from transformers.activations import ACT2FN

from ..errors import PrefixPlusConfigError

#: The name of the PEFT method; `peft_prefix_plus.integration` adds it to PEFT's ``PeftType`` enum.
PEFT_TYPE_NAME = "PREFIX_PLUS"

#: The attention sites a PrefixPlus adapter can reach. ``"self"`` is the self-attention of a decoder-only or
#: encoder-only model, and the decoder self-attention of an encoder-decoder model.
SITES: tuple[str, ...] = ("self", "encoder", "cross")
INIT_WEIGHTS = ("random", "zero", "text")


@dataclass
class PrefixPlusConfig(PeftConfig):
    """Configuration of a [`PrefixPlusModel`]: prefix tuning at the attention level, with a configurable MLP.

    Every attention layer gets ``n`` trainable "virtual token" keys and values in front of its real keys and values
    (Li & Liang, 2021). Encoder-decoder models have three distinct sites, each with its own parameters: encoder
    self-attention, decoder self-attention and decoder cross-attention.

    Args:
        num_virtual_tokens (`int`): Prefix length at decoder self-attention; for encoder-only models, at their
            self-attention.
        encoder_num_virtual_tokens (`int`, *optional*): Prefix length at the encoder self-attention of an
            encoder-decoder model. `None` means `num_virtual_tokens`, `0` means no encoder prefix.
        cross_num_virtual_tokens (`int`, *optional*): Prefix length at the decoder cross-attention of an
            encoder-decoder model. `None` means `num_virtual_tokens`, `0` means no cross-attention prefix.
        prefix_projection (`bool`): Produce the prefixes with an MLP (the paper's reparametrisation). `False` trains
            the raw prefixes directly.
        mlp_hidden_size (`int`, *optional*): Width of each hidden layer of the MLP; `None` means `token_dim`.
        mlp_depth (`int`): Number of hidden layers of the MLP; 1 is the paper and stock PEFT.
        mlp_activation (`str`): Activation between MLP layers, a key of `transformers.activations.ACT2FN`.
        prefix_dropout (`float`): Dropout applied to the produced prefixes, in training only.
        layers_to_transform (`list[int]`, *optional*): Indices of the layers that get prefixes, counted within each
            stack (encoder or decoder). `None` means all layers.
        offset_position_ids (`bool`): If `True`, the position ids of real tokens start at the prefix length, as in
            stock PEFT prefix tuning (needed for identical outputs). Decoder-only models only.
        init_weights (`str`): `"random"`, `"zero"` or `"text"` (PEFT's booleans `True`/`False` mean `"random"`,
            the default). `"zero"` makes the initial prefixes zero: with a
            projection the last MLP layer starts at zero, otherwise the raw prefixes do. Note that zero keys still
            receive attention, so a zero prefix is not an identity. `"text"` (Li & Liang's initialisation from real
            words) runs the base model once on `init_text` and makes the keys and values every attention layer
            computes for it the initial prefixes, at every site; with a projection they are kept as a fixed
            `prefix_init` buffer that the MLP, whose last layer starts at zero, learns to correct. The text pass runs
            whenever an adapter is created (also with `inference_mode=True`), never when a saved one is loaded.
        init_text (`str`, *optional*): The text for `init_weights="text"`. Its tokens are repeated cyclically, or
            truncated, to the configured prefix length.
        tokenizer_name_or_path (`str`, *optional*): The tokenizer for `init_text`; `None` means the base model's
            `name_or_path`.
        site_shapes (`dict`, *optional*): Filled in by PrefixPlus when the adapter is created: for each site, the
            number of layers, key/value heads and head dimension of the model (`num_layers`, `num_key_value_heads`,
            `head_dim`); where the layers of a site differ, or keys are wider than values (multi-head latent
            attention), `num_layers` and `layer_shapes`: one `[key/value heads, key dim, value dim]` per layer.
            Used to check that an adapter is loaded onto a matching model and to merge or inspect an adapter without
            the model.
        token_dim (`int`, *optional*): Input width of the MLP (and, unless `mlp_hidden_size` is set, its hidden
            width). `None` means the key/value width of the model's self-attention, `num_key_value_heads * head_dim`,
            as stock PEFT does; that is the hidden size except on grouped-query models. Filled in when the adapter is
            created and saved with it, so adapters keep the width they were trained with.
        merged_from (`dict`, *optional*): Set by `merge_mlp`: the MLP shape the raw prefixes were produced by.
        modules_to_save (`list[str]`, *optional*): Modules apart from the prefixes to be set as trainable and saved in
            the adapter, as in LoRA. For `SEQ_CLS` and `TOKEN_CLS` PEFT adds the classification head (`classifier`,
            `score`) by itself.

    Example:

    ```py
    >>> from peft import get_peft_model
    >>> from peft_prefix_plus import PrefixPlusConfig

    >>> config = PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, mlp_depth=2, mlp_activation="gelu")
    >>> model = get_peft_model(base_model, config)
    >>> model.print_trainable_parameters()
    ```
    """

    num_virtual_tokens: int = field(
        default=20,
        metadata={
            "help": "Prefix length at decoder self-attention; for encoder-only models, at their self-attention."
        },
    )
    encoder_num_virtual_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "Prefix length at the encoder self-attention of encoder-decoder models. "
            "None means num_virtual_tokens, 0 means no encoder prefix."
        },
    )
    cross_num_virtual_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "Prefix length at decoder cross-attention. None means num_virtual_tokens, 0 means no cross prefix."
        },
    )
    prefix_projection: bool = field(
        default=True, metadata={"help": "Produce prefixes with an MLP; False trains raw prefixes directly."}
    )
    mlp_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Width of each MLP hidden layer; None means token_dim."}
    )
    mlp_depth: int = field(default=1, metadata={"help": "Number of MLP hidden layers (1 = the paper and stock PEFT)."})
    mlp_activation: str = field(
        default="tanh", metadata={"help": "MLP activation, a name in transformers.activations.ACT2FN."}
    )
    prefix_dropout: float = field(default=0.0, metadata={"help": "Dropout on the produced prefixes, training only."})
    layers_to_transform: Optional[list[int]] = field(
        default=None, metadata={"help": "Indices of the layers that get prefixes, per stack; None means all."}
    )
    offset_position_ids: bool = field(
        default=False,
        metadata={"help": "Real tokens' position ids start at the prefix length, as in stock PEFT (decoder-only)."},
    )
    init_weights: Literal["random", "zero", "text"] = field(
        default="random",
        metadata={
            "help": 'Initialisation of the prefixes: "random", "zero", or "text" (the key/value states of the base '
            "model on `init_text`)."
        },
    )
    init_text: Optional[str] = field(
        default=None,
        metadata={
            "help": 'Text for init_weights="text"; its tokens are repeated cyclically or truncated to the prefix length.'
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer for init_text; None means the base model's name_or_path."},
    )
    site_shapes: Optional[dict[str, dict[str, int]]] = field(
        default=None,
        metadata={
            "help": "Filled in at creation: per site, num_layers, num_key_value_heads and head_dim, or num_layers and "
            "layer_shapes ([heads, key dim, value dim] per layer) where the layers differ."
        },
    )
    token_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": "Input width of the MLP. None: the self-attention's key/value width (num_key_value_heads * "
            "head_dim), as stock PEFT; filled in at creation and saved."
        },
    )
    merged_from: Optional[dict] = field(
        default=None, metadata={"help": "Set by merge_mlp: the MLP shape the raw prefixes were produced by."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "List of modules apart from the prefixes to be set as trainable and saved in the final checkpoint. "
            "For example, in Sequence Classification or Token Classification tasks, "
            "the final layer `classifier/score` are randomly initialized and as such need to be trainable and saved."
        },
    )
    target_modules: Optional[str] = field(
        default=DUMMY_TARGET_MODULES,
        metadata={"help": "Not used: PrefixPlus reaches attention through transformers' AttentionInterface."},
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Load a saved config, marked as loaded: the adapter it creates takes its prefixes from the saved weights, so
        `init_weights="text"` runs no text pass (and needs no tokenizer) when it is loaded."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, PrefixPlusConfig):
            config._loaded = True
        return config

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        self.target_modules = DUMMY_TARGET_MODULES
        _check_int("num_virtual_tokens", self.num_virtual_tokens, minimum=0)
        for name in ("encoder_num_virtual_tokens", "cross_num_virtual_tokens", "mlp_hidden_size", "token_dim"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0 if "virtual" in name else 1)
        for name in ("prefix_projection", "offset_position_ids"):
            if not isinstance(getattr(self, name), bool):
                raise PrefixPlusConfigError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.prefix_projection:
            if isinstance(self.mlp_depth, bool) or not isinstance(self.mlp_depth, int) or self.mlp_depth < 1:
                raise PrefixPlusConfigError(
                    f"`mlp_depth` must be an integer >= 1 when `prefix_projection=True`, got {self.mlp_depth!r}. "
                    "Use `prefix_projection=False` for raw prefixes without an MLP."
                )
            if not isinstance(self.mlp_activation, str) or self.mlp_activation not in ACT2FN:
                raise PrefixPlusConfigError(
                    f"Unknown `mlp_activation` {self.mlp_activation!r}; use a name from "
                    f"transformers.activations.ACT2FN, e.g. 'tanh', 'gelu', 'relu' or 'silu'."
                )
        dropout = self.prefix_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise PrefixPlusConfigError(f"`prefix_dropout` must be a number in [0, 1), got {dropout!r}.")
        if isinstance(self.init_weights, bool):
            # PEFT's convention: True = the method's default initialisation, False = random (for tests); both are
            # PrefixPlus's random initialisation, which is saved as "random"
            self.init_weights = "random"
        if not isinstance(self.init_weights, str) or self.init_weights not in INIT_WEIGHTS:
            raise PrefixPlusConfigError(f"`init_weights` must be one of {INIT_WEIGHTS}, got {self.init_weights!r}.")
        if self.init_weights == "text":
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise PrefixPlusConfigError(
                    '`init_weights="text"` needs `init_text`, a non-empty string to initialise from.'
                )
        elif self.init_text is not None:
            raise PrefixPlusConfigError(
                f'`init_text` is only used with `init_weights="text"`, got init_weights={self.init_weights!r}.'
            )
        if self.tokenizer_name_or_path is not None and not isinstance(self.tokenizer_name_or_path, str):
            raise PrefixPlusConfigError(
                f"`tokenizer_name_or_path` must be a string, got {self.tokenizer_name_or_path!r}."
            )
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
                self.layers_to_transform = [self.layers_to_transform]
            if not isinstance(self.layers_to_transform, (list, tuple)):
                raise PrefixPlusConfigError(
                    f"`layers_to_transform` must be a list of layer indices, got {self.layers_to_transform!r}."
                )
            layers = list(self.layers_to_transform)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise PrefixPlusConfigError(
                    f"`layers_to_transform` must be a non-empty list of non-negative layer indices, got {layers!r}."
                )
            if len(set(layers)) != len(layers):
                raise PrefixPlusConfigError(f"`layers_to_transform` contains duplicates: {layers!r}.")
            self.layers_to_transform = sorted(layers)
        if self.site_shapes is not None:
            check_site_shapes_value(self.site_shapes)
        if self.merged_from is not None and not isinstance(self.merged_from, dict):
            raise PrefixPlusConfigError(
                f"`merged_from` must be a dict (set by merge_mlp) or None, got {self.merged_from!r}."
            )

    def site_lengths(self, is_encoder_decoder: bool) -> dict[str, int]:
        """Prefix length of each site that exists for this kind of model (lengths may be 0).

        Args:
            is_encoder_decoder (`bool`): Whether the model is an encoder-decoder model.
        """
        if not is_encoder_decoder:
            return {"self": self.num_virtual_tokens}
        encoder, cross = self.encoder_num_virtual_tokens, self.cross_num_virtual_tokens
        return {
            "self": self.num_virtual_tokens,
            "encoder": self.num_virtual_tokens if encoder is None else encoder,
            "cross": self.num_virtual_tokens if cross is None else cross,
        }

    @property
    def mlp_shape(self) -> Optional[dict]:
        """The MLP shape as a dict (``None`` for raw prefixes): depth, width and activation."""
        if not self.prefix_projection:
            return None
        return {
            "depth": self.mlp_depth,
            "hidden_size": self.mlp_hidden_size or self.token_dim,
            "activation": self.mlp_activation,
        }


#: The keys of an entry of `PrefixPlusConfig.site_shapes` whose layers share one geometry.
SITE_SHAPE_KEYS: tuple[str, ...] = ("num_layers", "num_key_value_heads", "head_dim")
#: The keys of an entry whose layers differ: one ``[key/value heads, key dim, value dim]`` per layer.
PER_LAYER_SHAPE_KEYS: tuple[str, ...] = ("num_layers", "layer_shapes")


def _check_int(name: str, value: Any, minimum: int) -> None:
    """Refuse anything but an integer >= ``minimum`` (booleans and numeric strings included), naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a non-negative integer" if minimum == 0 else "a positive integer"
        raise PrefixPlusConfigError(f"`{name}` must be {kind}, got {value!r}.")


def check_site_shapes_value(site_shapes: Any) -> None:
    """`site_shapes` as PrefixPlus writes it: per known site, either `num_layers`, `num_key_value_heads` and
    `head_dim`, or `num_layers` and `layer_shapes` (one `[heads, key dim, value dim]` per layer), all positive."""
    if not isinstance(site_shapes, dict) or not site_shapes:
        raise PrefixPlusConfigError(
            f"`site_shapes` must map sites {SITES} to their shapes, got {site_shapes!r}. It is filled in when the "
            "adapter is created; if adapter_config.json was edited by hand, restore it from the saved adapter."
        )
    for site, shape in site_shapes.items():
        if site not in SITES:
            raise PrefixPlusConfigError(f"`site_shapes` names an unknown site {site!r}; sites are {SITES}.")
        if not isinstance(shape, dict) or set(shape) not in (set(SITE_SHAPE_KEYS), set(PER_LAYER_SHAPE_KEYS)):
            raise PrefixPlusConfigError(
                f"`site_shapes[{site!r}]` must have exactly the keys {SITE_SHAPE_KEYS} or {PER_LAYER_SHAPE_KEYS}, got "
                f"{shape!r}."
            )
        for key in set(shape) - {"layer_shapes"}:
            _check_int(f"site_shapes[{site!r}][{key!r}]", shape[key], minimum=1)
        if "layer_shapes" in shape:
            layers = shape["layer_shapes"]
            if not isinstance(layers, list) or len(layers) != shape["num_layers"]:
                raise PrefixPlusConfigError(
                    f"`site_shapes[{site!r}]['layer_shapes']` must list one [heads, key dim, value dim] per layer "
                    f"({shape['num_layers']}), got {layers!r}."
                )
            for index, layer in enumerate(layers):
                if not isinstance(layer, (list, tuple)) or len(layer) != 3:
                    raise PrefixPlusConfigError(
                        f"`site_shapes[{site!r}]['layer_shapes'][{index}]` must be [heads, key dim, value dim], "
                        f"got {layer!r}."
                    )
                for value in layer:
                    _check_int(f"site_shapes[{site!r}]['layer_shapes'][{index}]", value, minimum=1)


def site_layer_shapes(shape: dict[str, Any]) -> list[tuple[int, int, int]]:
    """Every layer's ``(key/value heads, key dim, value dim)`` of one `site_shapes` entry, whichever its form.

    Args:
        shape (`dict`): ``PrefixPlusConfig.site_shapes[site]`` (validated).

    Example:

    ```py
    >>> site_layer_shapes({"num_layers": 2, "num_key_value_heads": 2, "head_dim": 8})
    [(2, 8, 8), (2, 8, 8)]
    ```
    """
    if "layer_shapes" in shape:
        return [tuple(layer) for layer in shape["layer_shapes"]]
    return [(shape["num_key_value_heads"], shape["head_dim"], shape["head_dim"])] * shape["num_layers"]


def site_shapes_entry(layer_shapes: list[tuple[int, int, int]]) -> dict[str, Any]:
    """The `site_shapes` entry of a site whose layers have ``layer_shapes``: the short form where every layer has the
    same heads and one head dim for keys and values, else the per-layer form.

    Args:
        layer_shapes (`list[tuple[int, int, int]]`): ``(key/value heads, key dim, value dim)`` per layer.

    Example:

    ```py
    >>> site_shapes_entry([(4, 24, 12), (4, 24, 12)])
    {'num_layers': 2, 'layer_shapes': [[4, 24, 12], [4, 24, 12]]}
    ```
    """
    first = layer_shapes[0]
    if all(layer == first for layer in layer_shapes) and first[1] == first[2]:
        return {"num_layers": len(layer_shapes), "num_key_value_heads": first[0], "head_dim": first[1]}
    return {"num_layers": len(layer_shapes), "layer_shapes": [list(layer) for layer in layer_shapes]}
