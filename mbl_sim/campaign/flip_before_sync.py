"""A deliberately faulty root filesystem install, run on the device.

It writes the payload into the inactive slot like ``mbl-update install`` does, but
makes that slot active while the new files are still in the page cache, and syncs
afterwards. A power cut between the two leaves an environment that names a slot
whose files never reached the disk. The campaign's tests run it to show that the
campaign finds such states. It uses the updater's own modules and the standard
library only, because it runs on the device's Python.

Usage on the device: ``python3 flip_before_sync.py PAYLOAD.tar``
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

from updater.bootenv import load_fw_env_config
from updater.command import run_command
from updater.config import load_config
from updater.payload import classify_payload
from updater.rootfs import extract_payload_rootfs
from updater.slots import FILESYSTEM_LABELS, flip_to, other_slot, read_running_slot

PROGRAM = "flip-before-sync"


def main(argv: Sequence[str]) -> int:
    """Install the payload ``argv[1]`` with the flag flipped too early."""
    payload = classify_payload(argv[1])
    config = load_config()
    locations = load_fw_env_config(config.fw_env_config)
    running = read_running_slot()
    target = other_slot(running)
    device = config.slot_device(target)
    label = FILESYSTEM_LABELS[target]
    run_command(["mke2fs", "-F", "-q", "-t", "ext4", "-L", label, device])
    mount_dir = tempfile.mkdtemp(prefix=f"{PROGRAM}-")
    run_command(["mount", "-t", "ext4", device, mount_dir])
    extract_payload_rootfs(payload, mount_dir)

    # The fault: the environment write is fsynced before the new files are.
    flip_to(locations, target, running)
    print(f"{PROGRAM}: active slot is now {target}, files not synced yet", flush=True)

    os.sync()
    run_command(["umount", mount_dir])
    os.rmdir(mount_dir)
    print(f"{PROGRAM}: root filesystem written to slot {target} ({device})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
