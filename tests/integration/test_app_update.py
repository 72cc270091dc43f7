"""Application updates on a booted device: install, upgrade, downgrade, the rollback
of a payload whose second application fails, stopping an application that ignores
SIGTERM, applications after a reboot and after a power cut in the middle of an
update."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mbl_sim.device import Device
from mbl_sim.ipk import ShellApp

pytestmark = pytest.mark.qemu

AppPayload = Callable[..., Path]

LOOP = 'echo "$MBL_APP_NAME $MBL_APP_VERSION started"; while :; do sleep 10; done'


def shell_app(
    name: str, version: str, script: str = LOOP, **options: object
) -> ShellApp:
    options.setdefault("health_window", 1.0)
    options.setdefault("stop_timeout", 2.0)
    return ShellApp(name, version, script, **options)  # type: ignore[arg-type]


def install(device: Device, payload: Path) -> str:
    result = device.install_apps(payload)
    assert result.exit_status == 0, result.output
    return result.output


def releases(device: Device, name: str) -> list[str]:
    return device.check_output(f"ls -A /home/app/{name}").split()


def process_alive(device: Device, pid: int) -> bool:
    # A zombie counts as gone: its /proc/PID/stat state is Z.
    result = device.run(f"grep -q '^{pid} ([^)]*) [^Z]' /proc/{pid}/stat")
    return result.exit_status == 0


def test_install_upgrade_downgrade(device: Device, app_payload: AppPayload) -> None:
    output = install(device, app_payload(shell_app("hello", "1.0.0")))
    assert "mbl-update: installed hello 1.0.0; all running" in output
    first = device.apps()["hello"]
    assert first["version"] == "1.0.0"
    assert first["state"] == "running"
    assert first["architecture"] == "all"
    assert releases(device, "hello") == ["1.0.0", "current"]
    assert device.check_output("readlink /home/app/hello/current").strip() == "1.0.0"
    log = device.check_output("cat /var/log/apps/hello.log")
    assert "hello 1.0.0 started" in log
    database = device.check_output("cat /home/app/.opkg/status")
    assert "Package: hello\nVersion: 1.0.0\n" in database
    assert "Status: install ok installed\n" in database

    output = install(device, app_payload(shell_app("hello", "2.0.0")))
    assert "hello: 1.0.0 stopped by SIGTERM" in output
    upgraded = device.apps()["hello"]
    assert upgraded["version"] == "2.0.0"
    assert upgraded["state"] == "running"
    assert upgraded["pid"] != first["pid"]
    assert not process_alive(device, first["pid"])
    assert releases(device, "hello") == ["2.0.0", "current"]

    install(device, app_payload(shell_app("hello", "1.5.0")))
    assert device.app_version("hello") == "1.5.0"
    assert device.app_state("hello") == "running"
    assert releases(device, "hello") == ["1.5.0", "current"]


def test_second_app_fails_both_roll_back(
    device: Device, app_payload: AppPayload
) -> None:
    install(
        device, app_payload(shell_app("hello", "1.0.0"), shell_app("world", "1.0.0"))
    )
    database = device.check_output("sha256sum /home/app/.opkg/status")
    failing = "echo 'world: cannot open /dev/sensor' >&2; exit 3"
    payload = app_payload(
        shell_app("hello", "2.0.0"), shell_app("world", "2.0.0", failing)
    )

    result = device.install_apps(payload)

    assert result.exit_status == 1
    assert (
        "mbl-update: error: app world 2.0.0 failed to start: exited with status 3"
        in (result.output)
    )
    assert "world: cannot open /dev/sensor" in result.output
    assert "rolled back every app of the payload: hello to 1.0.0, world to 1.0.0" in (
        result.output
    )
    apps = device.apps()
    for name in ("hello", "world"):
        assert apps[name]["version"] == "1.0.0"
        assert apps[name]["state"] == "running"
        assert releases(device, name) == ["1.0.0", "current"]
    assert device.check_output("sha256sum /home/app/.opkg/status") == database
    assert device.run("test -e /home/app/.opkg/transaction.json").exit_status == 1


def test_app_ignoring_sigterm_is_killed(
    device: Device, app_payload: AppPayload
) -> None:
    stubborn = "trap 'echo ignoring SIGTERM' TERM; while :; do sleep 1; done"
    install(device, app_payload(shell_app("hello", "1.0.0", stubborn, stop_timeout=2)))
    old_pid = device.apps()["hello"]["pid"]

    started = time.monotonic()
    output = install(device, app_payload(shell_app("hello", "2.0.0")))

    assert time.monotonic() - started >= 2
    assert "hello: 1.0.0 killed by SIGKILL after its 2 s stop timeout" in output
    assert "ignoring SIGTERM" in device.check_output("cat /var/log/apps/hello.log")
    assert not process_alive(device, old_pid)
    assert device.app_state("hello") == "running"


def test_apps_start_again_after_reboot(device: Device, app_payload: AppPayload) -> None:
    install(
        device, app_payload(shell_app("hello", "1.0.0"), shell_app("world", "1.0.0"))
    )

    device.reboot()

    apps = device.apps()
    for name in ("hello", "world"):
        assert apps[name]["version"] == "1.0.0"
        assert apps[name]["state"] == "running"
        # /var/log survives the reboot: one line from each boot's start.
        log = device.check_output(f"cat /var/log/apps/{name}.log")
        assert log.count(f"{name} 1.0.0 started") == 2
    assert device.check_output("ls /run/mbl-apps").split() == ["hello", "world"]


def test_power_cut_during_update_keeps_old_versions(
    device: Device, app_payload: AppPayload
) -> None:
    install(
        device, app_payload(shell_app("hello", "1.0.0"), shell_app("world", "1.0.0"))
    )
    # A long health window keeps the update open after both new versions started.
    new = [shell_app(name, "2.0.0", health_window=30) for name in ("hello", "world")]
    on_device = device.deliver(app_payload(*new))
    device.run(f"mbl-update install {on_device} > /tmp/install.log 2>&1 &", check=True)
    deadline = time.monotonic() + 60
    while "world: started 2.0.0" not in device.check_output("cat /tmp/install.log"):
        assert time.monotonic() < deadline, device.check_output("cat /tmp/install.log")
        time.sleep(0.5)
    assert device.run("test -e /home/app/.opkg/transaction.json").exit_status == 0

    device.power_cut()
    device.power_on()

    apps = device.apps()
    for name in ("hello", "world"):
        assert apps[name]["version"] == "1.0.0"
        assert apps[name]["state"] == "running"
        assert releases(device, name) == ["1.0.0", "current"]
    assert device.run("test -e /home/app/.opkg/transaction.json").exit_status == 1
