"""pytest plugin: boards, built images, devices and payloads as fixtures.

Options:
    --board NAME_OR_PATH   board to run on; repeat to run every board-using test on each
                           (default qemu-virt-a53)
    --keep-devices WHICH   keep each test's device directory (overlays, console
                           transcript, QEMU stderr): all, failed (default) or none
    --devices-dir DIR      where device directories go (default: pytest's basetemp)

Fixtures:
    board          the Board of the current parametrisation
    device_images  the built images of ``board`` (built once, shared by workers)
    device         a Device booted to its shell, powered off after the test
    device_factory make more devices, or devices left powered off
    rootfs_payload build (or reuse) a root filesystem payload with a change
    app_payload    build an application payload from ``ShellApp`` packages

Markers:
    qemu                  the test boots QEMU; skipped, with the reason, when the
                          host lacks QEMU or the board's firmware
    needs(CAPABILITY, …)  the test runs only on boards with every named capability
                          (see ``BOARD_CAPABILITIES``) and is skipped on the others
                          with a reason naming the board and the capability it lacks
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mbl_sim.board import DEFAULT_BOARD, Board, check_host, load_board
from mbl_sim.device import Device
from mbl_sim.errors import ConfigError, MblSimError
from mbl_sim.images.cache import default_cache_dir
from mbl_sim.images.recipe import DeviceImages, ImageBuilder
from mbl_sim.ipk import IpkFormat, ShellApp, build_shell_app_payload
from mbl_sim.payloads import RootfsChange, cached_rootfs_payload

_FAILED_KEY = pytest.StashKey[bool]()
_BOARDS_KEY = pytest.StashKey[list[Board]]()

BOARD_CAPABILITIES: dict[str, str] = {
    "u-boot": "U-Boot runs the boot script (firmware kind u-boot)",
    "u-boot-env": "the boot state is the redundant U-Boot environment on the disk "
    "(boot state u-boot-env)",
    "flag-files": "the initramfs keeps the boot state in flag files on the bootflags "
    "partition (boot state flag-files)",
}
"""Capabilities that ``@pytest.mark.needs`` accepts, with what each means."""


def board_lacks(board: Board, capability: str) -> str | None:
    """Return why ``board`` lacks ``capability``, or None when it has it.

    Raises:
        ValueError: ``capability`` is not in `BOARD_CAPABILITIES`.
    """
    if capability not in BOARD_CAPABILITIES:
        known = ", ".join(BOARD_CAPABILITIES)
        raise ValueError(
            f"unknown board capability {capability!r}; expected one of: {known}"
        )
    if capability == "u-boot":
        if board.firmware.is_u_boot:
            return None
        return f"its firmware kind is {board.firmware.kind!r}"
    if board.boot.state == capability:
        return None
    return f"its boot state is {board.boot.state!r}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mbl-sim")
    group.addoption(
        "--board",
        action="append",
        default=None,
        metavar="NAME_OR_PATH",
        help="board to run device tests on; repeat for several "
        f"(default {DEFAULT_BOARD})",
    )
    group.addoption(
        "--keep-devices",
        choices=("all", "failed", "none"),
        default="failed",
        help="keep each test's device directory: all, failed (default) or none",
    )
    group.addoption(
        "--devices-dir",
        default=None,
        metavar="DIR",
        help="directory for device directories (default: pytest's basetemp)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_BOARDS_KEY] = _load_boards(config)
    config.addinivalue_line("markers", "qemu: boots real QEMU guests (integration)")
    capabilities = ", ".join(BOARD_CAPABILITIES)
    config.addinivalue_line(
        "markers",
        "needs(*capabilities): run only on boards with every named capability "
        f"({capabilities}); skipped on other boards",
    )


def _load_boards(config: pytest.Config) -> list[Board]:
    """Load the boards of ``--board``, or the default board.

    Raises:
        pytest.UsageError: a board is unknown or invalid, or two options name boards
            of the same name, whose test ids would clash.
    """
    names = config.getoption("--board") or [DEFAULT_BOARD]
    boards: dict[str, Board] = {}
    for name in names:
        try:
            board = load_board(name)
        except ConfigError as error:
            raise pytest.UsageError(f"--board {name}: {error}") from error
        if board.name in boards:
            raise pytest.UsageError(
                f"--board {name}: board {board.name!r} is already selected (from "
                f"{boards[board.name].source}); give each board once"
            )
        boards[board.name] = board
    return list(boards.values())


def _boards(config: pytest.Config) -> list[Board]:
    return config.stash[_BOARDS_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "board" in metafunc.fixturenames:
        boards = _boards(metafunc.config)
        metafunc.parametrize(
            "board", boards, ids=[b.name for b in boards], scope="session"
        )


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Skip ``qemu`` tests of a board whose host programs or firmware are missing."""
    missing: dict[str, str] = {}
    for board in _boards(config):
        try:
            check_host(board)
        except ConfigError as error:
            missing[board.name] = str(error)
    for item in items:
        if item.get_closest_marker("qemu") is None:
            continue
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("board") if callspec else None
        names = [param.name] if isinstance(param, Board) else list(missing)
        for name in names:
            if name in missing:
                reason = f"host cannot run board {name}: {missing[name]}"
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test marked ``needs`` on a board that lacks a named capability.

    This runs before the fixtures, so a skipped test builds and boots nothing. A
    ``needs`` marker without capabilities, with an unknown one, or on a test that
    does not use the ``board`` fixture fails the test.
    """
    markers = list(item.iter_markers("needs"))
    if not markers:
        return
    callspec = getattr(item, "callspec", None)
    board = callspec.params.get("board") if callspec else None
    if not isinstance(board, Board):
        pytest.fail(
            "@pytest.mark.needs applies only to tests that use the board fixture "
            "(directly or through device, device_images …)",
            pytrace=False,
        )
    for marker in markers:
        names_only = all(isinstance(arg, str) for arg in marker.args)
        if not marker.args or marker.kwargs or not names_only:
            pytest.fail(
                "@pytest.mark.needs takes one or more capability names as "
                f"positional arguments, got {marker.args!r} {marker.kwargs!r}",
                pytrace=False,
            )
        for capability in marker.args:
            try:
                reason = board_lacks(board, capability)
            except ValueError as error:
                pytest.fail(f"@pytest.mark.needs: {error}", pytrace=False)
            if reason is not None:
                pytest.skip(f"board {board.name} lacks {capability!r}: {reason}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        item.stash[_FAILED_KEY] = True
    return report


@pytest.fixture(scope="session")
def device_images(board: Board) -> DeviceImages:
    """Build (or reuse) the images of ``board``."""
    return ImageBuilder(board).build()


def _device_root(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    option = request.config.getoption("--devices-dir")
    root = Path(option) if option else tmp_path_factory.getbasetemp() / "devices"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
    return root / name


@pytest.fixture
def device_factory(
    request: pytest.FixtureRequest,
    device_images: DeviceImages,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Device]]:
    """Return ``make(name="device", power_on=True) -> Device``; every device made is
    powered off after the test, and its directory kept as --keep-devices selects."""
    root = _device_root(request, tmp_path_factory)
    made: list[Device] = []

    def make(name: str = "device", *, power_on: bool = True) -> Device:
        device = Device(device_images, root / name, name=name)
        made.append(device)
        if power_on:
            device.power_on()
        return device

    try:
        yield make
    finally:
        for device in made:
            try:
                device.close()
            except MblSimError as error:
                request.node.warn(
                    pytest.PytestWarning(f"closing {device.name}: {error}")
                )
        failed = request.node.stash.get(_FAILED_KEY, False)
        keep = request.config.getoption("--keep-devices")
        if keep == "none" or (keep == "failed" and not failed):
            shutil.rmtree(root, ignore_errors=True)
        elif made:
            for device in made:
                request.node.add_report_section(
                    "teardown", f"device {device.name}", f"kept in {device.workdir}"
                )


@pytest.fixture
def device(device_factory: Callable[..., Device]) -> Device:
    """Boot a device to its shell on the factory slot and return it."""
    return device_factory()


@pytest.fixture
def rootfs_payload(device_images: DeviceImages) -> Callable[..., Path]:
    """Return ``build(version=None, files=None, remove=(), modes=None) -> Path``: a
    root filesystem payload of the device's own root filesystem with those changes."""

    def build(
        version: str | None = None,
        files: dict[str, bytes] | None = None,
        remove: tuple[str, ...] = (),
        modes: dict[str, int] | None = None,
    ) -> Path:
        change = RootfsChange(
            version=version, files=files or {}, modes=modes or {}, remove=remove
        )
        return cached_rootfs_payload(device_images.rootfs, default_cache_dir(), change)

    return build


@pytest.fixture
def app_payload(tmp_path: Path) -> Callable[..., Path]:
    """Return ``build(*apps, package_format=None) -> Path``: an application payload
    of the `mbl_sim.ipk.ShellApp` packages ``apps``, in the test's directory."""
    count = 0

    def build(*apps: ShellApp, package_format: IpkFormat | None = None) -> Path:
        nonlocal count
        count += 1
        output = tmp_path / "app-payloads" / f"apps-{count}.tar"
        return build_shell_app_payload(apps, output, package_format)

    return build
