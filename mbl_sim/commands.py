"""Run host commands: log the command and its exit code, put stderr into errors."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from mbl_sim.errors import BuildError

log = logging.getLogger(__name__)


def run(
    command: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input_bytes: bytes | None = None,
    stdout_path: Path | None = None,
) -> str:
    """Run ``command`` and return its standard output as text.

    With ``stdout_path`` the output goes to that file instead and "" is returned.

    Raises:
        BuildError: the command is missing or exits non-zero; the message carries the
            command line, the exit code and the end of stderr.
    """
    argv = [str(part) for part in command]
    line = shlex.join(argv)
    log.debug("run: %s", line)
    try:
        if stdout_path is not None:
            with stdout_path.open("wb") as out:
                result = subprocess.run(
                    argv,
                    cwd=cwd,
                    env=env,
                    input=input_bytes,
                    stdout=out,
                    stderr=subprocess.PIPE,
                    check=False,
                )
        else:
            result = subprocess.run(
                argv,
                cwd=cwd,
                env=env,
                input=input_bytes,
                capture_output=True,
                check=False,
            )
    except FileNotFoundError as error:
        raise BuildError(
            f"command not found: {argv[0]}; install the host packages with "
            "scripts/setup",
            command=argv,
        ) from error
    log.debug("exit %d: %s", result.returncode, argv[0])
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")[-2000:]
        raise BuildError(
            f"{argv[0]} failed with exit code {result.returncode}",
            command=argv,
            exit_code=result.returncode,
            stderr=stderr,
        )
    if stdout_path is not None:
        return ""
    return str(result.stdout.decode(errors="replace"))
