"""Saved adapter directories: the one validated reader (:mod:`.read`), the one atomic writer (:mod:`.write`), and
the tools built on them: merge on disk (:mod:`.merge`), inspect (:mod:`.describe`), and conversion to and from
stock PEFT prefix tuning (:mod:`.convert`)."""

from .convert import copy_stock_prefix, export_to_peft, import_from_peft, site_tensor_to_stock, stock_to_site_tensor
from .describe import format_inspection, inspect_adapter
from .merge_mlp import merge_mlp_files
from .read import KEY_PREFIX, PrefixPlusFiles, read_config_dict, read_prefix_plus_adapter, read_tensor_header
from .write import atomic_directory, check_destination, write_adapter_files

__all__ = [
    "KEY_PREFIX",
    "AdapterFileError",
    "PrefixPlusFiles",
    "atomic_directory",
    "check_destination",
    "copy_stock_prefix",
    "export_to_peft",
    "format_inspection",
    "import_from_peft",
    "inspect_adapter",
    "merge_mlp_files",
    "read_config_dict",
    "read_prefix_plus_adapter",
    "read_tensor_header",
    "site_tensor_to_stock",
    "stock_to_site_tensor",
    "write_adapter_files",
]
