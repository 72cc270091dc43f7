"""Scenarios: named sequences of update steps run on one device, each step reported.

A scenario is a function that takes a :class:`ScenarioContext` and drives its device; it
fails by raising. ``run_scenarios`` boots one device per scenario run and returns one
:class:`ScenarioResult` per scenario.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.device import Device
from mbl_sim.errors import ConfigError, MblSimError, UpdateFailedError
from mbl_sim.images.cache import default_cache_dir
from mbl_sim.images.recipe import DeviceImages
from mbl_sim.ipk import ShellApp, build_shell_app_payload
from mbl_sim.payloads import RootfsChange, cached_rootfs_payload

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    name: str
    seconds: float
    passed: bool
    detail: str = ""


@dataclass
class ScenarioResult:
    name: str
    passed: bool
    seconds: float
    steps: list[StepResult] = field(default_factory=list)
    error: str = ""
    workdir: Path | None = None


class ScenarioContext:
    """Context of a scenario: its device, payload builders and step reporting."""

    def __init__(
        self,
        device: Device,
        images: DeviceImages,
        report: Callable[[str], None],
        result: ScenarioResult,
    ) -> None:
        self.device = device
        self.images = images
        self.report = report
        self.result = result

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run one reported step; a step that raises fails the scenario."""
        self.report(f"  … {name}")
        started = time.monotonic()
        try:
            yield
        except BaseException as error:
            seconds = time.monotonic() - started
            self.result.steps.append(StepResult(name, seconds, False, str(error)))
            self.report(f"  ✗ {name} ({seconds:.1f} s): {type(error).__name__}")
            raise
        seconds = time.monotonic() - started
        self.result.steps.append(StepResult(name, seconds, True))
        self.report(f"  ✓ {name} ({seconds:.1f} s)")

    def rootfs_payload(
        self, version: str, files: dict[str, bytes] | None = None
    ) -> Path:
        change = RootfsChange(version=version, files=files or {})
        return cached_rootfs_payload(self.images.rootfs, default_cache_dir(), change)

    def expect(self, what: str, actual: object, expected: object) -> None:
        """Raise UpdateFailedError unless ``actual == expected``."""
        if actual != expected:
            raise UpdateFailedError(f"{what}: expected {expected!r}, got {actual!r}")


def _rootfs_update(context: ScenarioContext, version: str, slot: str) -> None:
    device = context.device
    marker = f"installed by payload {version}\n".encode()
    with context.step(f"build root filesystem payload {version}"):
        payload = context.rootfs_payload(version, {"etc/mbl-sim-payload": marker})
    with context.step(f"install {payload.name}, reboot into slot {slot}"):
        device.install(payload)
    with context.step(f"check slot {slot} runs version {version}"):
        context.expect("running slot", device.running_slot(), slot)
        context.expect("/etc/mbl-version", device.version(), version)
        context.expect(
            "/etc/mbl-sim-payload",
            device.check_output("cat /etc/mbl-sim-payload").encode(),
            marker,
        )
        status = device.status()
        context.expect("environment active_slot", status["active_slot"], slot)


def rootfs_a_b_a(context: ScenarioContext) -> None:
    """Root filesystem update from slot a to b, then a second one back to a."""
    device = context.device
    with context.step("check factory state: slot a"):
        context.expect("running slot", device.running_slot(), "a")
        context.expect(
            "/etc/mbl-version", device.version(), context.images.factory_version
        )
    _rootfs_update(context, "2.0.0", "b")
    _rootfs_update(context, "3.0.0", "a")


# Application scenarios use two small shell applications. Each must keep running for
# one second after it starts (App-Health-Window) for its start to count.
_APP_SCRIPT = (
    'echo "$MBL_APP_NAME $MBL_APP_VERSION started"; while :; do sleep 10; done'
)
_FAILING_SCRIPT = 'echo "$MBL_APP_NAME: cannot open /dev/sensor" >&2; exit 3'


def _shell_app(name: str, version: str, script: str = _APP_SCRIPT) -> ShellApp:
    return ShellApp(name, version, script, health_window=1.0, stop_timeout=2.0)


def _install_apps(
    context: ScenarioContext, apps: Sequence[ShellApp], failing: str | None = None
) -> None:
    """Build a payload of ``apps`` and install it; with ``failing``, expect the
    update to fail and the error to name that application."""
    device = context.device
    label = ", ".join(f"{app.name} {app.version}" for app in apps)
    with context.step(f"build application payload: {label}"):
        names = "-".join(f"{app.name}-{app.version}" for app in apps)
        output = device.workdir / "payloads" / f"{names}.tar"
        payload = build_shell_app_payload(apps, output)
    if failing is None:
        with context.step(f"install {label}"):
            result = device.install_apps(payload)
            context.expect(
                f"exit status of mbl-update install ({result.output})",
                result.exit_status,
                0,
            )
        return
    with context.step(f"install {label}: {failing} fails, the update is rolled back"):
        result = device.install_apps(payload)
        context.expect("mbl-update install fails", result.exit_status != 0, True)
        context.expect(
            f"error names app {failing}",
            f"app {failing}" in result.output and "failed to start" in result.output,
            True,
        )


def _check_apps(context: ScenarioContext, versions: dict[str, str]) -> None:
    label = ", ".join(f"{name} {version}" for name, version in versions.items())
    with context.step(f"check running: {label}"):
        apps = context.device.apps()
        for name, version in versions.items():
            app = apps.get(name, {})
            context.expect(f"version of app {name}", app.get("version"), version)
            context.expect(f"state of app {name}", app.get("state"), "running")


def apps_install(context: ScenarioContext) -> None:
    """Install two applications in one payload; both run."""
    _install_apps(context, [_shell_app("hello", "1.0.0"), _shell_app("world", "1.0.0")])
    _check_apps(context, {"hello": "1.0.0", "world": "1.0.0"})


def apps_upgrade(context: ScenarioContext) -> None:
    """Install two applications at 1.0.0, then upgrade both to 2.0.0 in one payload."""
    _install_apps(context, [_shell_app("hello", "1.0.0"), _shell_app("world", "1.0.0")])
    _install_apps(context, [_shell_app("hello", "2.0.0"), _shell_app("world", "2.0.0")])
    _check_apps(context, {"hello": "2.0.0", "world": "2.0.0"})


def apps_rollback(context: ScenarioContext) -> None:
    """Upgrade two applications; the second exits at start, so both return to 1.0.0."""
    _install_apps(context, [_shell_app("hello", "1.0.0"), _shell_app("world", "1.0.0")])
    broken = _shell_app("world", "2.0.0", _FAILING_SCRIPT)
    _install_apps(
        context, [_shell_app("hello", "2.0.0"), broken], failing="world 2.0.0"
    )
    _check_apps(context, {"hello": "1.0.0", "world": "1.0.0"})


SCENARIOS: dict[str, Callable[[ScenarioContext], None]] = {
    "rootfs-a-b-a": rootfs_a_b_a,
    "apps-install": apps_install,
    "apps-upgrade": apps_upgrade,
    "apps-rollback": apps_rollback,
}
DEFAULT_SCENARIOS = ("rootfs-a-b-a", "apps-install", "apps-upgrade", "apps-rollback")


def scenario_names() -> list[str]:
    return sorted(SCENARIOS)


def resolve(names: Sequence[str]) -> list[str]:
    """Return ``names`` checked against the known scenarios.

    Raises:
        ConfigError: an unknown name; the message lists the known ones.
    """
    for name in names:
        if name not in SCENARIOS:
            raise ConfigError(
                f"unknown scenario {name!r}; "
                f"known scenarios: {', '.join(scenario_names())}"
            )
    return list(names)


def run_scenario(
    name: str, images: DeviceImages, workdir: Path, report: Callable[[str], None]
) -> ScenarioResult:
    """Boot a fresh device in ``workdir`` and run scenario ``name`` on it."""
    result = ScenarioResult(name=name, passed=False, seconds=0.0, workdir=workdir)
    started = time.monotonic()
    report(f"scenario {name}: {SCENARIOS[name].__doc__ or ''}".rstrip())
    try:
        with Device(images, workdir, name=name) as device:
            context = ScenarioContext(device, images, report, result)
            with context.step("power on, boot to shell"):
                device.power_on()
            SCENARIOS[name](context)
        result.passed = True
    except (MblSimError, OSError) as error:
        result.error = f"{type(error).__name__}: {error}"
        log.debug("scenario %s failed:\n%s", name, traceback.format_exc())
    result.seconds = time.monotonic() - started
    return result
