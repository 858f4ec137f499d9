"""The installed version, read without importing the package's heavy modules."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The version of the installed ``peft-prefix-plus`` distribution (``"unknown"`` when it is not installed).

    Example:

    ```py
    >>> package_version()
    '0.1.0'
    ```
    """
    try:
        return version("peft-prefix-plus")
    except PackageNotFoundError:
        return "unknown"
