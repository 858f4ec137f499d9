"""The PrefixPlus tuner, laid out as PEFT's ``tuners/<method>/``: the config (:mod:`.config`), the tuner that adapts a
model (:mod:`.model`), the layer holding every adapter's prefix encoders (:mod:`.layer`), and what they use: where
attention happens (:mod:`.discovery`), the attention functions (:mod:`.attention`), cache seeding (:mod:`.kv_cache`),
each site's shapes (:mod:`.geometry`), the exact MLP merge (:mod:`.merge`) and initialisation from text
(:mod:`.text_init`). Nothing here imports the package's tooling (``files``, ``hub``, ``training``, ``cli``)."""

from .config import PrefixPlusConfig
from .layer import PrefixPlusLayer, PrefixSiteEncoder
from .model import PrefixPlusModel

__all__ = ["PrefixPlusConfig", "PrefixPlusLayer", "PrefixPlusModel", "PrefixSiteEncoder"]
