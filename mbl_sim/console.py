"""Serial consoles: waits with abort patterns, transcripts, and a shell helper.

``Console`` wraps a pexpect ``spawn`` whose terminal is the guest's serial port
(QEMU with its serial on stdio). Every wait names its patterns and timeout, and
a set of abort patterns (kernel panic, Oops, an unexpected U-Boot banner) ends
any wait at once with ``ConsoleAbortError``. Everything received goes to a
transcript file, and so does everything sent, marked as sent. Each received line
is also logged at the CONSOLE level to a child logger named after the guest.

``Shell`` drives a POSIX shell (busybox ash in the guest) on a console: it sets
a distinctive prompt, turns off the terminal's echo and runs one command at a
time, returning its exit status and output.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import pexpect

from mbl_sim.errors import (
    CommandFailedError,
    ConfigError,
    ConsoleAbortError,
    ConsoleTimeoutError,
)
from mbl_sim.log import CONSOLE

__all__ = [
    "DEFAULT_ABORTS",
    "KERNEL_FAULT",
    "KERNEL_OOPS",
    "KERNEL_PANIC",
    "UBOOT_BANNER",
    "UBOOT_PROMPT",
    "AbortPattern",
    "CommandResult",
    "Console",
    "ConsoleMatch",
    "Shell",
    "stop_autoboot",
]

_log = logging.getLogger(__name__)

TAIL_CHARS = 600
"""Characters of console output that errors quote."""

_KEPT_CHARS = 8192
_ABORT_DRAIN_SECONDS = 1.0
_ABORT_QUIET_SECONDS = 0.2

# CSI sequences (ESC [ ... final byte), such as the cursor position request
# ESC[6n that busybox ash writes after each prompt. Kept in the transcript,
# removed from log lines.
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-9;?]{0,16}[@-~]")


@dataclass(frozen=True)
class AbortPattern:
    """A console pattern that ends any wait with ``ConsoleAbortError``."""

    name: str
    regex: str
    """A regular expression; bounded, so it never scans past one line."""


KERNEL_PANIC = AbortPattern("kernel panic", r"Kernel panic - not syncing[^\r\n]{0,120}")
KERNEL_OOPS = AbortPattern("kernel Oops", r"Internal error: Oops[^\r\n]{0,120}")
KERNEL_FAULT = AbortPattern("kernel fault", r"Unable to handle kernel[^\r\n]{0,120}")
UBOOT_BANNER = AbortPattern(
    "unexpected U-Boot banner", r"U-Boot 20[0-9]{2}\.[0-9]{2}[^\r\n]{0,80}"
)
"""U-Boot's first line, ``U-Boot 2023.01+dfsg-2 (...)``: the board reset.

U-Boot's ``version`` command prints the same line; wait for its output inside
``Console.allowing(UBOOT_BANNER)``.
"""

DEFAULT_ABORTS = (KERNEL_PANIC, KERNEL_OOPS, KERNEL_FAULT, UBOOT_BANNER)


@dataclass(frozen=True)
class ConsoleMatch:
    """The result of a successful ``Console.expect``."""

    index: int
    """Index of the pattern that matched, in the order given."""
    match: re.Match[str]
    before: str
    """Text received before the match and after the previous match."""

    @property
    def text(self) -> str:
        """The matched text."""
        return self.match.group(0)


class _Recorder:
    """Receives pexpect's logging of traffic: transcript, tail and log lines."""

    def __init__(self, transcript: IO[str] | None, logger: logging.Logger) -> None:
        self._transcript = transcript
        self._logger = logger
        self._tail = ""
        self._partial_line = ""

    def received(self, data: str) -> None:
        if self._transcript is not None:
            self._transcript.write(data)
            self._transcript.flush()
        self._tail = (self._tail + data)[-_KEPT_CHARS:]
        self._log_lines(data)

    def sent(self, data: str) -> None:
        if self._transcript is not None:
            self._transcript.write(f"<<sent {data!r}>>")
            self._transcript.flush()

    def tail(self, chars: int) -> str:
        return self._tail[-chars:]

    def close(self) -> None:
        if self._partial_line:
            self._log_line(self._partial_line)
            self._partial_line = ""
        if self._transcript is not None:
            self._transcript.close()
            self._transcript = None

    def _log_lines(self, data: str) -> None:
        *complete, self._partial_line = (self._partial_line + data).split("\n")
        for line in complete:
            self._log_line(line)

    def _log_line(self, line: str) -> None:
        if self._logger.isEnabledFor(CONSOLE):
            clean = _ESCAPE_SEQUENCE.sub("", line).replace("\r", "")
            self._logger.log(CONSOLE, "%s", clean)


class _ReadLog:
    """File-like sink that pexpect writes received text to."""

    def __init__(self, recorder: _Recorder) -> None:
        self._recorder = recorder

    def write(self, data: str) -> None:
        self._recorder.received(data)

    def flush(self) -> None:
        pass


class _SendLog:
    """File-like sink that pexpect writes sent text to."""

    def __init__(self, recorder: _Recorder) -> None:
        self._recorder = recorder

    def write(self, data: str) -> None:
        self._recorder.sent(data)

    def flush(self) -> None:
        pass


class Console:
    """A guest's serial console on a pexpect ``spawn`` that decodes text.

    ``aborts`` is the set of abort patterns in force; assign a new tuple to change
    it, or use ``allowing()`` for one stretch of code. The transcript shows sent
    text as ``<<sent 'TEXT'>>`` (Python repr). The console reads only inside
    ``expect()`` and ``drain()``: output that arrives in between stays in the pty.

    NOTE: the pty buffers only a few KiB. When it is full, QEMU stops the guest's
    serial output (and the vCPU writing it) until the host reads again.
    """

    def __init__(
        self,
        child: Any,
        *,
        name: str = "guest",
        transcript: Path | None = None,
        aborts: Sequence[AbortPattern] = DEFAULT_ABORTS,
    ) -> None:
        """Wrap ``child``, a ``pexpect.spawn`` opened with an ``encoding``.

        The console takes over the child's ``logfile_read``, ``logfile_send`` and
        ``delaybeforesend``. ``transcript`` is the file that receives every
        character read and every string sent. A console appends to it, after a
        ``<<console NAME opened>>`` line when the file is not empty, so the
        consoles of a machine started several times share one transcript.
        """
        self.name = name
        self.aborts = tuple(aborts)
        self.transcript_path = transcript
        self._log = _log.getChild(name)
        self._child = child
        stream = None
        if transcript is not None:
            stream = transcript.open("a", encoding="utf-8", errors="replace")
            if stream.tell() > 0:
                stream.write(f"\n<<console {name} opened>>\n")
        self._recorder = _Recorder(stream, self._log)
        child.logfile_read = _ReadLog(self._recorder)
        child.logfile_send = _SendLog(self._recorder)
        # pexpect pauses 50 ms before each send by default, for programs that
        # change terminal modes while reading a password. A serial console needs
        # no pause: QEMU reads the pty only when the guest's UART can take bytes.
        child.delaybeforesend = None

    def expect(self, patterns: str | Sequence[str], timeout: float) -> ConsoleMatch:
        """Wait until one of ``patterns`` (regular expressions) appears.

        The pattern that matches earliest in the output wins, abort patterns
        included. Returns the match; the console's output up to its end is
        consumed.

        Raises:
            ConsoleAbortError: an abort pattern matched first, or the console
                closed (QEMU exited).
            ConsoleTimeoutError: nothing matched within ``timeout`` seconds.
        """
        expected = [patterns] if isinstance(patterns, str) else list(patterns)
        aborts = self.aborts
        compiled: list[Any] = [re.compile(p) for p in expected]
        compiled += [re.compile(a.regex) for a in aborts]
        compiled += [pexpect.EOF, pexpect.TIMEOUT]
        index = self._child.expect_list(compiled, timeout=timeout)
        if index < len(expected):
            return ConsoleMatch(index, self._child.match, self._child.before)
        if index < len(expected) + len(aborts):
            self._abort(aborts[index - len(expected)], self._child.match.group(0))
        if compiled[index] is pexpect.EOF:
            raise self._closed_error()
        raise ConsoleTimeoutError(expected, timeout, self.tail())

    def _closed_error(self) -> ConsoleAbortError:
        return ConsoleAbortError(
            "the console closed (QEMU exited)",
            pattern=None,
            matched="",
            tail=self.tail(),
        )

    def _abort(self, pattern: AbortPattern, matched: str) -> NoReturn:
        self._log.debug("abort pattern %r matched: %r", pattern.name, matched)
        # Read on for a moment so that the error's tail shows the whole panic
        # or Oops report, not only its first line.
        self.drain(_ABORT_DRAIN_SECONDS)
        raise ConsoleAbortError(
            pattern.name, pattern=pattern.regex, matched=matched, tail=self.tail()
        )

    def drain(self, timeout: float) -> str:
        """Read until the console has been quiet briefly or ``timeout`` passes.

        Returns the text read, which later waits no longer see. Abort patterns
        are not checked.
        """
        deadline = time.monotonic() + timeout
        chunks = [self._child.buffer]
        self._child.buffer = ""
        while (remaining := deadline - time.monotonic()) > 0:
            quiet = min(remaining, _ABORT_QUIET_SECONDS)
            try:
                chunks.append(self._child.read_nonblocking(65536, timeout=quiet))
            except (pexpect.TIMEOUT, pexpect.EOF):
                break
        return "".join(chunks)

    def send(self, text: str) -> None:
        """Send ``text`` as it is.

        Raises:
            ConsoleAbortError: the console is closed (QEMU exited).
        """
        try:
            self._child.send(text)
        except OSError as error:
            raise self._closed_error() from error

    def sendline(self, line: str = "") -> None:
        """Send ``line`` and a newline.

        Raises:
            ConsoleAbortError: the console is closed (QEMU exited).
        """
        self.send(line + "\n")

    @contextmanager
    def allowing(self, *patterns: AbortPattern) -> Iterator[None]:
        """Suspend the given abort patterns inside the ``with`` block."""
        saved = self.aborts
        self.aborts = tuple(a for a in saved if a not in patterns)
        try:
            yield
        finally:
            self.aborts = saved

    def tail(self, chars: int = TAIL_CHARS) -> str:
        """Return the last ``chars`` characters received."""
        return self._recorder.tail(chars)

    def close(self) -> None:
        """Log the last partial line and close the transcript.

        The process behind the console is left alone; its owner ends it.
        """
        self._recorder.close()


# --------------------------------------------------------------------------
# U-Boot

UBOOT_PROMPT = "=> "
"""The prompt of U-Boot's shell in Debian's u-boot-qemu builds."""


def stop_autoboot(console: Console, timeout: float, prompt: str = UBOOT_PROMPT) -> None:
    """Wait for U-Boot's autoboot countdown, stop it with a key, await ``prompt``
    (other builds than u-boot-qemu have other prompts, such as ``U-Boot> ``).

    U-Boot's banner is expected before the countdown, so UBOOT_BANNER does not
    end this wait.

    Raises:
        ConsoleTimeoutError: no countdown or no prompt within ``timeout`` seconds
            each.
        ConsoleAbortError: another abort pattern matched.
    """
    with console.allowing(UBOOT_BANNER):
        console.expect("Hit any key to stop autoboot", timeout)
    console.send(" ")
    console.expect(re.escape(prompt), timeout)


# --------------------------------------------------------------------------
# Shell


@dataclass(frozen=True)
class CommandResult:
    """A command run by ``Shell.run``."""

    command: str
    exit_status: int
    output: str
    """Standard output and standard error, interleaved as the console showed
    them, with line ends as ``\\n``."""

    def check(self) -> CommandResult:
        """Return the result if the command succeeded.

        Raises:
            CommandFailedError: the exit status is not 0.
        """
        if self.exit_status != 0:
            raise CommandFailedError(self.command, self.exit_status, self.output)
        return self


DEFAULT_PROMPT = "mbl-sim# "

MAX_LINE = 1022
"""Maximum length in bytes of an input line that busybox ash reads whole.

Measured with Debian's busybox 1.35 (built with CONFIG_FEATURE_EDITING_MAX_LEN
1024): a 1023-byte line is cut short, with or without terminal echo.
"""

_LINE_END = r"\r*\n"


def _split_quoted(text: str) -> str:
    """Quote ``text`` for the shell as two adjacent single-quoted halves.

    The shell joins the halves, but the command line itself, and so its echo,
    never contains ``text`` in one piece.
    """
    if "'" in text or len(text) < 2:
        raise ConfigError(f"cannot split {text!r}: need 2+ characters and no quote")
    middle = len(text) // 2
    return f"'{text[:middle]}''{text[middle:]}'"


class Shell:
    """A POSIX shell on a console (busybox ash or dash), one command at a time.

    Call ``setup()`` once the shell shows its first prompt. Commands run through
    ``eval``, framed by a start marker and an end marker that carries ``$?``.
    Both markers are printed from split quoted strings, so the echo of the
    command line never matches them, and the output is the text between them.
    """

    def __init__(
        self,
        console: Console,
        *,
        prompt: str = DEFAULT_PROMPT,
        max_line: int = MAX_LINE,
    ) -> None:
        self.console = console
        self.prompt = prompt
        self.max_line = max_line
        self._prompt_pattern = re.escape(prompt)
        self._count = 0
        self._log = _log.getChild(console.name)

    def setup(self, timeout: float = 10.0) -> None:
        """Turn off the terminal's echo, set the prompt and check a first command.

        With echo off, busybox ash also reads lines without its line editor, so
        it stops writing ``ESC[6n`` after each prompt.

        Raises:
            ConsoleTimeoutError: the shell did not show the new prompt.
            ConsoleAbortError: an abort pattern matched.
            CommandFailedError: the check command ``:`` failed.
        """
        self._log.debug("shell setup: prompt %r", self.prompt)
        self.console.sendline(
            f"stty -echo; PS1={_split_quoted(self.prompt)}; PS2=''; export PS1"
        )
        self.console.expect(self._prompt_pattern, timeout)
        self.run(":", timeout).check()

    def run(
        self, command: str, timeout: float = 30.0, *, check: bool = False
    ) -> CommandResult:
        """Run one line of shell and return its exit status and output.

        ``command`` may be any single line: a pipeline, a list, a trailing ``&``
        or a comment. After a timeout the command may still be running; send
        ``\\x03`` (Ctrl-C) and call ``setup()`` again to continue.

        Raises:
            ConfigError: ``command`` has a newline or makes the line too long.
            ConsoleTimeoutError: the command did not finish within ``timeout``.
            ConsoleAbortError: an abort pattern matched.
            CommandFailedError: ``check`` is set and the exit status is not 0.
        """
        line, begin, end = self._frame(command)
        deadline = time.monotonic() + timeout
        self._log.debug("run: %s", command)
        self.console.sendline(line)
        try:
            self.console.expect(re.escape(begin) + _LINE_END, _remaining(deadline))
            finished = self.console.expect(
                re.escape(end) + r"([0-9]{1,3})" + _LINE_END, _remaining(deadline)
            )
            self.console.expect(self._prompt_pattern, _remaining(deadline))
        except (ConsoleTimeoutError, ConsoleAbortError) as error:
            error.add_note(f"while running shell command {command!r}")
            raise
        status = int(finished.match.group(1))
        output = re.sub(_LINE_END, "\n", finished.before)
        self._log.debug("exit status %d: %s", status, command)
        result = CommandResult(command, status, output)
        if check:
            result.check()
        return result

    def _frame(self, command: str) -> tuple[str, str, str]:
        """Return the line to send for ``command`` and its two markers."""
        if "\n" in command or "\r" in command:
            raise ConfigError(f"shell command must be one line: {command!r}")
        self._count += 1
        begin = f"@mbl-begin-{self._count}@"
        end = f"@mbl-end-{self._count}@"
        line = (
            f"printf {_split_quoted(begin)}'\\n'; eval {shlex.quote(command)}; "
            f"printf {_split_quoted(end)}'%d\\n' $?"
        )
        if len(line.encode()) > self.max_line:
            raise ConfigError(
                f"shell command too long: {len(line.encode())} bytes with markers, "
                f"the shell reads at most {self.max_line}; copy a script to the "
                "guest instead"
            )
        return line, begin, end


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
