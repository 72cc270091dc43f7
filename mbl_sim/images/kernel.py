"""The Debian kernel of a board: its boot image and the few modules the device loads.

Debian's kernel packages ship ``.ko`` files but no ``modules.dep``, so ``depmod`` runs
on the host twice: over the whole tree to learn the dependencies, then over the subset
that the initramfs carries.
"""

from __future__ import annotations

import gzip
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mbl_sim.commands import run
from mbl_sim.errors import BuildError


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package."""

    root: Path
    release: str

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    def device_tree(self, relative: str) -> Path:
        """Return the path of a ``.dtb`` that the package ships.

        Debian's kernel packages keep their device trees in
        ``usr/lib/linux-image-RELEASE/``, arm64 ones in vendor subdirectories
        (``broadcom/bcm2837-rpi-3-b.dtb``).

        Raises:
            BuildError: the package has no such file; the message lists close names.
        """
        directory = self.root / "usr" / "lib" / f"linux-image-{self.release}"
        path = directory / relative
        if path.is_file():
            return path
        name = Path(relative).name
        stem = name.split("-")[0]
        similar = sorted(
            str(p.relative_to(directory)) for p in directory.rglob(f"{stem}*.dtb")
        )
        raise BuildError(
            f"kernel {self.release} ships no device tree {relative!r} under "
            f"{directory.relative_to(self.root)}; check device_tree.file in the board "
            f"file (similar names: {', '.join(similar[:10]) or 'none'})"
        )


def write_boot_image(tree: KernelTree, output: Path, compression: str) -> None:
    """Copy the kernel image to ``output``, gzip-compressed when ``compression`` is
    ``gzip`` (for U-Boot's ``unzip``)."""
    if compression == "gzip":
        with tree.image().open("rb") as source, gzip.open(output, "wb", 9) as target:
            shutil.copyfileobj(source, target)
        return
    shutil.copy2(tree.image(), output)


def unpack_kernel(deb: Path, destination: Path) -> KernelTree:
    """Unpack a ``linux-image-*`` package and index its modules with ``depmod``.

    Raises:
        BuildError: the package contains no kernel or ``depmod`` fails.
    """
    run(["dpkg-deb", "-x", deb, destination])
    modules = destination / "lib" / "modules"
    releases = sorted(p.name for p in modules.iterdir()) if modules.is_dir() else []
    if len(releases) != 1:
        raise BuildError(
            f"{deb.name}: expected one kernel release under lib/modules, "
            f"found {releases}"
        )
    tree = KernelTree(destination, releases[0])
    if not tree.image().is_file():
        raise BuildError(f"{deb.name}: no boot/vmlinuz-{tree.release} in the package")
    run(["depmod", "-b", destination, tree.release])
    return tree


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def _read_dependencies(tree: KernelTree) -> dict[str, tuple[str, list[str]]]:
    """Map module name to (relative path, dependency paths) from ``modules.dep``."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in (tree.modules_dir / "modules.dep").read_text().splitlines():
        target, _, dependencies = line.partition(":")
        table[_module_name(target)] = (target, dependencies.split())
    return table


def _read_aliases(tree: KernelTree) -> dict[str, str]:
    """Map each alias to one module that provides it.

    Of several providers the portable ``*_generic`` one wins: armhf's ``crc32c``
    alias also names crc32_arm_ce, which fails to load on CPUs without the
    crypto extensions (Cortex-A15, Cortex-A7).
    """
    aliases: dict[str, str] = {}
    for line in (tree.modules_dir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            module = parts[2].replace("-", "_")
            if parts[1] not in aliases or module.endswith("_generic"):
                aliases[parts[1]] = module
    return aliases


def _read_soft_dependencies(tree: KernelTree) -> dict[str, list[str]]:
    """Map module name to the modules that ``modules.softdep`` loads before it."""
    table: dict[str, list[str]] = {}
    text = (tree.modules_dir / "modules.softdep").read_text()
    for match in re.finditer(
        r"^softdep (\S+) pre: ([^\n]*?)(?: post:.*)?$", text, re.M
    ):
        table[match.group(1).replace("-", "_")] = match.group(2).split()
    return table


def module_load_order(tree: KernelTree, requested: list[str]) -> list[str]:
    """Return the modules to ``modprobe`` in order: each requested module after the
    modules its soft dependencies name (``modprobe`` itself follows hard dependencies).

    Raises:
        BuildError: a requested module is neither a module of this kernel nor an alias.
    """
    dependencies = _read_dependencies(tree)
    aliases = _read_aliases(tree)
    soft = _read_soft_dependencies(tree)
    builtin = {
        _module_name(line)
        for line in (tree.modules_dir / "modules.builtin").read_text().split()
    }
    order: list[str] = []
    for request in requested:
        name = request.replace("-", "_")
        if name in builtin:
            continue
        if name not in dependencies:
            raise BuildError(
                f"kernel {tree.release} has no module {request!r}; "
                "check kernel.modules "
                "in the board file (names as in `modinfo`, for example virtio_blk)"
            )
        for pre in soft.get(name, []):
            resolved = aliases.get(pre, pre.replace("-", "_"))
            if resolved in dependencies and resolved not in order:
                order.append(resolved)
        if name not in order:
            order.append(name)
    return order


def copy_modules(tree: KernelTree, modules: list[str], destination: Path) -> None:
    """Copy ``modules`` and their dependencies into ``destination/lib/modules/RELEASE``
    and index them with ``depmod``."""
    dependencies = _read_dependencies(tree)
    paths: set[str] = set()
    for name in modules:
        path, needs = dependencies[name]
        paths.add(path)
        paths.update(needs)
    target = destination / "lib" / "modules" / tree.release
    for relative in sorted(paths):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree.modules_dir / relative, target / relative)
    for index in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        source = tree.modules_dir / index
        if source.exists():
            shutil.copy2(source, target / index)
    run(["depmod", "-b", destination, tree.release])
