"""The registry of certification checks and the context they run in.

A check is a function that takes a :class:`CertifyContext` and returns a one-line
detail for the report (or None). It fails by raising :class:`CheckFailed` or any
``MblSimError``, and skips itself by raising :class:`CheckSkipped`. Checks run in
registration order; a check whose ``requires`` did not pass is skipped with the name
of the check that blocked it.

Other modules add checks with :func:`register`. A *plugin check* names a function in
another module (``module:function``). When the module or the function is missing,
the check is skipped as "not available", so certification runs before that module
exists.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbl_sim.board import Board
from mbl_sim.device import BOOT_TIMEOUT, Device
from mbl_sim.errors import MblSimError
from mbl_sim.images.recipe import DeviceImages

__all__ = [
    "CHECKS",
    "CertifyContext",
    "Check",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "Finding",
    "plugin_check",
    "register",
]

log = logging.getLogger(__name__)

PASSED = "passed"
FAILED = "failed"
SKIPPED = "skipped"


class CheckFailed(MblSimError):
    """A certification check found the board wrong; the message names the fault."""


class CheckSkipped(MblSimError):
    """A certification check cannot run here; the message gives the reason."""


@dataclass(frozen=True)
class Finding:
    """A property of the board that certification reports without failing it.

    Attributes:
        check: the check that found it.
        title: one line.
        detail: the reason and the consequence, for the report.
    """

    check: str
    title: str
    detail: str


@dataclass
class CertifyContext:
    """State shared by the checks: the board, its images, one device, the findings.

    The first check that needs a running device boots ``device``; later checks
    reuse it. ``facts`` collects what the report lists about the board (kernel
    version, device tree model, device names), in insertion order.
    """

    board: Board
    images: DeviceImages
    workdir: Path
    report: Callable[[str], None]
    device: Device | None = None
    facts: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    boot_seconds: float | None = None
    boot_timeout: float = BOOT_TIMEOUT
    """Seconds each stage of a boot (U-Boot, shell) may take."""

    def running_device(self) -> Device:
        """Return the shared device, booting it to its shell first if needed.

        Raises:
            QemuLaunchError, ConsoleTimeoutError, ConsoleAbortError: the boot failed.
        """
        if self.device is not None and self.device.shell is not None:
            return self.device
        if self.device is None:
            self.device = Device(self.images, self.workdir / "device", name="certify")
        started = time.monotonic()
        self.device.power_on(timeout=self.boot_timeout)
        self.boot_seconds = time.monotonic() - started
        return self.device

    def add_finding(self, check: str, title: str, detail: str) -> None:
        """Record a finding and report it."""
        self.findings.append(Finding(check, title, detail))
        self.report(f"    finding: {title}")

    def close(self) -> None:
        """Power the shared device off."""
        if self.device is not None:
            self.device.close()


CheckFunction = Callable[[CertifyContext], "str | None"]


@dataclass(frozen=True)
class Check:
    """One registered check.

    Attributes:
        name: short identifier, used on the command line and in JUnit XML.
        title: what the check verifies, in one line for a reader new to mbl-sim.
        function: the check.
        requires: names of checks that must pass first.
        core: whether a board is certified only when this check passed.
    """

    name: str
    title: str
    function: CheckFunction
    requires: tuple[str, ...] = ()
    core: bool = True


@dataclass
class CheckResult:
    """The outcome of one check."""

    name: str
    title: str
    status: str
    seconds: float
    detail: str = ""
    core: bool = True


CHECKS: dict[str, Check] = {}
"""Registered checks by name, in the order they run."""


def register(
    name: str, title: str, *, requires: Sequence[str] = (), core: bool = True
) -> Callable[[CheckFunction], CheckFunction]:
    """Register the decorated function as the check ``name``.

    Raises:
        ValueError: a check of that name exists, or a required check is unknown.
    """

    def decorate(function: CheckFunction) -> CheckFunction:
        if name in CHECKS:
            raise ValueError(f"certification check {name!r} is already registered")
        unknown = [r for r in requires if r not in CHECKS]
        if unknown:
            raise ValueError(
                f"check {name!r} requires unknown checks {', '.join(unknown)}; "
                "register them first"
            )
        CHECKS[name] = Check(name, title, function, tuple(requires), core)
        return function

    return decorate


def plugin_check(
    name: str,
    title: str,
    target: str,
    *,
    requires: Sequence[str] = (),
    purpose: str,
) -> None:
    """Register a check that calls ``target`` (``package.module:function``).

    The function takes the context and returns a detail line, as any check. Until
    the module defines it, the check is skipped with "not available" and
    ``purpose``, so a report names what is missing. Plugin checks are not core.
    """
    module_name, _, function_name = target.partition(":")

    def run_plugin(context: CertifyContext) -> str | None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise CheckSkipped(
                f"not available: module {module_name} cannot be imported ({error}); "
                f"{purpose}"
            ) from error
        function: Any = getattr(module, function_name, None)
        if not callable(function):
            raise CheckSkipped(
                f"not available: {module_name} has no {function_name}(context); "
                f"{purpose}"
            )
        result = function(context)
        return None if result is None else str(result)

    register(name, title, requires=requires, core=False)(run_plugin)
