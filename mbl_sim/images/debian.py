"""Debian packages of a foreign architecture, fetched without root or dpkg state.

apt runs with a private configuration (its own lists, cache and an empty status file)
under the cache directory, with ``APT::Architecture`` set to the device's architecture.
The host's ``/etc/apt/sources.list*`` and keyrings are used as they are, so the device
gets the same Debian release and security updates as the host's archive.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.commands import run
from mbl_sim.errors import BuildError
from mbl_sim.images.cache import locked

log = logging.getLogger(__name__)

# Package lists older than this are refreshed before resolving versions.
LISTS_MAX_AGE_S = 24 * 3600


@dataclass(frozen=True)
class DebianPackage:
    """One resolved binary package."""

    name: str
    version: str
    architecture: str
    path: Path


class AptArchive:
    """apt for one Debian architecture, with state kept under ``root``."""

    def __init__(self, root: Path, architecture: str) -> None:
        self.architecture = architecture
        self.root = root / f"apt-{architecture}"
        self.debs = root / "debs" / architecture
        self._config = self.root / "apt.conf"
        self._updated = False

    def _prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.debs.mkdir(parents=True, exist_ok=True)
        status = self.root / "status"
        if not status.exists():
            status.touch()
        self._config.write_text(
            f'APT::Architecture "{self.architecture}";\n'
            f'APT::Architectures {{ "{self.architecture}"; }};\n'
            f'Dir::State::Lists "{self.root}/lists";\n'
            f'Dir::Cache "{self.root}/cache";\n'
            f'Dir::State::status "{status}";\n'
            # Downloads into a directory that the _apt user cannot write otherwise warn.
            'APT::Sandbox::User "root";\n'
        )

    def _apt(self, *args: str, cwd: Path | None = None) -> str:
        env = dict(os.environ, APT_CONFIG=str(self._config), LC_ALL="C")
        return run(["apt-get", *args], cwd=cwd, env=env)

    def _apt_cache(self, *args: str) -> str:
        env = dict(os.environ, APT_CONFIG=str(self._config), LC_ALL="C")
        return run(["apt-cache", *args], env=env)

    def update(self, *, force: bool = False) -> None:
        """Refresh the package lists when missing, older than a day, or ``force``."""
        self._prepare()
        with locked(self.root / "update.lock"):
            self._update(force)

    def _update(self, force: bool) -> None:
        stamp = self.root / "lists" / ".updated"
        fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE_S
        if fresh and not force:
            return
        log.info("apt-get update for %s", self.architecture)
        self._apt("update", "-q")
        stamp.touch()
        self._updated = True

    def _memo(self, key: str, compute: Callable[[], list[str]]) -> list[str]:
        """Return ``compute()``, remembered per package-list version, because each
        apt-cache call costs a noticeable fraction of a second."""
        stamp = self.root / "lists" / ".updated"
        version = str(stamp.stat().st_mtime_ns) if stamp.exists() else "none"
        memo_path = self.root / "resolved.json"
        memo: dict[str, list[str]] = {}
        if memo_path.exists():
            memo = json.loads(memo_path.read_text())
        full_key = f"{version}:{key}"
        if full_key not in memo:
            memo = {k: v for k, v in memo.items() if k.startswith(f"{version}:")}
            memo[full_key] = compute()
            temporary = memo_path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(memo, indent=1, sort_keys=True))
            temporary.replace(memo_path)
        return memo[full_key]

    def candidates(self, names: Sequence[str]) -> list[str]:
        """Return the version apt would install of each of ``names``.

        Raises:
            BuildError: the archive has no such package for this architecture.
        """
        return self._memo("candidates:" + ",".join(names), lambda: self._policy(names))

    def _policy(self, names: Sequence[str]) -> list[str]:
        output = self._apt_cache("policy", *names)
        found: dict[str, str] = {}
        for block in re.split(r"^(?=\S)", output, flags=re.MULTILINE):
            header = (
                re.match(r"(\S+?)(?::\S+)?:\s*$", block.splitlines()[0])
                if block
                else None
            )
            candidate = re.search(r"^\s*Candidate:\s*(\S+)", block, re.MULTILINE)
            if header and candidate and candidate.group(1) != "(none)":
                found[header.group(1)] = candidate.group(1)
        missing = [name for name in names if name not in found]
        if missing:
            raise BuildError(
                f"package {missing[0]!r} not found in the Debian archive for "
                f"{self.architecture}; check the package name in the board file or "
                "images/packages.yaml"
            )
        return [found[name] for name in names]

    def depends(self, name: str) -> list[str]:
        """Return the first alternative of each Depends and Pre-Depends of ``name``."""
        return self._memo("depends:" + name, lambda: self._depends_many([name])[name])

    def _depends_many(self, names: Sequence[str]) -> dict[str, list[str]]:
        output = self._apt_cache("show", "--no-all-versions", *names)
        table: dict[str, list[str]] = {}
        current = ""
        for line in output.splitlines():
            field_name, _, value = line.partition(":")
            if field_name == "Package":
                current = value.strip()
                table.setdefault(current, [])
            elif field_name in ("Depends", "Pre-Depends") and current:
                for clause in value.split(","):
                    first = clause.split("|")[0].strip()
                    table[current].append(first.split()[0].split(":")[0])
        return table

    def closure(self, names: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
        """Return ``names`` and their dependencies, recursively, less ``exclude``.

        Virtual packages resolve to their first provider.
        """
        wanted = sorted(names)
        skip = sorted(set(exclude))
        key = "closure:" + ",".join(wanted) + "-" + ",".join(skip)
        return self._memo(key, lambda: self._closure(wanted, set(skip)))

    def _closure(self, names: list[str], skip: set[str]) -> list[str]:
        seen: set[str] = set()
        level = [n for n in names if n not in skip]
        while level:
            real = {self._real_name(name) for name in level}
            new = sorted(real - seen - skip)
            seen.update(new)
            table = self._depends_many(new) if new else {}
            level = sorted({d for deps in table.values() for d in deps} - seen - skip)
        return sorted(seen)

    def _real_name(self, name: str) -> str:
        output = self._apt_cache("showpkg", name)
        if re.search(r"^Versions:\s*\n\S", output, re.MULTILINE):
            return name
        providers = re.search(r"^Reverse Provides:\s*\n(\S+)", output, re.MULTILINE)
        if providers:
            return providers.group(1)
        return name

    def download(self, names: Iterable[str]) -> list[DebianPackage]:
        """Download ``names`` at their candidate versions into the cache, reusing files
        already there, and return them resolved.

        Raises:
            BuildError: a package is unknown or the download fails.
        """
        self.update()
        name_list = list(names)
        wanted = list(zip(name_list, self.candidates(name_list), strict=True))
        missing = [f"{n}={v}" for n, v in wanted if self._find(n, v) is None]
        if missing:
            log.info("downloading %d %s packages", len(missing), self.architecture)
            with locked(self.root / "download.lock"):
                self._apt("download", *missing, cwd=self.debs)
        packages = []
        for name, version in wanted:
            path = self._find(name, version)
            if path is None:
                raise BuildError(
                    f"apt-get download of {name} {version} left no .deb in {self.debs}"
                )
            packages.append(DebianPackage(name, version, self.architecture, path))
        return packages

    def _find(self, name: str, version: str) -> Path | None:
        # apt-get download quotes the epoch colon as %3a, and architecture-independent
        # packages carry "all" instead of the architecture in their file name.
        quoted = version.replace(":", "%3a")
        for architecture in (self.architecture, "all"):
            path = self.debs / f"{name}_{quoted}_{architecture}.deb"
            if path.exists():
                return path
        return None
