"""Tests for application updates on the host: real supervisor script, real short-lived
processes, temporary directories in place of /home/app, /run and /var/log."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mbl_sim.ipk import ShellApp, build_shell_app_payload
from updater import app_install
from updater import supervisor as supervisor_module
from updater.app_install import install_apps
from updater.apps import (
    AppPaths,
    collect_garbage,
    current_release,
    list_apps,
    start_apps,
    stop_apps,
)
from updater.cli import apps_to_json, format_apps, main
from updater.errors import AppError, PackageError
from updater.opkg_status import InstalledPackage, load_status
from updater.payload import Payload, classify_payload
from updater.supervisor import RUNNING, STOPPED, Supervisor, SupervisorPaths

SCRIPT = (
    Path(__file__).resolve().parents[2]
    / "images/rootfs/usr/lib/mbl-update/supervise-app"
)
WINDOW = 0.05
LOOP = "while :; do sleep 1; done"


def app(name: str, version: str, script: str = LOOP, **options: object) -> ShellApp:
    options.setdefault("health_window", WINDOW)
    options.setdefault("stop_timeout", 2)
    return ShellApp(name, version, script, **options)  # type: ignore[arg-type]


@dataclass
class Host:
    """Stand-in for a device: application paths under a temporary directory."""

    directory: Path
    paths: AppPaths
    supervisor: Supervisor
    report: list[str] = field(default_factory=list)
    payloads: int = 0

    def payload(self, *apps: ShellApp) -> Payload:
        self.payloads += 1
        path = self.directory / "payloads" / f"payload-{self.payloads}.tar"
        return classify_payload(build_shell_app_payload(apps, path))

    def install(self, *apps: ShellApp, **options: object) -> list[InstalledPackage]:
        self.report.clear()
        return install_apps(
            self.payload(*apps),
            self.paths,
            supervisor=self.supervisor,
            machine="aarch64",
            system_databases=options.pop("system_databases", ()),  # type: ignore[arg-type]
            report=self.report.append,
        )

    def versions(self) -> dict[str, str]:
        packages = load_status(self.paths.database).packages
        return {name: str(p.version) for name, p in packages.items()}

    def state(self, name: str) -> str:
        return self.supervisor.state(name).state

    def pid(self, name: str) -> int:
        pid = self.supervisor.state(name).pid
        assert pid is not None, f"{name} is not running"
        return pid

    def files(self) -> dict[str, float]:
        """Every path below the applications root, with the modification time of
        each file. Directories map to 0, because staging and removing a release
        changes the modification time of its parent."""
        found = {}
        for directory, dirnames, filenames in os.walk(self.paths.root):
            for name in dirnames:
                found[
                    os.path.relpath(os.path.join(directory, name), self.paths.root)
                ] = 0.0
            for name in filenames:
                path = os.path.join(directory, name)
                found[os.path.relpath(path, self.paths.root)] = os.lstat(path).st_mtime
        return found

    def power_cut(self) -> None:
        """Kill every supervisor and application at once and empty /run."""
        for name in os.listdir(self.paths.supervisor.run_dir):
            self.supervisor.stop(name, 0)
        self.supervisor = Supervisor(self.paths.supervisor)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    paths = AppPaths(
        root=str(tmp_path / "home" / "app"),
        supervisor=SupervisorPaths(
            script=str(SCRIPT),
            run_dir=str(tmp_path / "run"),
            log_dir=str(tmp_path / "log"),
        ),
    )
    os.makedirs(paths.supervisor.run_dir)
    machine = Host(tmp_path, paths, Supervisor(paths.supervisor))
    yield machine
    for name in os.listdir(paths.supervisor.run_dir):
        machine.supervisor.stop(name, 0)


# -- install, upgrade, downgrade ------------------------------------------------------


def test_install_two_apps(host: Host) -> None:
    script = f'echo "$MBL_APP_NAME $MBL_APP_VERSION $PWD" > env.txt; {LOOP}'
    installed = host.install(app("hello", "1.0.0", script), app("world", "1.0.0"))
    assert [str(p.version) for p in installed] == ["1.0.0", "1.0.0"]
    assert host.versions() == {"hello": "1.0.0", "world": "1.0.0"}
    assert host.state("hello") == RUNNING
    assert host.state("world") == RUNNING
    root = Path(host.paths.root)
    assert os.readlink(root / "hello" / "current") == "1.0.0"
    data = root / "hello" / "1.0.0" / "data"
    assert (data / "env.txt").read_text() == f"hello 1.0.0 {data}\n"
    assert "App-Exec: bin/hello" in (root / "hello" / "1.0.0" / "control").read_text()
    assert sorted(os.listdir(root)) == [".opkg", "hello", "world"]
    assert sorted(os.listdir(root / ".opkg")) == ["status"]
    assert host.report[-1] == "installed hello 1.0.0, world 1.0.0; all running"


def test_upgrade_replaces_running_version(host: Host) -> None:
    host.install(app("hello", "1.0.0"), app("world", "1.0.0"))
    old_pid = host.pid("hello")
    host.install(app("hello", "2.0.0"), app("world", "2.0.0"))
    assert host.versions() == {"hello": "2.0.0", "world": "2.0.0"}
    assert host.pid("hello") != old_pid
    assert not supervisor_module._alive(old_pid)
    root = Path(host.paths.root)
    assert sorted(os.listdir(root / "hello")) == ["2.0.0", "current"]
    assert "hello: 1.0.0 stopped by SIGTERM" in "\n".join(host.report)


def test_downgrade(host: Host) -> None:
    host.install(app("hello", "2.0.0"))
    host.install(app("hello", "1.5.0"))
    assert host.versions() == {"hello": "1.5.0"}
    assert current_release(host.paths, "hello") == "1.5.0"
    assert host.state("hello") == RUNNING


def test_reinstall_same_version(host: Host) -> None:
    host.install(app("hello", "1.0.0"))
    host.install(app("hello", "1.0.0", files={"extra": b"x"}))
    assert current_release(host.paths, "hello") == "1.0.0_2"
    assert sorted(os.listdir(Path(host.paths.root) / "hello")) == ["1.0.0_2", "current"]
    assert host.state("hello") == RUNNING


def test_dependencies_start_first(host: Host) -> None:
    host.install(app("world", "1.0.0", depends="hello (>= 1.0)"), app("hello", "1.0.0"))
    started = [line for line in host.report if ": started" in line]
    assert started[0].startswith("hello: started 1.0.0")
    assert started[1].startswith("world: started 1.0.0")


def test_sigterm_ignored_then_killed(host: Host) -> None:
    stubborn = f"trap '' TERM; {LOOP}"
    host.install(app("hello", "1.0.0", stubborn, stop_timeout=0.5))
    started = time.monotonic()
    host.install(app("hello", "2.0.0"))
    assert time.monotonic() - started >= 0.5
    assert "hello: 1.0.0 killed by SIGKILL after its 0.5 s stop timeout" in host.report
    assert host.state("hello") == RUNNING


# -- all or nothing -------------------------------------------------------------------


def test_second_app_fails_both_roll_back(host: Host) -> None:
    host.install(app("hello", "1.0.0"), app("world", "1.0.0"))
    database = Path(host.paths.database).read_bytes()
    with pytest.raises(AppError) as caught:
        host.install(
            app("hello", "2.0.0"),
            app("world", "2.0.0", "echo cannot open device >&2; exit 3"),
        )
    message = str(caught.value)
    assert message.startswith("app world 2.0.0 failed to start: exited with status 3")
    assert "cannot open device" in message
    assert "rolled back every app of the payload: hello to 1.0.0, world to 1.0.0" in (
        message
    )
    assert host.versions() == {"hello": "1.0.0", "world": "1.0.0"}
    assert Path(host.paths.database).read_bytes() == database
    for name in ("hello", "world"):
        assert host.state(name) == RUNNING
        assert current_release(host.paths, name) == "1.0.0"
        assert sorted(os.listdir(Path(host.paths.root) / name)) == ["1.0.0", "current"]
    assert not os.path.exists(host.paths.journal)


def test_app_dying_within_health_window(host: Host) -> None:
    host.install(app("hello", "1.0.0"))
    with pytest.raises(AppError, match=r"app hello 2\.0\.0 failed to start: exited"):
        host.install(app("hello", "2.0.0", "sleep 0.1; exit 1", health_window=1))
    assert host.versions() == {"hello": "1.0.0"}
    assert host.state("hello") == RUNNING


def test_failed_first_install_leaves_nothing(host: Host) -> None:
    host.install(app("hello", "1.0.0"))
    before = host.files()
    with pytest.raises(AppError, match=r"world 1\.0\.0 failed to start"):
        host.install(app("hello", "1.1.0"), app("world", "1.0.0", "exit 1"))
    assert host.versions() == {"hello": "1.0.0"}
    assert set(host.files()) == set(before)
    assert host.state("world") == STOPPED


def test_staging_failure_touches_nothing(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.install(app("hello", "1.0.0"), app("world", "1.0.0"))
    pids = (host.pid("hello"), host.pid("world"))
    before = host.files()
    calls = []
    real_extract = app_install.IpkPackage.extract_data

    def extract(package: app_install.IpkPackage, target: str) -> int:
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_extract(package, target)

    monkeypatch.setattr(app_install.IpkPackage, "extract_data", extract)
    with pytest.raises(AppError, match=r"staging failed: .*No space left on device"):
        host.install(app("hello", "2.0.0"), app("world", "2.0.0"))
    assert host.files() == before
    assert (host.pid("hello"), host.pid("world")) == pids


# -- checks before anything changes ---------------------------------------------------


def test_missing_dependency_rejected(host: Host) -> None:
    with pytest.raises(PackageError) as caught:
        host.install(app("world", "1.0.0", depends="libfoo (>= 2), hello"))
    assert str(caught.value) == (
        "world_1.0.0_all.ipk: package world 1.0.0 depends on libfoo (>= 2), which"
        " neither the payload nor the device provides; nothing was changed"
    )
    assert not os.path.exists(host.paths.root)


def test_dependency_version_reported(host: Host) -> None:
    host.install(app("libfoo", "1.0"))
    with pytest.raises(PackageError, match=r"\(available: libfoo 1.0\)"):
        host.install(app("world", "1.0.0", depends="libfoo (>= 2)"))


def test_dependencies_from_payload_device_and_system(
    host: Host, tmp_path: Path
) -> None:
    system = tmp_path / "system-status"
    system.write_text(
        "Package: busybox\nVersion: 1.35.0\nStatus: install ok installed\n"
    )
    host.install(app("libbar", "1.0", fields={"Provides": "virtual-bar"}))
    host.install(
        app("world", "1.0", depends="busybox (>= 1.30), libfoo | libbaz, virtual-bar"),
        app("libbaz", "3.0"),
        system_databases=(str(system),),
    )
    assert host.versions() == {"libbar": "1.0", "libbaz": "3.0", "world": "1.0"}


def test_update_breaking_installed_app_rejected(host: Host) -> None:
    host.install(app("libfoo", "2.0"), app("world", "1.0", depends="libfoo (>= 2)"))
    with pytest.raises(PackageError, match=r"would break installed app world 1\.0"):
        host.install(app("libfoo", "1.0"))
    assert host.versions() == {"libfoo": "2.0", "world": "1.0"}


@pytest.mark.parametrize("architecture", ["arm64", "aarch64", "all", "noarch"])
def test_architecture_accepted(host: Host, architecture: str) -> None:
    host.install(app("hello", "1.0", architecture=architecture))
    assert host.versions() == {"hello": "1.0"}


def test_wrong_architecture_rejected(host: Host) -> None:
    with pytest.raises(PackageError) as caught:
        host.install(app("hello", "1.0", architecture="armhf"))
    assert "package hello 1.0 is built for architecture armhf" in str(caught.value)
    assert "runs arm64, aarch64, all, noarch" in str(caught.value)


def test_same_package_twice_rejected(host: Host) -> None:
    with pytest.raises(PackageError, match="contains package hello twice"):
        host.install(app("hello", "1.0"), app("hello", "2.0"))


def test_not_enough_space_rejected(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.install(app("hello", "1.0.0"))
    pid = host.pid("hello")
    before = host.files()
    real_statvfs = app_install._statvfs

    class Small:
        def __init__(self, real: os.statvfs_result) -> None:
            self.f_frsize = 1024
            self.f_bavail = 100
            self.f_favail = real.f_favail

    monkeypatch.setattr(app_install, "_statvfs", lambda path: Small(real_statvfs(path)))
    big = {"share/big.bin": os.urandom(200 * 1024)}
    with pytest.raises(PackageError) as caught:
        host.install(app("hello", "2.0.0", files=big))
    message = str(caught.value)
    assert "not enough free space" in message
    assert "for package hello 2.0.0 (hello_2.0.0_all.ipk)" in message
    assert "only 102400 bytes are free" in message
    assert "it needs 2" in message
    assert host.files() == before
    assert host.pid("hello") == pid


# -- power cuts and recovery ----------------------------------------------------------


class PowerCut(BaseException):
    """Stands for the moment power is lost: nothing after it runs."""


def cut_at(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    def cut(*args: object, **kwargs: object) -> None:
        raise PowerCut(name)

    monkeypatch.setattr(target, name, cut)


CUT_POINTS = {
    # Where the cut happens, and which version every app runs after the reboot.
    "while staging": ("_stage_one_second", "1.0.0"),
    "after the journal": ("_switch", "1.0.0"),
    "after one app switched": ("_start_second", "1.0.0"),
    "after the database": ("remove_durably", "1.0.0"),
    "after the commit": ("_remove_previous_releases", "2.0.0"),
}


@pytest.mark.parametrize("point", sorted(CUT_POINTS))
def test_power_cut_leaves_old_or_new(
    host: Host, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    host.install(app("hello", "1.0.0"), app("world", "1.0.0"))
    transaction = app_install._Transaction
    # A cut runs no cleanup, so the cleanup paths must not run either.
    monkeypatch.setattr(transaction, "_undo", lambda self: [])
    monkeypatch.setattr(transaction, "_remove_new_releases", lambda self: None)
    target, expected = CUT_POINTS[point]
    if target == "_stage_one_second":
        real = transaction._stage_one

        def stage(self: app_install._Transaction, change: app_install._Change) -> None:
            if change.name == "world":
                raise PowerCut(point)
            real(self, change)

        monkeypatch.setattr(transaction, "_stage_one", stage)
    elif target == "_start_second":
        real_start = app_install.start_release

        def start(paths: AppPaths, supervisor: Supervisor, name: str, release: str):  # type: ignore[no-untyped-def]
            if name == "world":
                raise PowerCut(point)
            return real_start(paths, supervisor, name, release)

        monkeypatch.setattr(app_install, "start_release", start)
    elif target == "remove_durably":
        cut_at(monkeypatch, app_install, "remove_durably")
    else:
        cut_at(monkeypatch, transaction, target)

    with pytest.raises(PowerCut):
        host.install(app("hello", "2.0.0"), app("world", "2.0.0"))
    host.power_cut()
    monkeypatch.undo()

    start_apps(host.paths, host.supervisor, wait=True)
    assert host.versions() == {"hello": expected, "world": expected}
    for name in ("hello", "world"):
        assert current_release(host.paths, name) == expected
        assert host.state(name) == RUNNING
        assert sorted(os.listdir(Path(host.paths.root) / name)) == [expected, "current"]
    assert not os.path.exists(host.paths.journal)


def test_interrupted_first_install_removed_at_boot(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.install(app("hello", "1.0.0"))
    monkeypatch.setattr(app_install._Transaction, "_undo", lambda self: [])
    cut_at(monkeypatch, app_install, "wait_healthy")
    with pytest.raises(PowerCut):
        host.install(app("hello", "1.1.0"), app("world", "1.0.0"))
    host.power_cut()
    monkeypatch.undo()
    start_apps(host.paths, host.supervisor)
    assert host.versions() == {"hello": "1.0.0"}
    assert sorted(os.listdir(host.paths.root)) == [".opkg", "hello"]


def test_garbage_collected(host: Host) -> None:
    host.install(app("hello", "1.0.0"))
    root = Path(host.paths.root)
    (root / "hello" / "0.9.0" / "data").mkdir(parents=True)
    (root / "hello" / ".current.tmp").symlink_to("0.9.0")
    (root / "orphan" / "1.0" / "data").mkdir(parents=True)
    collect_garbage(host.paths)
    assert sorted(os.listdir(root)) == [".opkg", "hello"]
    assert sorted(os.listdir(root / "hello")) == ["1.0.0", "current"]


def test_invalid_journal_moved_aside(host: Host) -> None:
    host.install(app("hello", "1.0.0"))
    Path(host.paths.journal).write_text("{not json")
    host.install(app("hello", "2.0.0"))
    assert host.versions() == {"hello": "2.0.0"}
    assert os.path.exists(host.paths.journal + ".invalid")


# -- start, stop, status --------------------------------------------------------------


def test_start_and_stop_apps(host: Host) -> None:
    host.install(app("hello", "1.0.0"), app("world", "1.0.0"))
    lines = stop_apps(host.paths, host.supervisor, ["world"])
    assert len(lines) == 1
    assert lines[0].startswith("app world stopped by SIGTERM in ")
    assert host.state("world") == STOPPED
    assert host.state("hello") == RUNNING
    lines = start_apps(host.paths, host.supervisor)
    assert lines[0] == "app hello is already running"
    assert lines[1].startswith("app world 1.0.0 started (pid ")
    with pytest.raises(AppError, match="app nothing is not installed"):
        stop_apps(host.paths, host.supervisor, ["nothing"])


def test_start_reports_broken_app(host: Host) -> None:
    host.install(app("hello", "1.0.0"), app("world", "1.0.0"))
    stop_apps(host.paths, host.supervisor)
    control = Path(host.paths.root) / "world" / "1.0.0" / "control"
    control.write_text(control.read_text().replace("App-Exec", "X-Exec"))
    with pytest.raises(AppError, match="App-Exec is missing"):
        start_apps(host.paths, host.supervisor)
    assert host.state("hello") == RUNNING


def test_crashing_app_is_restarted(host: Host) -> None:
    counter = "echo x >> starts.txt; sleep 0.2; exit 1"
    host.install(app("hello", "1.0.0", f"{LOOP}"))
    stop_apps(host.paths, host.supervisor)
    data = Path(host.paths.root) / "hello" / "1.0.0" / "data"
    (data / "bin" / "hello").write_text(f"#!/bin/sh\n{counter}\n")
    start_apps(host.paths, host.supervisor, wait=False)
    time.sleep(1.6)
    assert (data / "starts.txt").read_text().count("x") >= 2


def test_status_lists_apps_and_broken_stanza(host: Host) -> None:
    host.install(app("hello", "1.0.0"), app("world", "1.0.0"))
    stop_apps(host.paths, host.supervisor, ["world"])
    with open(host.paths.database, "a") as file:
        file.write("\nPackage:\n")
    listing = list_apps(host.paths, host.supervisor)
    document = apps_to_json(listing, None)
    assert [(a["name"], a["version"], a["state"]) for a in document["apps"]] == [
        ("hello", "1.0.0", "running"),
        ("world", "1.0.0", "stopped"),
    ]
    assert document["apps"][0]["pid"] == host.pid("hello")
    line = len(Path(host.paths.database).read_text().splitlines())
    assert document["app_database_issues"] == [
        {
            "line": line,
            "message": f"line {line}: field Package is empty; stanza ignored",
        }
    ]
    text = format_apps(listing, None).splitlines()
    assert text[1] == f"  hello 1.0.0 running (pid {host.pid('hello')})"
    assert text[2] == "  world 1.0.0 stopped"
    assert text[3] == "app database issues:"


def test_cli_app_commands(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    host.install(app("hello", "1.0.0"))
    assert main(["app", "stop"], app_paths=host.paths) == 0
    assert capsys.readouterr().out.startswith("mbl-update: app hello stopped by")
    assert main(["app", "start", "--no-wait", "hello"], app_paths=host.paths) == 0
    assert capsys.readouterr().out.startswith("mbl-update: app hello 1.0.0 started")
    assert main(["app", "start", "nothing"], app_paths=host.paths) == 1
    assert "app nothing is not installed" in capsys.readouterr().err


def test_cli_install_app_payload(
    host: Host, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "device.json"
    config.write_text(
        json.dumps(
            {
                "board": "test",
                "slots": {"a": "/dev/vdz2", "b": "/dev/vdz3"},
                "scratch_dir": str(tmp_path),
                "fw_env_config": str(tmp_path / "fw_env.config"),
                "bootlimit": 3,
            }
        )
    )
    payload = host.payload(app("hello", "1.0.0", architecture="all"))
    argv = ["--config", str(config), "install", payload.path]
    assert main(argv, app_paths=host.paths) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mbl-update: checked 1 packages: hello 1.0.0"
    assert lines[-1] == "mbl-update: installed hello 1.0.0; all running"


def test_unsupervised_process_is_stopped(host: Host) -> None:
    host.install(app("hello", "1.0.0"))
    state = host.supervisor.state("hello")
    assert state.supervisor_pid is not None
    os.kill(state.supervisor_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while host.state("hello") != "unsupervised" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.state("hello") == "unsupervised"
    assert "stopped by SIGTERM" in host.supervisor.stop("hello", 1)
    assert host.state("hello") == STOPPED
