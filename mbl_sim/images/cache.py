"""Content-addressed cache of build steps and downloads.

A build step names its inputs (files, directories and strings); the SHA-256 of all of
them is the step's key. The step's output directory is ``<cache>/steps/<name>-<key>``;
it is built in a temporary directory beside it and renamed into place only when
complete, so an interrupted build never leaves a half-written output that looks
finished. A file lock per step lets several processes (pytest-xdist workers) ask for the
same step at once: one builds, the others wait and reuse.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the layout of a step's output changes, so that old outputs are not reused.
CACHE_FORMAT = "1"


def default_cache_dir() -> Path:
    """Return ``$MBL_SIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/mbl-sim``."""
    explicit = os.environ.get("MBL_SIM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "mbl-sim"


@dataclass
class StepKey:
    """Accumulates the inputs of a build step into one SHA-256 key."""

    name: str
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)

    def __post_init__(self) -> None:
        self.add_text(f"format={CACHE_FORMAT};step={self.name}")

    def add_text(self, text: str) -> StepKey:
        data = text.encode()
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)
        return self

    def add_file(self, path: Path) -> StepKey:
        """Add a file's name, mode and content."""
        self.add_text(f"file:{path.name}:{path.stat().st_mode & 0o7777:o}")
        with path.open("rb") as stream:
            self.add_text(hashlib.file_digest(stream, "sha256").hexdigest())
        return self

    def add_tree(self, root: Path) -> StepKey:
        """Add every file and symlink under ``root``, by relative path."""
        for path in sorted(_walk(root)):
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                self.add_text(f"link:{relative}->{os.readlink(path)}")
            elif path.is_file():
                self.add_text(f"path:{relative}")
                self.add_file(path)
        return self

    def digest(self) -> str:
        return self._hash.hexdigest()[:20]


def _walk(root: Path) -> Iterable[Path]:
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in [*filenames, *dirnames]:
            path = Path(directory, name)
            if path.is_symlink() or path.is_file():
                yield path


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) inside the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class BuildCache:
    """Output directories of build steps, keyed by the content of their inputs."""

    def __init__(self, root: Path, report: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.report = report or (lambda message: log.info("%s", message))
        self.built: list[str] = []
        self.reused: list[str] = []

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    def step(self, key: StepKey, build: Callable[[Path], None]) -> Path:
        """Return the output directory of a step.

        Unless an output with the same key exists, ``build(tmpdir)`` makes it first.

        Raises whatever ``build`` raises; the partial output is then removed.
        """
        output = self.root / "steps" / f"{key.name}-{key.digest()}"
        with locked(self.root / "locks" / f"{key.name}.lock"):
            if output.is_dir():
                self.reused.append(key.name)
                self.report(f"{key.name}: up to date ({output.name})")
                return output
            partial = output.with_name(output.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            self.report(f"{key.name}: building")
            started = time.monotonic()
            try:
                build(partial)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            partial.rename(output)
            self.built.append(key.name)
            elapsed = time.monotonic() - started
            self.report(f"{key.name}: built in {elapsed:.1f} s ({output.name})")
            return output
