"""Run external commands (mke2fs, mount, e2fsck, reboot) with logs and typed errors."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable, Sequence

from updater.errors import CommandError

log = logging.getLogger(__name__)

# Characters of stdout and stderr kept in an error message. e2fsck and mke2fs put the
# useful line last, and the message must stay readable on a serial console.
OUTPUT_TAIL_CHARS = 2000

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]
"""Signature of `run_command`, so callers and tests can substitute another runner."""


def run_command(
    argv: Sequence[str], *, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` without a shell, log it and its exit code, and return the result.

    Raises:
        CommandError: the program is not found, the command times out after
            ``timeout`` seconds, or it exits non-zero. The message carries the command
            line, the exit code and the tail of stderr and stdout.
    """
    command_line = shlex.join(argv)
    log.info("running: %s", command_line)
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise CommandError(
            f"command not found: {argv[0]!r} (running {command_line}); "
            "install the program or fix PATH",
            argv,
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(
            f"command timed out after {timeout} s: {command_line}", argv
        ) from exc

    log.info("exit code %d: %s", result.returncode, command_line)
    if result.stderr:
        log.debug("stderr of %s: %s", argv[0], result.stderr.rstrip())
    if result.returncode != 0:
        raise CommandError(
            _failure_message(command_line, result),
            argv,
            result.returncode,
            result.stderr,
            result.stdout,
        )
    return result


def _failure_message(
    command_line: str, result: subprocess.CompletedProcess[str]
) -> str:
    message = f"command failed with exit code {result.returncode}: {command_line}"
    stderr = result.stderr.strip()
    stdout = result.stdout.strip()
    if stderr:
        message += f"\nstderr: {stderr[-OUTPUT_TAIL_CHARS:]}"
    if stdout:
        message += f"\nstdout: {stdout[-OUTPUT_TAIL_CHARS:]}"
    return message
