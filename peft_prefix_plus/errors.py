"""The errors PrefixPlus raises: one base class, and the built-in class each one also is.

Every error of the package is a `PrefixPlusError`, so ``except PrefixPlusError`` catches all of them. Each is also the
built-in exception that Python convention asks for (a wrong value is a `ValueError`, a wrong type a `TypeError`), so
code written against PEFT's own errors keeps working. Every message names the problem and the way out.

```
PrefixPlusError
├── PrefixPlusValueError (ValueError): a value PrefixPlus cannot use
│   ├── PrefixPlusConfigError: a `PrefixPlusConfig` field, or a combination of fields
│   ├── UnsupportedError: a model, architecture or operation PrefixPlus does not support
│   ├── AdapterFileError: a saved adapter or a destination folder that cannot be used
│   └── CheckpointError: a training checkpoint folder that cannot be written or resumed
├── PrefixPlusTypeError (TypeError): an argument of the wrong type
└── HubPushError (RuntimeError): pushing to the Hub failed or was refused
```

This module imports nothing, so every part of the package can use it.
"""

from __future__ import annotations


class PrefixPlusError(Exception):
    """Base class of every error PrefixPlus raises.

    Example:

    ```py
    >>> try:
    ...     PrefixPlusConfig(num_virtual_tokens=0)
    ... except PrefixPlusError as error:
    ...     print(error)
    ```
    """


class PrefixPlusValueError(PrefixPlusError, ValueError):
    """A value PrefixPlus cannot use: an argument, an input of a call, or a state the model is in."""


class PrefixPlusTypeError(PrefixPlusError, TypeError):
    """An argument of the wrong type."""


class PrefixPlusConfigError(PrefixPlusValueError):
    """A `PrefixPlusConfig` field, or a combination of fields, that cannot work; raised when the config is built."""


class UnsupportedError(PrefixPlusValueError):
    """A model, architecture or model feature that PrefixPlus does not support; the message names the way out
    (another attention implementation, or another PEFT method such as LoRA)."""


class AdapterFileError(PrefixPlusValueError):
    """A saved adapter or a destination that cannot be used: missing or corrupt files, a config that does not match
    its tensors, non-finite values, or a destination that would lose data. The command line prints the message and
    exits with status 1.

    Example:

    ```py
    >>> try:
    ...     merge_mlp_files("not-an-adapter", "out")
    ... except AdapterFileError as error:
    ...     print(error)
    ```
    """


class CheckpointError(PrefixPlusValueError):
    """A training checkpoint folder that cannot be written, listed or resumed from; nothing was written or removed.

    Example:

    ```py
    >>> try:
    ...     load_checkpoint(accelerator, model, "checkpoints/checkpoint-missing")
    ... except CheckpointError as error:
    ...     print(error)
    ```
    """


class HubPushError(PrefixPlusError, RuntimeError):
    """Pushing an adapter to the Hub failed or was refused; the local files were not changed.

    Example:

    ```py
    >>> try:
    ...     push_adapter("out/adapter", "me/my-adapter", metrics="missing.json")
    ... except HubPushError as error:
    ...     print(error)  # names the problem; nothing was sent to the Hub
    ```
    """
