"""Device trees of the boards: load, check the nodes a port needs, patch, summarise.

Every board boots with one flattened device tree: the ``.dtb`` that its Debian kernel
package ships (``device_tree.file`` in the board file), or, for QEMU's virt machine,
the tree that QEMU generates and writes out with ``-M virt,dumpdtb=FILE``. Before
anything boots, the image build loads that tree with pyfdt and checks that the nodes
the board file names exist and are not disabled: the RAM (``device_tree.memory``),
the console's UART (``device_tree.console``) and the storage controller
(``device_tree.storage``). A board file that names a node the tree lacks fails the
build with a ``DeviceTreeError`` that names the board file, the key, the node path and
the tree.

Boards without U-Boot boot with ``-kernel``, ``-dtb`` and ``-initrd``, so their tree
gets what a boot loader would add to ``/chosen``: ``bootargs``, ``stdout-path`` and
``linux,initrd-start``/``linux,initrd-end``. QEMU 7.2 itself rewrites ``bootargs``
and the initrd range when it loads a tree together with ``-append`` and ``-initrd``;
the patched tree carries the same values, so it is also complete for a loader that
does not.

``DeviceTreeError`` derives from ``mbl_sim.errors.ConfigError``: the board file and
the tree disagree, which the board's author fixes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyfdt.pyfdt import (
    Fdt,
    FdtBlobParse,
    FdtNode,
    FdtProperty,
    FdtPropertyStrings,
    FdtPropertyWords,
)

from mbl_sim.board import Board
from mbl_sim.commands import run
from mbl_sim.errors import ConfigError

__all__ = [
    "PYFDT_FORMAT",
    "DeviceTreeError",
    "DirectBootPatch",
    "TreeSummary",
    "check_board_nodes",
    "dump_qemu_tree",
    "find_node",
    "initrd_start",
    "load_tree",
    "memory_ranges",
    "node_paths",
    "patch_for_direct_boot",
    "property_strings",
    "property_words",
    "save_tree",
]

log = logging.getLogger(__name__)

PYFDT_FORMAT = "1"
"""Version of what this module writes into a tree; part of the build step's key."""

_DEFAULT_ADDRESS_CELLS = 2
_DEFAULT_SIZE_CELLS = 1
"""The devicetree specification's defaults for #address-cells and #size-cells."""

_MiB = 1 << 20


class DeviceTreeError(ConfigError):
    """A device tree cannot be read, or lacks a node that the board file names.

    Attributes:
        board_file: the board file, or "" when no board is involved.
        key: the board file key that names the node, for example
            ``device_tree.storage``; "" when the whole tree is at fault.
        node: the node path that was looked for.
        tree: where the tree came from.
    """

    def __init__(
        self,
        message: str,
        *,
        board_file: str = "",
        key: str = "",
        node: str = "",
        tree: str = "",
    ) -> None:
        self.board_file = board_file
        self.key = key
        self.node = node
        self.tree = tree
        super().__init__(message)


# --------------------------------------------------------------------------
# Reading and writing blobs


def load_tree(path: Path, *, board_file: str = "") -> Fdt:
    """Parse the flattened device tree blob at ``path``.

    Raises:
        DeviceTreeError: the file cannot be read or is not a valid blob.
    """
    try:
        with path.open("rb") as stream:
            return FdtBlobParse(stream).to_fdt()
    except OSError as error:
        raise DeviceTreeError(
            f"cannot read device tree {path}: {error}",
            board_file=board_file,
            tree=str(path),
        ) from error
    # pyfdt 0.3 raises plain Exception (bad magic, truncated blob) and struct.error.
    except Exception as error:
        raise DeviceTreeError(
            f"{path} is not a valid flattened device tree: {error}",
            board_file=board_file,
            tree=str(path),
        ) from error


def save_tree(tree: Fdt, path: Path) -> None:
    """Write ``tree`` as a flattened device tree blob (version 17)."""
    path.write_bytes(tree.to_dtb())


def dump_qemu_tree(board: Board, output: Path) -> None:
    """Write the device tree that QEMU generates for ``board``'s machine.

    QEMU builds the virt machine's tree from the machine options, the CPU, the
    memory size and the number of CPUs, so the command line carries all of them.

    Raises:
        BuildError: QEMU failed; the error carries its stderr.
    """
    qemu = board.qemu
    command: list[str | Path] = [
        qemu.binary,
        "-M",
        f"{qemu.machine},dumpdtb={output}",
        "-m",
        f"{qemu.memory >> 20}M",
        "-nic",
        "none",
        "-display",
        "none",
    ]
    if qemu.cpu is not None:
        command += ["-cpu", qemu.cpu]
    if qemu.smp is not None:
        command += ["-smp", str(qemu.smp)]
    run(command)


# --------------------------------------------------------------------------
# Looking things up


def find_node(tree: Fdt, path: str) -> FdtNode | None:
    """Return the node at the absolute ``path``, or None."""
    found = tree.resolve_path(path)
    return found if isinstance(found, FdtNode) else None


def _property(node: FdtNode, name: str) -> Any:
    for item in node:
        if isinstance(item, FdtProperty) and item.get_name() == name:
            return item
    return None


def property_strings(node: FdtNode, name: str) -> list[str]:
    """Return the strings of a string-list property, or [] when it is absent."""
    prop = _property(node, name)
    if isinstance(prop, FdtPropertyStrings):
        return [str(text) for text in prop]
    return []


def property_words(node: FdtNode, name: str) -> list[int]:
    """Return the 32-bit cells of a property, or [] when it is absent or not cells."""
    prop = _property(node, name)
    if isinstance(prop, FdtPropertyWords):
        return [int(word) for word in prop]
    return []


def node_paths(tree: Fdt) -> Iterator[str]:
    """Yield the path of every node, parents before children."""

    def walk(node: FdtNode, path: str) -> Iterator[str]:
        yield path or "/"
        for item in node:
            if isinstance(item, FdtNode):
                yield from walk(item, f"{path}/{item.get_name()}")

    yield from walk(tree.get_rootnode(), "")


def _cells(node: FdtNode, name: str, default: int) -> int:
    words = property_words(node, name)
    return words[0] if words else default


def memory_ranges(tree: Fdt, path: str) -> list[tuple[int, int]]:
    """Return the (base, size) pairs of the ``reg`` property of the memory node.

    A memory node sits under the root, so the root's ``#address-cells`` and
    ``#size-cells`` give the width of each number.
    """
    root = tree.get_rootnode()
    node = find_node(tree, path)
    if node is None:
        return []
    address_cells = _cells(root, "#address-cells", _DEFAULT_ADDRESS_CELLS)
    size_cells = _cells(root, "#size-cells", _DEFAULT_SIZE_CELLS)
    words = property_words(node, "reg")
    stride = address_cells + size_cells
    ranges = []
    for start in range(0, len(words) - stride + 1, stride):
        base = _join_cells(words[start : start + address_cells])
        size = _join_cells(words[start + address_cells : start + stride])
        ranges.append((base, size))
    return ranges


def _join_cells(words: list[int]) -> int:
    value = 0
    for word in words:
        value = (value << 32) | word
    return value


# --------------------------------------------------------------------------
# Checking a board's nodes


@dataclass(frozen=True)
class TreeSummary:
    """Summary of a board's device tree for the certification report."""

    source: str
    """Origin of the tree: a file of the kernel package or QEMU's dump."""
    model: str
    compatible: list[str]
    memory_node: str
    memory: list[list[int]]
    """[base, size] pairs in bytes."""
    console_node: str
    console_compatible: list[str]
    storage_node: str
    storage_compatible: list[str]

    def save(self, path: Path) -> None:
        """Write the summary as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TreeSummary:
        """Read a summary that ``save`` wrote."""
        return cls(**json.loads(path.read_text()))


def _require_node(tree: Fdt, board: Board, key: str, path: str) -> FdtNode:
    node = find_node(tree, path)
    source = board.device_tree.file or f"QEMU's {board.qemu.machine} tree"
    if node is None:
        leaf = path.rsplit("/", 1)[-1].split("@")[0]
        similar = [p for p in node_paths(tree) if p.rsplit("/", 1)[-1].startswith(leaf)]
        hint = f"; nodes named {leaf}: {', '.join(similar[:6])}" if similar else ""
        raise DeviceTreeError(
            f"{board.source}: {key}: node {path} not found in the device tree "
            f"({source}, model {_model(tree)!r}){hint}",
            board_file=board.source,
            key=key,
            node=path,
            tree=source,
        )
    status = property_strings(node, "status")
    if status and status[0] not in ("okay", "ok"):
        raise DeviceTreeError(
            f"{board.source}: {key}: node {path} in the device tree ({source}) has "
            f"status {status[0]!r}, so Linux does not use it; name an enabled node",
            board_file=board.source,
            key=key,
            node=path,
            tree=source,
        )
    return node


def _model(tree: Fdt) -> str:
    models = property_strings(tree.get_rootnode(), "model")
    return models[0] if models else ""


def check_board_nodes(tree: Fdt, board: Board) -> TreeSummary:
    """Check that the nodes the board file names exist and are enabled.

    Returns the summary of the tree.

    Raises:
        DeviceTreeError: a node is missing or disabled, or the memory node has no
            ``reg``; the message names the board file, the key and the node.
    """
    names = board.device_tree
    _require_node(tree, board, "device_tree.memory", names.memory)
    console = _require_node(tree, board, "device_tree.console", names.console)
    storage = _require_node(tree, board, "device_tree.storage", names.storage)
    ranges = memory_ranges(tree, names.memory)
    if not ranges:
        raise DeviceTreeError(
            f"{board.source}: device_tree.memory: node {names.memory} has no reg "
            "property, so its RAM is unknown",
            board_file=board.source,
            key="device_tree.memory",
            node=names.memory,
        )
    root = tree.get_rootnode()
    return TreeSummary(
        source=names.file or f"generated by QEMU for -M {board.qemu.machine}",
        model=_model(tree),
        compatible=property_strings(root, "compatible"),
        memory_node=names.memory,
        memory=[[base, size] for base, size in ranges],
        console_node=names.console,
        console_compatible=property_strings(console, "compatible"),
        storage_node=names.storage,
        storage_compatible=property_strings(storage, "compatible"),
    )


# --------------------------------------------------------------------------
# Patching for direct boot


@dataclass(frozen=True)
class DirectBootPatch:
    """Values for ``/chosen`` when QEMU boots the kernel without a boot loader."""

    bootargs: str
    stdout_path: str
    """Node path of the console's UART."""
    baud: int
    memory_size: int
    """Guest RAM in bytes, which decides where QEMU puts the initrd."""
    initrd_size: int


def initrd_start(memory_base: int, memory_size: int) -> int:
    """Return where QEMU 7.2 loads ``-initrd`` on Arm: RAM base plus half the RAM,
    at most 128 MiB (hw/arm/boot.c), for kernels that end below that address."""
    return memory_base + min(memory_size // 2, 128 * _MiB)


def _set_property(node: FdtNode, prop: FdtProperty) -> None:
    for index, item in enumerate(node):
        if isinstance(item, FdtProperty) and item.get_name() == prop.get_name():
            node[index] = prop
            return
    node.append(prop)


def _chosen(tree: Fdt) -> FdtNode:
    root = tree.get_rootnode()
    node = find_node(tree, "/chosen")
    if node is None:
        node = FdtNode("chosen")
        node.set_parent_node(root)
        root.append(node)
    return node


def _cell_words(value: int, cells: int) -> list[int]:
    return [
        (value >> (32 * (cells - 1 - index))) & 0xFFFFFFFF for index in range(cells)
    ]


def patch_for_direct_boot(tree: Fdt, patch: DirectBootPatch, memory_node: str) -> None:
    """Set ``/chosen``'s ``bootargs``, ``stdout-path`` and initrd range.

    ``/chosen`` is created when the tree has none. The initrd range uses the
    root's ``#address-cells``, as the kernel reads it.

    Raises:
        DeviceTreeError: the memory node has no ``reg``.
    """
    ranges = memory_ranges(tree, memory_node)
    if not ranges:
        raise DeviceTreeError(
            f"memory node {memory_node} has no reg property", node=memory_node
        )
    start = initrd_start(ranges[0][0], patch.memory_size)
    cells = _cells(tree.get_rootnode(), "#address-cells", _DEFAULT_ADDRESS_CELLS)
    chosen = _chosen(tree)
    _set_property(chosen, FdtPropertyStrings("bootargs", [patch.bootargs]))
    _set_property(
        chosen,
        FdtPropertyStrings("stdout-path", [f"{patch.stdout_path}:{patch.baud}n8"]),
    )
    _set_property(
        chosen, FdtPropertyWords("linux,initrd-start", _cell_words(start, cells))
    )
    end = start + patch.initrd_size
    _set_property(chosen, FdtPropertyWords("linux,initrd-end", _cell_words(end, cells)))
    log.debug("patched /chosen: %s, initrd %#x..%#x", patch.bootargs, start, end)
