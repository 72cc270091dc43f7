"""Console and Shell against local processes: sh scripts, busybox ash and dash."""

from __future__ import annotations

import logging
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from mbl_sim.console import (
    DEFAULT_ABORTS,
    UBOOT_BANNER,
    AbortPattern,
    Console,
    Shell,
)
from mbl_sim.errors import (
    CommandFailedError,
    ConfigError,
    ConsoleAbortError,
    ConsoleTimeoutError,
)
from mbl_sim.log import CONSOLE

SHELLS = {
    "busybox": ["busybox", "sh", "-i"],
    "dash": ["dash", "-i"],
}


def spawn(argv: list[str], **env: str) -> Any:
    child = pexpect.spawn(
        argv[0],
        argv[1:],
        encoding="utf-8",
        codec_errors="replace",
        env={"PATH": "/usr/bin:/bin", "PS1": "$ ", "HOME": "/", **env},
    )
    # The fixture kills and reaps the process first, so close() need not wait.
    child.ptyproc.delayafterclose = 0
    return child


def spawn_script(script: str) -> Any:
    return spawn(["sh", "-c", script])


@pytest.fixture
def closing() -> Iterator[list[Console]]:
    """Collect consoles and kill their processes after the test."""
    consoles: list[Console] = []
    yield consoles
    for console in consoles:
        child = console._child
        if child.isalive():
            child.kill(signal.SIGKILL)
            child.wait()
        child.close()
        console.close()


def script_console(
    closing: list[Console], script: str, transcript: Path | None = None
) -> Console:
    console = Console(spawn_script(script), name="script", transcript=transcript)
    closing.append(console)
    return console


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest, closing: list[Console]) -> Shell:
    argv = SHELLS[request.param]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (Debian package {argv[0]})")
    console = Console(spawn(argv), name=request.param)
    closing.append(console)
    console.expect(r"\$ ", timeout=10)
    shell = Shell(console)
    shell.setup(timeout=10)
    return shell


# --------------------------------------------------------------------------
# Console waits


def test_expect_returns_match_and_before(closing: list[Console]) -> None:
    console = script_console(closing, "echo 'booting'; echo 'login: '; sleep 30")

    found = console.expect([r"password:", r"login: "], timeout=10)

    assert found.index == 1
    assert found.text == "login: "
    assert "booting" in found.before


def test_abort_pattern_stops_wait(closing: list[Console]) -> None:
    script = (
        "echo 'Kernel panic - not syncing: Attempted to kill init!'; "
        "echo 'Call trace:'; sleep 30"
    )
    console = script_console(closing, script)
    started = time.monotonic()

    with pytest.raises(ConsoleAbortError) as caught:
        console.expect("login:", timeout=20)

    assert time.monotonic() - started < 5
    error = caught.value
    assert error.reason == "kernel panic"
    assert "Attempted to kill init!" in error.matched
    assert "Call trace:" in error.tail
    assert "kernel panic" in str(error)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("Internal error: Oops: 96000004 [#1] SMP", "kernel Oops"),
        ("Unable to handle kernel NULL pointer dereference", "kernel fault"),
        ("U-Boot 2023.01+dfsg-2+deb12u3 (Jun 22 2026)", "unexpected U-Boot banner"),
    ],
)
def test_default_abort_patterns(closing: list[Console], line: str, reason: str) -> None:
    console = script_console(closing, f"echo '{line}'; sleep 30")

    with pytest.raises(ConsoleAbortError) as caught:
        console.expect("login:", timeout=20)

    assert caught.value.reason == reason


def test_abort_earlier_than_match_wins(closing: list[Console]) -> None:
    console = script_console(closing, "echo 'U-Boot 2023.01'; echo 'login:'; sleep 30")

    with pytest.raises(ConsoleAbortError):
        console.expect("login:", timeout=10)


def test_allowing_suspends_abort_pattern(closing: list[Console]) -> None:
    console = script_console(closing, "echo 'U-Boot 2023.01'; echo '=> '; sleep 30")

    with console.allowing(UBOOT_BANNER):
        found = console.expect("=> ", timeout=10)

    assert "U-Boot 2023.01" in found.before
    assert console.aborts == DEFAULT_ABORTS


def test_custom_abort_set(closing: list[Console]) -> None:
    console = script_console(
        closing, "echo 'Out of memory: Killed process 7'; sleep 30"
    )
    console.aborts = (AbortPattern("OOM kill", r"Out of memory: [^\r\n]{0,80}"),)

    with pytest.raises(ConsoleAbortError) as caught:
        console.expect("login:", timeout=10)

    assert caught.value.reason == "OOM kill"


def test_timeout_names_patterns_and_tail(closing: list[Console]) -> None:
    console = script_console(closing, "echo 'Starting kernel ...'; sleep 30")

    with pytest.raises(ConsoleTimeoutError) as caught:
        console.expect(["login:", "=> "], timeout=0.5)

    error = caught.value
    assert error.patterns == ["login:", "=> "]
    assert error.timeout == 0.5
    assert "Starting kernel ..." in error.tail
    message = str(error)
    assert "timed out after 0.5 s" in message
    assert "'login:' or '=> '" in message
    assert "Starting kernel ..." in message


def test_console_closed_is_abort(closing: list[Console]) -> None:
    console = script_console(closing, "echo 'bye'")

    with pytest.raises(ConsoleAbortError) as caught:
        console.expect("login:", timeout=10)

    assert caught.value.pattern is None
    assert "console closed" in str(caught.value)
    assert "bye" in caught.value.tail


# --------------------------------------------------------------------------
# Transcript and logging


def test_transcript_records_both_directions(
    closing: list[Console], tmp_path: Path
) -> None:
    transcript = tmp_path / "console.log"
    console = script_console(
        closing, 'read line; echo "got $line"; sleep 30', transcript
    )

    console.sendline("hello")
    console.expect("got hello", timeout=10)
    console.close()

    text = transcript.read_text()
    assert "<<sent 'hello\\n'>>" in text
    assert "got hello" in text


def test_transcript_appends_on_reopen(closing: list[Console], tmp_path: Path) -> None:
    transcript = tmp_path / "console.log"
    first = script_console(closing, "echo first; sleep 30", transcript)
    first.expect("first", timeout=10)
    first.close()

    second = script_console(closing, "echo second; sleep 30", transcript)
    second.expect("second", timeout=10)
    second.close()

    text = transcript.read_text()
    assert text.startswith("first")
    assert "\n<<console script opened>>\nsecond" in text


def test_console_lines_logged_at_console_level(
    closing: list[Console], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(CONSOLE, logger="mbl_sim.console")
    console = script_console(closing, "printf 'one\\r\\n\\033[6ntwo\\r\\n'; sleep 30")

    console.expect("two", timeout=10)
    console.expect(r"\n", timeout=10)

    records = [r for r in caplog.records if r.name == "mbl_sim.console.script"]
    assert [r.getMessage() for r in records] == ["one", "two"]
    assert {r.levelname for r in records} == {"CONSOLE"}
    assert logging.getLevelName(CONSOLE) == "CONSOLE"


# --------------------------------------------------------------------------
# Shell


def test_shell_returns_status_and_output(shell: Shell) -> None:
    result = shell.run("echo hello; false")

    assert result.exit_status == 1
    assert result.output == "hello\n"


def test_shell_exit_status_values(shell: Shell) -> None:
    assert shell.run("(exit 3)").exit_status == 3
    assert shell.run("(exit 255)").exit_status == 255
    assert shell.run("true").exit_status == 0


def test_shell_includes_stderr(shell: Shell) -> None:
    assert shell.run("echo oops >&2").output == "oops\n"


def test_shell_output_without_newline(shell: Shell) -> None:
    assert shell.run("printf abc").output == "abc"


def test_shell_empty_output(shell: Shell) -> None:
    assert shell.run("true").output == ""


def test_shell_comment_and_background(shell: Shell) -> None:
    assert shell.run("echo x # a comment").output == "x\n"
    assert shell.run("sleep 0 &").exit_status == 0


def test_shell_keeps_state_between_commands(shell: Shell) -> None:
    shell.run("cd /usr; VALUE=42")

    assert shell.run('echo "$PWD $VALUE"').output == "/usr 42\n"


def test_shell_prompt_and_markers_in_output(shell: Shell) -> None:
    result = shell.run("echo 'mbl-sim# '; echo '@mbl-end-99@0'")

    assert result.output == "mbl-sim# \n@mbl-end-99@0\n"


def test_shell_long_command_output_intact(shell: Shell) -> None:
    # Wider than the terminal's 80 columns, so an echo would be wrapped.
    word = "0123456789" * 85

    result = shell.run(f"echo {word} | wc -c")

    assert result.output.strip() == str(len(word) + 1)


def test_shell_multiline_output(shell: Shell) -> None:
    result = shell.run("for i in 1 2 3; do echo line$i; done")

    assert result.output == "line1\nline2\nline3\n"


def test_shell_check_raises_with_output(shell: Shell) -> None:
    with pytest.raises(CommandFailedError) as caught:
        shell.run(
            "echo failing; exit_code_is_7() { return 7; }; exit_code_is_7", check=True
        )

    assert caught.value.exit_status == 7
    assert caught.value.output == "failing\n"


def test_shell_timeout_names_command(shell: Shell) -> None:
    with pytest.raises(ConsoleTimeoutError) as caught:
        shell.run("sleep 5", timeout=0.5)

    assert "while running shell command 'sleep 5'" in caught.value.__notes__


def test_shell_rejects_multiline_command(shell: Shell) -> None:
    with pytest.raises(ConfigError, match="one line"):
        shell.run("echo a\necho b")


def test_shell_rejects_too_long_command(shell: Shell) -> None:
    with pytest.raises(ConfigError, match="too long"):
        shell.run("echo " + "x" * 1000)


def test_shell_works_with_echo_on(closing: list[Console]) -> None:
    # Without stty on PATH the terminal keeps echoing, and busybox keeps its line
    # editor, which wraps long lines and writes ESC[6n after each prompt.
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (Debian package busybox)")
    console = Console(spawn([busybox, "sh", "-i"], PATH="/nonexistent"), name="echo")
    closing.append(console)
    console.expect(r"\$ ", timeout=10)
    shell = Shell(console)
    shell.setup(timeout=10)
    word = "abcdefghij" * 30

    result = shell.run(f"echo {word}")

    assert result.output == word + "\n"
