"""Which errors the command line reports as one line with exit code 1, and which it lets through as bugs."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing error of a command: printed without a traceback, and the command exits with status 1.

    Example:

    ```py
    >>> raise CommandError("--metrics missing.json does not exist")
    ```
    """


#: OS errors that bad paths cause, reported without a traceback even when they carry no file name.
PATH_ERRORS = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types a command may raise for bad input: `CommandError`, `AdapterFileError`, `OSError`.

    Imports `AdapterFileError` when called, which the command line does only once an exception has arrived (the
    command that raised it has already imported it), so that ``--help`` imports nothing heavy.

    Example:

    ```py
    >>> CommandError in user_error_types()
    True
    ```
    """
    from ..errors import AdapterFileError

    return (CommandError, AdapterFileError, OSError)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` (one of :func:`user_error_types`) is bad input rather than a bug.

    An `OSError` counts only if a path caused it: one of :data:`PATH_ERRORS`, or any `OSError` naming a file.

    Args:
        error (`BaseException`): The exception.

    Example:

    ```py
    >>> is_user_error(OSError("no file involved")), is_user_error(PermissionError(13, "denied", "out"))
    (False, True)
    ```
    """
    if isinstance(error, OSError):
        return isinstance(error, PATH_ERRORS) or error.filename is not None
    return True
