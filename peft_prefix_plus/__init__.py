"""peft-prefix-plus: prefix tuning for PEFT at the attention level, with encoder, decoder and cross-attention
prefixes, a configurable MLP and exact merging.

``import peft_prefix_plus`` registers the ``PREFIX_PLUS`` method with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and the ``AutoPeftModel*`` classes accept PrefixPlus adapters.
"""

from .config import PrefixPlusConfig
from .layer import PrefixPlusLayer, PrefixSiteEncoder
from .model import PrefixPlusModel
from .registration import register

register()

__version__ = "0.1.0"

__all__ = ["PrefixPlusConfig", "PrefixPlusLayer", "PrefixPlusModel", "PrefixSiteEncoder", "__version__"]
