"""peft-prefix-plus: prefix tuning for PEFT at the attention level, with encoder, decoder and cross-attention
prefixes, a configurable MLP and exact merging.

``import peft_prefix_plus`` registers the ``PREFIX_PLUS`` method with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and the ``AutoPeftModel*`` classes accept PrefixPlus adapters.
"""

from .config import PrefixPlusConfig
from .files import AdapterFileError, export_to_peft, import_from_peft, inspect_adapter, merge_adapter
from .hub.push import HubPushError, install_peft_hooks, push_adapter
from .layer import PrefixPlusLayer, PrefixSiteEncoder
from .model import PrefixPlusModel
from .registration import register

register()
install_peft_hooks()  # PeftModel.push_to_hub / save_pretrained write PrefixPlus model cards

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "HubPushError",
    "PrefixPlusConfig",
    "PrefixPlusLayer",
    "PrefixPlusModel",
    "PrefixSiteEncoder",
    "__version__",
    "export_to_peft",
    "import_from_peft",
    "inspect_adapter",
    "merge_adapter",
    "push_adapter",
]
