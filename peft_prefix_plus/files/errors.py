"""The error every adapter-file tool raises for bad input."""

from __future__ import annotations


class AdapterFileError(ValueError):
    """A saved adapter or a destination that cannot be used: missing or corrupt files, a config that does not match
    its tensors, non-finite values, or a destination that would lose data. The message names the problem and the way
    out; the command line prints it and exits with status 1.

    Example:

    ```py
    >>> try:
    ...     merge_adapter("not-an-adapter", "out")
    ... except AdapterFileError as error:
    ...     print(error)
    ```
    """
