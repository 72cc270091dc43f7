"""Read-only looks into ext4 filesystem images with e2fsprogs, as the host checks
need them.

Each function works on an image file of one filesystem (a partition cut out of a
disk). e2fsck can open a filesystem at an offset inside a disk image
(``image?offset=N``), but after replaying a journal it reopens the image without
the offset and fails (e2fsprogs 1.47.0), so the checks cut the partition out first.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["check_filesystem", "dump_files", "replay_journal", "run_tool"]

log = logging.getLogger(__name__)

TOOL_TIMEOUT = 300.0


def run_tool(
    argv: Sequence[str | Path],
    timeout: float = TOOL_TIMEOUT,
    *,
    package: str = "e2fsprogs",
    environment: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Run a host program, log it and its exit code, and return the exit code and
    its combined output. A missing program or a timeout is exit code 127 or 124.

    ``package`` is the Debian package that provides the program, for the message
    when it is missing. ``environment`` adds variables to the program's
    environment.
    """
    command = [str(part) for part in argv]
    log.debug("run: %s", shlex.join(command))
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            env=None if environment is None else {**os.environ, **environment},
        )
    except FileNotFoundError:
        return 127, f"command not found: {command[0]}; install {package}"
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:g} s: {shlex.join(command)}"
    log.debug("exit %d: %s", result.returncode, command[0])
    return result.returncode, result.stdout + result.stderr


SUMMARY_LINES = 4


def _summary(output: str) -> str:
    """Return the first lines of e2fsck's findings and its last line, without its
    version banner and the ``IGNORED.`` replies that ``-n`` prints."""
    lines = [
        line.strip()
        for line in output.splitlines()
        if line.strip()
        and line.strip() != "IGNORED."
        and not line.startswith("e2fsck 1.")
    ]
    if len(lines) > SUMMARY_LINES + 1:
        lines = [*lines[:SUMMARY_LINES], "…", lines[-1]]
    return " / ".join(lines)


def replay_journal(image: Path) -> str | None:
    """Replay the filesystem's journal into ``image``, as the kernel does when it
    mounts it, and return None, or the problem when that fails.

    e2fsck exits 0 or 1 when it replayed a journal or had none to replay. With
    ``-y``, ``-E journal_only`` still repairs a damaged superblock or group
    descriptor, which would hide the damage from the check that follows; in preen
    mode (``-p``) e2fsck stops with exit code 4 instead.
    """
    code, output = run_tool(["e2fsck", "-E", "journal_only", "-p", image])
    if code in (0, 1):
        return None
    return f"journal replay failed (e2fsck exit code {code}): {_summary(output)}"


def check_filesystem(image: Path) -> str | None:
    """Run ``e2fsck -n -f`` on ``image`` and return None if it is clean, or the
    problem with the end of e2fsck's output."""
    code, output = run_tool(["e2fsck", "-n", "-f", image])
    if code == 0:
        return None
    return f"e2fsck -n -f exit code {code}: {_summary(output)}"


def _quoted(path: str) -> str:
    return '"' + path + '"'


def dump_files(
    image: Path, paths: Sequence[str], directory: Path
) -> dict[str, bytes | None]:
    """Return the content of each absolute ``path`` in the filesystem ``image``, or
    None for a path that is missing or cannot be read.

    One debugfs process dumps them all into ``directory``. Paths that contain a
    double quote or a newline, which debugfs's command syntax cannot express, are
    returned as None.
    """
    directory.mkdir(parents=True, exist_ok=True)
    commands = []
    targets: dict[str, Path] = {}
    for number, path in enumerate(paths):
        if '"' in path or "\n" in path:
            continue
        target = directory / str(number)
        targets[path] = target
        commands.append(f"dump {_quoted(path)} {_quoted(str(target))}")
    script = directory / "debugfs.commands"
    script.write_text("\n".join(commands) + "\n")
    run_tool(["debugfs", "-f", script, image])
    contents: dict[str, bytes | None] = {}
    for path in paths:
        dumped = targets.get(path)
        exists = dumped is not None and dumped.exists()
        contents[path] = dumped.read_bytes() if dumped is not None and exists else None
    return contents
