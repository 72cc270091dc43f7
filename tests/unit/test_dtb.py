"""Device trees: node checks and direct-boot patches on the boards' real trees.

The trees come from the Debian kernel packages, as the image build copies them into
the build cache (``mbl-sim images build --board NAME``), and, for virt, from QEMU's
dumpdtb. A test skips,
naming the command that fetches its tree, when the cache or QEMU lacks it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mbl_sim import dtb
from mbl_sim.board import Board, load_board
from mbl_sim.dtb import DeviceTreeError, DirectBootPatch
from mbl_sim.images.cache import default_cache_dir

PACKAGE_TREES = ["imx6ul-evk", "imx7-warp", "rpi3"]


def package_tree(board: Board) -> Path:
    """Return the board's .dtb as the image build copied it from the kernel
    package (``steps/devicetree-*/source.dtb`` in the cache), or skip."""
    steps = default_cache_dir() / "steps"
    for summary in sorted(steps.glob("devicetree-*/summary.json")):
        if json.loads(summary.read_text()).get("source") == board.device_tree.file:
            return summary.parent / "source.dtb"
    pytest.skip(
        f"{board.device_tree.file} is not in the build cache; run "
        f"`mbl-sim images build --board {board.name}` first"
    )


def qemu_tree(board: Board, directory: Path) -> Path:
    """Dump the tree QEMU generates for a virt board, or skip without QEMU."""
    if shutil.which(board.qemu.binary) is None:
        pytest.skip(f"{board.qemu.binary} not found; install qemu-system-arm")
    path = directory / f"{board.name}.dtb"
    dtb.dump_qemu_tree(board, path)
    return path


@pytest.fixture
def board_tree(tmp_path: Path) -> Callable[[str], tuple[Board, Path]]:
    """Return ``load(name) -> (board, path of its device tree)``."""

    def load(name: str) -> tuple[Board, Path]:
        board = load_board(name)
        if board.device_tree.file is None:
            return board, qemu_tree(board, tmp_path)
        return board, package_tree(board)

    return load


TreeLoader = Callable[[str], tuple[Board, Path]]

ALL_BOARDS = ["qemu-virt-a53", "qemu-virt-a15", *PACKAGE_TREES]


@pytest.mark.parametrize("name", ALL_BOARDS)
def test_board_nodes_exist(name: str, board_tree: TreeLoader) -> None:
    board, path = board_tree(name)

    summary = dtb.check_board_nodes(dtb.load_tree(path), board)

    assert summary.memory_node == board.device_tree.memory
    assert summary.console_node == board.device_tree.console
    assert summary.storage_node == board.device_tree.storage
    assert summary.model
    assert summary.compatible
    assert summary.console_compatible
    assert summary.storage_compatible


SUMMARIES = [
    pytest.param(
        "rpi3",
        "Raspberry Pi 3 Model B",
        "brcm,bcm2837",
        "brcm,bcm2835-aux-uart",
        "brcm,bcm2835-sdhost",
        id="rpi3",
    ),
    pytest.param(
        "imx7-warp",
        "Element14 Warp i.MX7 Board",
        "fsl,imx7s",
        "fsl,imx7d-uart",
        "fsl,imx7d-usdhc",
        id="imx7-warp",
    ),
    pytest.param(
        "imx6ul-evk",
        "Freescale i.MX6 UltraLite 14x14 EVK Board",
        "fsl,imx6ul",
        "fsl,imx6ul-uart",
        "fsl,imx6ul-usdhc",
        id="imx6ul-evk",
    ),
    pytest.param(
        "qemu-virt-a15",
        "linux,dummy-virt",
        "linux,dummy-virt",
        "arm,pl011",
        "pci-host-ecam-generic",
        id="qemu-virt-a15",
    ),
]


@pytest.mark.parametrize(
    ("name", "model", "compatible", "console", "storage"), SUMMARIES
)
def test_summary_names_the_hardware(
    name: str,
    model: str,
    compatible: str,
    console: str,
    storage: str,
    board_tree: TreeLoader,
) -> None:
    board, path = board_tree(name)

    summary = dtb.check_board_nodes(dtb.load_tree(path), board)

    assert summary.model == model
    assert compatible in summary.compatible
    assert console in summary.console_compatible
    assert storage in summary.storage_compatible


def test_virt_memory_matches_board(board_tree: TreeLoader) -> None:
    board, path = board_tree("qemu-virt-a15")

    ranges = dtb.memory_ranges(dtb.load_tree(path), board.device_tree.memory)

    assert ranges == [(0x40000000, board.qemu.memory)]


def _with_node(board: Board, key: str, path: str) -> Board:
    tree = dataclasses.replace(board.device_tree, **{key: path})
    return dataclasses.replace(board, device_tree=tree)


@pytest.mark.parametrize("name", ["imx7-warp", "qemu-virt-a53"])
def test_missing_storage_node_names_both(name: str, board_tree: TreeLoader) -> None:
    board, path = board_tree(name)
    wrong = _with_node(board, "storage", "/soc/mmc@12340000")

    with pytest.raises(DeviceTreeError) as caught:
        dtb.check_board_nodes(dtb.load_tree(path), wrong)

    message = str(caught.value)
    assert caught.value.key == "device_tree.storage"
    assert caught.value.node == "/soc/mmc@12340000"
    assert board.source in message
    assert "device_tree.storage" in message
    assert "/soc/mmc@12340000 not found" in message


def test_missing_node_lists_similar_nodes(board_tree: TreeLoader) -> None:
    board, path = board_tree("imx7-warp")
    wrong = _with_node(board, "storage", "/soc/bus@30800000/mmc@30b70000")

    with pytest.raises(DeviceTreeError) as caught:
        dtb.check_board_nodes(dtb.load_tree(path), wrong)

    assert "/soc/bus@30800000/mmc@30b60000" in str(caught.value)


def test_disabled_console_node_rejected(board_tree: TreeLoader) -> None:
    board, path = board_tree("imx7-warp")
    # The WaRP7 tree keeps UART2 disabled.
    wrong = _with_node(
        board, "console", "/soc/bus@30800000/spba-bus@30800000/serial@30890000"
    )

    with pytest.raises(DeviceTreeError, match="status 'disabled'"):
        dtb.check_board_nodes(dtb.load_tree(path), wrong)


def test_invalid_blob_rejected(tmp_path: Path) -> None:
    path = tmp_path / "broken.dtb"
    path.write_bytes(b"not a device tree at all")

    with pytest.raises(DeviceTreeError, match="not a valid flattened device tree"):
        dtb.load_tree(path)


@pytest.mark.parametrize("name", ["imx7-warp", "imx6ul-evk"])
def test_direct_boot_patch_sets_chosen(
    name: str, tmp_path: Path, board_tree: TreeLoader
) -> None:
    board, path = board_tree(name)
    tree = dtb.load_tree(path)
    patch = DirectBootPatch(
        bootargs="console=ttymxc0,115200 rootwait",
        stdout_path=board.device_tree.console,
        baud=115200,
        memory_size=board.qemu.memory,
        initrd_size=0x123456,
    )

    dtb.patch_for_direct_boot(tree, patch, board.device_tree.memory)
    output = tmp_path / "patched.dtb"
    dtb.save_tree(tree, output)
    patched = dtb.load_tree(output)

    chosen = dtb.find_node(patched, "/chosen")
    assert chosen is not None
    assert dtb.property_strings(chosen, "bootargs") == [patch.bootargs]
    assert dtb.property_strings(chosen, "stdout-path") == [
        f"{board.device_tree.console}:115200n8"
    ]
    # i.MX RAM starts at 0x80000000; QEMU puts the initrd 128 MiB above it.
    start = 0x80000000 + 128 * (1 << 20)
    assert dtb.property_words(chosen, "linux,initrd-start") == [start]
    assert dtb.property_words(chosen, "linux,initrd-end") == [start + 0x123456]
    dtb.check_board_nodes(patched, board)


def test_direct_boot_patch_uses_two_cells(board_tree: TreeLoader) -> None:
    board, path = board_tree("rpi3")
    tree = dtb.load_tree(path)
    patch = DirectBootPatch("quiet", board.device_tree.console, 115200, 1 << 30, 16)

    dtb.patch_for_direct_boot(tree, patch, board.device_tree.memory)

    chosen = dtb.find_node(tree, "/chosen")
    assert chosen is not None
    # bcm2837 trees use #address-cells = 1 at the root.
    cells = dtb.property_words(tree.get_rootnode(), "#address-cells")
    start = 128 * (1 << 20)
    assert dtb.property_words(chosen, "linux,initrd-start") == (
        [start] if cells == [1] else [0, start]
    )


def test_patch_replaces_existing_bootargs(board_tree: TreeLoader) -> None:
    board, path = board_tree("imx6ul-evk")
    tree = dtb.load_tree(path)
    first = DirectBootPatch("one", board.device_tree.console, 115200, 1 << 29, 1)
    second = dataclasses.replace(first, bootargs="two")

    dtb.patch_for_direct_boot(tree, first, board.device_tree.memory)
    dtb.patch_for_direct_boot(tree, second, board.device_tree.memory)

    chosen = dtb.find_node(tree, "/chosen")
    assert chosen is not None
    names = [item.get_name() for item in chosen]
    assert names.count("bootargs") == 1
    assert dtb.property_strings(chosen, "bootargs") == ["two"]


def test_initrd_start_follows_qemu() -> None:
    assert dtb.initrd_start(0x80000000, 1 << 30) == 0x88000000
    assert dtb.initrd_start(0x40000000, 64 << 20) == 0x42000000
