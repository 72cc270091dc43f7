"""Exceptions raised by the host side of mbl-sim.

Every exception that mbl-sim raises on purpose derives from one root::

    MblSimError
    ├── ConfigError              the caller's mistake: bad board file, option or host
    │   └── BoardError           a board file is invalid (names file, key, value)
    ├── TargetError              the target misbehaved: QEMU, U-Boot, kernel, guest
    │   ├── QemuLaunchError      QEMU exited or hung before it was ready
    │   ├── ConsoleTimeoutError  no expected pattern on the console in time
    │   ├── ConsoleAbortError    an abort pattern matched, or the console closed
    │   ├── QmpError             a QMP command failed or the connection broke
    │   └── CommandFailedError   a guest shell command exited non-zero
    ├── UpdateFailedError        an update did not do what it should
    └── BuildError               an image build step failed

Errors carry what was expected, what was seen and where, as attributes and in
the message. The underlying cause, when there is one, is chained with ``from``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence

__all__ = [
    "BoardError",
    "BuildError",
    "CommandFailedError",
    "ConfigError",
    "ConsoleAbortError",
    "ConsoleTimeoutError",
    "MblSimError",
    "QemuLaunchError",
    "QmpError",
    "TargetError",
    "UpdateFailedError",
]


def _indent(text: str, prefix: str = "    ") -> str:
    """Indent a block of captured output under a message line."""
    if not text:
        return prefix + "(empty)"
    return "\n".join(prefix + line for line in text.splitlines())


class MblSimError(Exception):
    """Root of every error that mbl-sim raises on purpose."""


class ConfigError(MblSimError):
    """The caller's mistake: an invalid board file, option or host setup."""


class BoardError(ConfigError):
    """A board file is invalid.

    Attributes:
        file: the board file.
        key: the key path, for example ``storage.partitions[2].size``; empty when
            the error concerns the whole file.
        value: the value seen; None when the key is missing.
        allowed: what the key accepts.
    """

    def __init__(
        self,
        file: str,
        key: str,
        value: object,
        allowed: str,
        *,
        problem: str | None = None,
    ) -> None:
        self.file = file
        self.key = key
        self.value = value
        self.allowed = allowed
        where = f"{file}: {key}" if key else file
        if problem is None:
            problem = f"invalid value {value!r}"
        super().__init__(f"{where}: {problem}; expected {allowed}")


class TargetError(MblSimError):
    """The target misbehaved: QEMU, U-Boot, the kernel or the guest."""


class QemuLaunchError(TargetError):
    """QEMU exited, or did not open its QMP socket, right after it was started.

    Attributes:
        exit_code: QEMU's exit status; a negative number is the signal that
            ended it; None when QEMU was still running (it hung).
        command: the full QEMU command line.
        stderr: everything QEMU wrote to its standard error.
        reason: what went wrong, in a few words.
    """

    def __init__(
        self,
        reason: str,
        *,
        exit_code: int | None,
        command: Sequence[str],
        stderr: str,
    ) -> None:
        self.reason = reason
        self.exit_code = exit_code
        self.command = list(command)
        self.stderr = stderr
        super().__init__(
            f"QEMU launch failed: {reason} (exit code {exit_code})\n"
            f"  command: {shlex.join(self.command)}\n"
            f"  stderr:\n{_indent(stderr)}"
        )


class ConsoleTimeoutError(TargetError):
    """None of the expected patterns appeared on the console in time.

    Attributes:
        patterns: the regular expressions waited for.
        timeout: the time waited, in seconds.
        tail: the last characters received on the console.
    """

    def __init__(self, patterns: Sequence[str], timeout: float, tail: str) -> None:
        self.patterns = list(patterns)
        self.timeout = timeout
        self.tail = tail
        super().__init__(
            f"console timed out after {timeout:g} s waiting for "
            f"{' or '.join(repr(p) for p in self.patterns)}\n"
            f"  console tail:\n{_indent(tail)}"
        )


class ConsoleAbortError(TargetError):
    """A console wait stopped early: an abort pattern matched or the console closed.

    Attributes:
        reason: the abort pattern's name (``kernel panic``, ``unexpected U-Boot
            banner``) or why the console closed.
        pattern: the abort pattern's regular expression; None when the console
            closed.
        matched: the text the abort pattern matched; empty when the console closed.
        tail: the last characters received on the console.
    """

    def __init__(
        self, reason: str, *, pattern: str | None, matched: str, tail: str
    ) -> None:
        self.reason = reason
        self.pattern = pattern
        self.matched = matched
        self.tail = tail
        detail = f": {matched.strip()!r} matched {pattern!r}" if pattern else ""
        super().__init__(
            f"console wait aborted, {reason}{detail}\n  console tail:\n{_indent(tail)}"
        )


class QmpError(TargetError):
    """A QMP command failed, timed out, or the QMP connection broke.

    Attributes:
        command: the QMP command, or ``connect`` for the connection itself.
        arguments: the command's arguments.
    """

    def __init__(
        self, command: str, arguments: dict[str, object], message: str
    ) -> None:
        self.command = command
        self.arguments = dict(arguments)
        shown = command
        if self.arguments:
            shown += " " + json.dumps(self.arguments, default=repr)
        super().__init__(f"QMP {shown} failed: {message}")


class CommandFailedError(TargetError):
    """A command run in the guest's shell exited with a non-zero status.

    Attributes:
        command: the shell command.
        exit_status: its exit status.
        output: its standard output and standard error, as the console showed them.
    """

    def __init__(self, command: str, exit_status: int, output: str) -> None:
        self.command = command
        self.exit_status = exit_status
        self.output = output
        super().__init__(
            f"guest command {command!r} exited with status {exit_status}\n"
            f"  output:\n{_indent(output)}"
        )


class UpdateFailedError(MblSimError):
    """An update did not do what it should: wrong slot, lost data, no rollback."""


class BuildError(MblSimError):
    """A step of an image build failed.

    Attributes:
        command: the command line that failed; empty when no command was run.
        exit_code: its exit status; None when no command was run or it was not
            found.
        stderr: what it wrote to standard error.

    The message is ``message``, followed by the command line and stderr when they
    are given.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        exit_code: int | None = None,
        stderr: str = "",
    ) -> None:
        self.command = list(command)
        self.exit_code = exit_code
        self.stderr = stderr
        text = message
        if self.command:
            text += f"\n  command: {shlex.join(self.command)}"
        if stderr:
            text += f"\n  stderr:\n{_indent(stderr)}"
        super().__init__(text)
