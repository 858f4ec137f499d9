"""The one atomic writer of directories: adapters from merge/export/import, and training checkpoints.

A directory is written into a temporary sibling and renamed into place at the end, so a reader never sees a half
written destination and a failure (or a kill) leaves the previous one untouched. Permissions follow the umask, as
`save_pretrained` gives them (``0o777 & ~umask`` for directories; files are created by their writers with
``0o666 & ~umask``). Every check of the destination runs before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

import torch
from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save

from ..errors import AdapterFileError

try:  # serialises the final renames of concurrent writers on POSIX; elsewhere they are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PathLike = Union[str, os.PathLike]


def check_destination(
    dst: PathLike, *, overwrite: bool = False, sources: Iterable[PathLike] = (), marker: str = CONFIG_NAME
) -> Path:
    """Refuse a destination whose writing could lose data, before anything is written.

    Refused: a ``dst`` that is, contains or lies inside any of ``sources`` (after resolving symbolic links); the
    current directory or one containing it, and a mount point (they cannot be replaced by a rename); a symbolic link
    or a file; an existing directory unless ``overwrite``; and with ``overwrite``, a directory that is neither empty
    nor holds ``marker`` (a saved adapter holds ``adapter_config.json``): its contents are named.

    Args:
        dst (`str` or `os.PathLike`): The directory to write.
        overwrite (`bool`): Allow replacing an existing directory that holds ``marker`` (or an empty one).
        sources (`Iterable`): Directories that are read while writing ``dst``; they must stay untouched.
        marker (`str`): The file whose presence shows that an existing ``dst`` was written by this kind of writer
            and may be replaced; e.g. a training checkpoint's own marker file.

    Returns:
        `Path`: ``dst`` as a `Path`.

    Raises:
        AdapterFileError: Naming the problem and the way out.

    Example:

    ```py
    >>> check_destination("merged", overwrite=False, sources=["my-adapter"])
    PosixPath('merged')
    ```
    """
    dst = Path(dst)
    resolved = dst.resolve()
    for src in sources:
        src_resolved = Path(src).resolve()
        if resolved == src_resolved:
            relation = "is"
        elif resolved in src_resolved.parents:
            relation = "contains"
        elif src_resolved in resolved.parents:
            relation = "lies inside"
        else:
            continue
        raise AdapterFileError(
            f"The destination {dst} {relation} the source {src} (after resolving links: {resolved} vs "
            f"{src_resolved}); writing it would destroy the source. Choose a destination outside the source."
        )
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        relation = "is" if resolved == cwd else "contains"
        raise AdapterFileError(
            f"The destination {dst} {relation} the current directory, which cannot be replaced. Give the name of a "
            "new directory, e.g. ./merged."
        )
    if dst.is_symlink():
        raise AdapterFileError(f"The destination {dst} is a symbolic link; give a real directory path.")
    if not dst.exists():
        return dst
    if not dst.is_dir():
        raise AdapterFileError(f"The destination {dst} exists and is not a directory; choose another path.")
    if os.path.ismount(dst):
        raise AdapterFileError(f"The destination {dst} is a mount point, which cannot be replaced; write inside it.")
    if not overwrite:
        raise AdapterFileError(f"The destination {dst} exists; pass --overwrite (overwrite=True) to replace it.")
    entries = sorted(entry.name for entry in dst.iterdir())
    if entries and marker not in entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        what = "a saved adapter" if marker == CONFIG_NAME else "written by this tool"
        raise AdapterFileError(
            f"Refusing to overwrite {dst}: it is not {what} (no {marker}) and not empty; it holds {shown}. "
            "--overwrite replaces only such a directory or an empty one; choose another destination."
        )
    return dst


def temporary_sibling(path: PathLike, kind: str) -> Path:
    """A new hidden name beside ``path`` for a temporary: ``.<name>.<pid>-<random>.<kind>``.

    The name is unique, and the process id in it tells which process made the temporary, so that a process that
    clears leftovers can leave alone those of other processes, which may still be writing them.

    Args:
        path (`str` or `os.PathLike`): The file or directory the temporary stands for.
        kind (`str`): The suffix: ``"tmp"`` (being written), ``"old"`` (a backup), ``"deleting"``, ...

    Example:

    ```py
    >>> temporary_sibling("out/checkpoint-3", "tmp")
    PosixPath('out/.checkpoint-3.4242-1f0c9a6b2d4e.tmp')
    ```
    """
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.{kind}"


def _identity(path: Path) -> Optional[tuple[int, int]]:
    """``(device, inode)`` of ``path``, or ``None`` when it does not exist: tells whether another writer replaced it.

    Args:
        path (`Path`): A path (a symbolic link is not followed).

    Example:

    ```py
    >>> _identity(Path("missing")) is None
    True
    ```
    """
    try:
        stat = path.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory`` itself (no lock file is created); released on exit.

    Args:
        directory (`Path`): The parent of the destination; writers of any destination in it take turns to rename.

    Example:

    ```py
    >>> with _locked(Path(".")):
    ...     pass
    ```
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks (some network mounts): the identity check remains
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)


def _make_parent(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return those created, innermost first (to remove on failure).

    Args:
        parent (`Path`): The directory to create.

    Example:

    ```py
    >>> _make_parent(Path("runs/new"))
    [PosixPath('runs/new'), PosixPath('runs')]
    ```
    """
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    return created


def _concurrent_writer(dst: Path) -> AdapterFileError:
    """The error a writer gets when another one wrote ``dst`` first.

    Args:
        dst (`Path`): The destination.

    Example:

    ```py
    >>> raise _concurrent_writer(Path("merged"))
    ```
    """
    return AdapterFileError(
        f"The destination {dst} was written by another process while this one ran; nothing was written by this "
        "one. Run it again (with --overwrite to replace the other result)."
    )


def _commit(tmp: Path, dst: Path, expected: Optional[tuple[int, int]]) -> None:
    """Rename ``tmp`` to ``dst`` (backup-then-rename over an existing one), unless ``dst`` changed meanwhile.

    Args:
        tmp (`Path`): The finished temporary directory.
        dst (`Path`): The destination.
        expected (`tuple`, *optional*): The identity of ``dst`` when it was checked (`None`: it did not exist).

    Example:

    ```py
    >>> _commit(tmp, Path("merged"), expected=None)
    ```
    """
    if _identity(dst) != expected:
        raise _concurrent_writer(dst)
    if expected is None:
        os.rename(tmp, dst)
        return
    backup = temporary_sibling(dst, "old")
    os.rename(dst, backup)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    dst: PathLike, *, overwrite: bool = False, sources: Iterable[PathLike] = (), marker: str = CONFIG_NAME
) -> Iterator[Path]:
    """Write a directory atomically: yield an empty temporary directory beside ``dst``, renamed to ``dst`` on success.

    The destination is checked first (see :func:`check_destination`). The temporary directory gets the permissions
    ``mkdir`` gives (``0o777 & ~umask``). On success an existing ``dst`` is replaced by backup-then-rename: it is
    renamed aside, the new directory renamed in, and only then the old one deleted. If another writer replaced or
    created ``dst`` in the meantime, this one fails with `AdapterFileError` and writes nothing. On any error the
    temporary directory (and any parent this call created) is removed and ``dst`` is left as it was.

    Args:
        dst (`str` or `os.PathLike`): The directory to write.
        overwrite (`bool`): Replace an existing ``dst`` (only one holding ``marker``, or an empty one).
        sources (`Iterable`): Directories read while writing; ``dst`` may not be, contain or lie inside one.
        marker (`str`): The file that marks an existing ``dst`` as replaceable (``adapter_config.json``).

    Raises:
        AdapterFileError: For a refused destination, a concurrent writer, or a destination that cannot be written
            (permissions, read-only file system).

    Example:

    ```py
    >>> with atomic_directory("merged", overwrite=True, sources=["my-adapter"]) as tmp:
    ...     (tmp / "adapter_config.json").write_text("{}")
    ```
    """
    sources = tuple(sources)
    dst = check_destination(dst, overwrite=overwrite, sources=sources, marker=marker)
    expected = _identity(dst)
    parent = dst.absolute().parent
    created: list[Path] = []
    tmp = temporary_sibling(parent / dst.name, "tmp")
    try:
        created = _make_parent(parent)
        os.mkdir(tmp)  # mode 0o777 & ~umask, as save_pretrained's os.makedirs
    except OSError as error:
        raise AdapterFileError(
            f"Cannot write the destination {dst}: {error.strerror or error} ({parent}). Choose a writable location."
        ) from error
    try:
        yield tmp
        with _locked(parent):
            _commit(tmp, dst, expected)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(error, OSError) and error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _concurrent_writer(dst) from error
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EBUSY):
            raise AdapterFileError(
                f"Cannot write the destination {dst}: {error.strerror}. Choose a writable location."
            ) from error
        raise


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Write one file atomically: yield a temporary path beside ``path``, renamed onto it on success.

    Readers see the old file or the new one, never a partial one; on any error the temporary file is removed and
    ``path`` is left as it was. The file gets the permissions the caller's write gives it (under the umask).

    Args:
        path (`str` or `os.PathLike`): The file to write; its directory must exist.

    Example:

    ```py
    >>> with atomic_file("outputs/checkpoints/checkpoints.json") as tmp:
    ...     tmp.write_text('{"latest": "checkpoint-30"}')
    ```
    """
    path = Path(path)
    tmp = temporary_sibling(path, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as written:  # flushed to disk before it replaces the old file
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_adapter_files(directory: Path, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write an adapter's config and safetensors weights into ``directory``, as `save_pretrained` does, with file
    permissions ``0o666 & ~umask``.

    Args:
        directory (`Path`): The (temporary) directory being written, e.g. from :func:`atomic_directory`.
        config (`PeftConfig`): The adapter config; written with its own ``save_pretrained``.
        tensors (`dict[str, torch.Tensor]`): The tensors, keyed as PEFT saves them.

    Example:

    ```py
    >>> with atomic_directory("merged") as tmp:
    ...     write_adapter_files(tmp, config, tensors)
    ```
    """
    config.save_pretrained(str(directory))
    # safetensors' save_file creates its file with mode 0o600; writing its bytes ourselves honours the umask
    data = save({key: tensor.contiguous() for key, tensor in tensors.items()}, metadata={"format": "pt"})
    (directory / SAFETENSORS_WEIGHTS_NAME).write_bytes(data)
