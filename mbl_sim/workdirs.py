"""Output directories that commands create, check and may clean on a later run.

A command that writes into a directory the user names checks it before any slow
work starts: it must be a directory, or creatable as one, and writable. A command
that empties parts of its directory on a rerun (``mbl-sim certify --output``) first
claims the directory with a marker file, and cleans only a directory that carries
its marker, so that it never deletes files it did not write.
"""

from __future__ import annotations

import os
from pathlib import Path

from mbl_sim.errors import ConfigError

__all__ = ["claim_directory", "writable_directory"]


def writable_directory(path: Path, option: str) -> Path:
    """Create ``path`` with its parents if needed and return it.

    ``option`` names where the path came from (``--output``), for messages.

    Raises:
        ConfigError: ``path`` is not a directory, cannot be created, or is not
            writable.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: not a directory; name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{option} {path}: cannot create the directory ({error.strerror});"
            " name a directory you can write to"
        ) from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option} {path}: the directory is not writable; name one you can write to"
        )
    return path


def claim_directory(path: Path, marker: str, option: str) -> bool:
    """Make ``path`` a directory that carries the file ``marker``; return whether it
    carried the marker already (its content then came from an earlier run).

    Raises:
        ConfigError: as `writable_directory`, or ``path`` contains files but no marker.
    """
    existing = path.is_dir() and any(path.iterdir())
    writable_directory(path, option)
    marker_path = path / marker
    if marker_path.is_file():
        return True
    if existing:
        raise ConfigError(
            f"{option} {path}: the directory contains files that mbl-sim did not write"
            " there; name a new or empty directory"
        )
    marker_path.write_text(
        "This directory holds mbl-sim output; a rerun may replace its content.\n"
    )
    return False
