"""Saved adapter directories: the one validated reader, the one atomic writer, and the tools built on them."""

from .errors import AdapterFileError
from .read import KEY_PREFIX, PrefixPlusFiles, read_config_dict, read_prefix_plus_adapter, read_tensor_header
from .write import atomic_directory, check_destination

__all__ = [
    "KEY_PREFIX",
    "AdapterFileError",
    "PrefixPlusFiles",
    "atomic_directory",
    "check_destination",
    "read_config_dict",
    "read_prefix_plus_adapter",
    "read_tensor_header",
]
