"""peft-prefix-plus: prefix tuning for PEFT at the attention level, with encoder, decoder and cross-attention
prefixes, a configurable MLP and exact merging.

``import peft_prefix_plus`` registers the ``PREFIX_PLUS`` method with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and the ``AutoPeftModel*`` classes accept PrefixPlus adapters. The registration happens
as soon as ``peft`` is imported (at once if it already is), and the public names below are imported on first use, so
that importing the package (and ``prefix-plus --help``) does not pay for torch and peft until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .deferred_registration import register_when_peft_is_imported

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first access (PEP 562). Internals (the layer, the encoders,
#: the file readers) stay importable from their modules without being exported here.
_EXPORTS = {
    "AdapterFileError": ".errors",
    "CheckpointError": ".errors",
    "HubPushError": ".errors",
    "PrefixPlusConfig": ".tuner.config",
    "PrefixPlusError": ".errors",
    "PrefixPlusModel": ".tuner.model",
    "export_to_peft": ".files",
    "import_from_peft": ".files",
    "inspect_adapter": ".files",
    "merge_mlp_files": ".files",
    "push_adapter": ".hub",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .errors import AdapterFileError, CheckpointError, HubPushError, PrefixPlusError
    from .files import export_to_peft, import_from_peft, inspect_adapter, merge_mlp_files
    from .hub import push_adapter
    from .tuner.config import PrefixPlusConfig
    from .tuner.model import PrefixPlusModel


def __getattr__(name: str) -> Any:
    """Import a public name on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


register_when_peft_is_imported()

__all__ = [
    "AdapterFileError",
    "CheckpointError",
    "HubPushError",
    "PrefixPlusConfig",
    "PrefixPlusError",
    "PrefixPlusModel",
    "__version__",
    "export_to_peft",
    "import_from_peft",
    "inspect_adapter",
    "merge_mlp_files",
    "push_adapter",
]
