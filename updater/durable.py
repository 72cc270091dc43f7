"""File operations that survive a power cut as either the old or the new state.

Each function makes its change durable before it returns: data is fsynced before the
rename that publishes it, and the directory is fsynced after the rename, because on
ext4 a rename is only durable once its directory is.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def fsync_directory(path: str) -> None:
    """Flush the directory entries of ``path`` to storage.

    Raises:
        OSError: the directory cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace the file ``path`` with ``data``: temporary file, fsync, rename, fsync
    of the directory. Readers, and the filesystem after a power cut, find the old
    file or the new one.

    Raises:
        OSError: writing, renaming or syncing failed. The temporary file is removed
            and ``path`` is unchanged.
    """
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    fsync_directory(directory)


def replace_symlink(path: str, target: str) -> None:
    """Point the symbolic link ``path`` at ``target`` in one rename, creating it if
    needed, and make the change durable.

    Raises:
        OSError: creating, renaming or syncing failed; ``path`` is unchanged.
    """
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    _remove_quietly(temporary)
    os.symlink(target, temporary)
    try:
        os.rename(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    fsync_directory(directory)


def remove_durably(path: str) -> None:
    """Remove the file or symbolic link ``path`` if it exists and sync its directory.

    Raises:
        OSError: removing or syncing failed.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_directory(os.path.dirname(path) or ".")


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
