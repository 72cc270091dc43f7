"""Disk images built on plain files: GPT with sfdisk, FAT with mkfs.vfat and mtools,
ext4 with mke2fs, each filesystem written at its partition's offset. No loop devices and
no root privileges are needed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mbl_sim.commands import run

SECTOR = 512

# GPT partition type GUIDs.
TYPE_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
TYPE_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"


@dataclass(frozen=True)
class PartitionImage:
    """One partition to create: where it lies and what it holds."""

    name: str
    offset: int  # bytes from the start of the disk
    size: int  # bytes
    fs_type: str  # "ext4", "vfat" or "none"
    content: Path | None = None  # directory copied into an ext4 filesystem
    # Character devices to create in the ext4 filesystem: (path, major, minor, mode).
    device_nodes: Sequence[tuple[str, int, int, int]] = ()
    files: Mapping[str, Path] = field(default_factory=dict)  # FAT files: name -> source


def create_disk(image: Path, size: int, partitions: Sequence[PartitionImage]) -> None:
    """Create a sparse disk image of ``size`` bytes with a GPT and filesystems."""
    with image.open("wb") as stream:
        stream.truncate(size)
    write_partition_table(image, partitions)
    for partition in partitions:
        if partition.fs_type == "ext4":
            make_ext4(image, partition)
        elif partition.fs_type == "vfat":
            make_vfat(image, partition)


def write_partition_table(image: Path, partitions: Sequence[PartitionImage]) -> None:
    lines = ["label: gpt", "unit: sectors"]
    for partition in partitions:
        kind = TYPE_BASIC_DATA if partition.fs_type == "vfat" else TYPE_LINUX
        lines.append(
            f"start={partition.offset // SECTOR}, size={partition.size // SECTOR}, "
            f'type={kind}, name="{partition.name}"'
        )
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", image],
        input_bytes=("\n".join(lines) + "\n").encode(),
    )


def make_ext4(image: Path, partition: PartitionImage) -> None:
    """Format ext4 in place, filled from ``partition.content`` if given."""
    command: list[str | Path] = [
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        partition.name,
        "-E",
        f"offset={partition.offset}",
    ]
    if partition.content is not None:
        command += ["-d", partition.content]
    command += [image, f"{partition.size // 1024}k"]
    run(command)
    script = _device_node_commands(partition.device_nodes)
    if partition.content is not None and os.getuid() != 0:
        script += _root_owner_commands(partition.content)
    if script:
        # debugfs takes the partition offset as an I/O option after "?".
        run(
            ["debugfs", "-w", "-f", "-", f"{image}?offset={partition.offset}"],
            input_bytes="\n".join(script).encode() + b"\n",
        )


def _device_node_commands(nodes: Sequence[tuple[str, int, int, int]]) -> list[str]:
    commands = []
    for path, major, minor, mode in nodes:
        parent, _, name = path.rpartition("/")
        commands += [
            f"cd /{parent}",
            f"mknod {name} c {major} {minor}",
            f"sif /{path} mode {0o20000 | mode:#o}",
            "cd /",
        ]
    return commands


def _root_owner_commands(content: Path) -> list[str]:
    """Return debugfs commands that give every file to root, because mke2fs -d copies
    the owners of the staging directory, which a build without root privileges owns."""
    commands = []
    for directory, dirnames, filenames in os.walk(content):
        for name in [*dirnames, *filenames]:
            path = "/" + Path(directory, name).relative_to(content).as_posix()
            commands += [f"sif {path} uid 0", f"sif {path} gid 0"]
    return commands


def make_vfat(image: Path, partition: PartitionImage) -> None:
    """Format a FAT filesystem in place and copy ``partition.files`` into it."""
    # mkfs.vfat picks FAT32 for anything over a few MiB and then rejects partitions
    # below its FAT32 minimum of about 256 MiB, so small boot partitions get FAT16.
    fat_bits = "16" if partition.size < 256 << 20 else "32"
    run(
        [
            "mkfs.vfat",
            "-F",
            fat_bits,
            "--offset",
            str(partition.offset // SECTOR),
            "-n",
            partition.name.upper()[:11],
            image,
            str(partition.size // 1024),
        ]
    )
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    for name, source in partition.files.items():
        run(
            ["mcopy", "-o", "-i", f"{image}@@{partition.offset}", source, f"::{name}"],
            env=env,
        )


def write_at(image: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into ``image`` at byte ``offset`` without truncating it."""
    with image.open("r+b") as stream:
        stream.seek(offset)
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
