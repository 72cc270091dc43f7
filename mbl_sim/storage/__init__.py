"""The eMMC storage model: write logs, power-cut policies and crash states.

A QEMU power-off by signal keeps every write that reached the host file. A real
eMMC has a volatile write cache: at a power cut it loses what the guest had not
flushed, may keep an arbitrary part of it, and may tear a write that was being
programmed. This package models that on QEMU's own block layer:

- ``writelog``: the dm-log-writes format that QEMU's ``blklogwrites`` driver
  writes, one entry per completed write or flush, in completion order;
- ``crash``: which writes are durable at a log index, cut policies, crash states,
  and building a state's disk (or part of it) from a raw base image and the log;
- ``triggers``: when an armed power cut fires;
- ``model``: the device's eMMC behind ``blklogwrites``, session by session, and
  power cuts that replace the device's disk with a crash state.

Nothing here depends on updates, and ``mbl_sim.campaign`` builds on it.
"""

from mbl_sim.storage.crash import (
    DROP_UNFLUSHED,
    KEEP_ALL,
    CrashState,
    CutPolicy,
    TornWrite,
    apply_state,
    durable_indices,
    image_digest,
    materialise,
    read_state,
    sparse_copy,
    state_writes,
    volatile_indices,
)
from mbl_sim.storage.model import (
    PowerCut,
    StorageModel,
    blklogwrites_disk,
    convert_to_raw,
)
from mbl_sim.storage.triggers import (
    AfterFlushes,
    AfterWrites,
    AtRandomWrite,
    CutTrigger,
    LogTrigger,
    OnConsole,
    OnWriteRange,
)
from mbl_sim.storage.writelog import (
    LogEntry,
    LogWriter,
    WriteLog,
    read_log,
    with_writes_durable,
    write_log_slice,
)

__all__ = [
    "DROP_UNFLUSHED",
    "KEEP_ALL",
    "AfterFlushes",
    "AfterWrites",
    "AtRandomWrite",
    "CrashState",
    "CutPolicy",
    "CutTrigger",
    "LogEntry",
    "LogTrigger",
    "LogWriter",
    "OnConsole",
    "OnWriteRange",
    "PowerCut",
    "StorageModel",
    "TornWrite",
    "WriteLog",
    "apply_state",
    "blklogwrites_disk",
    "convert_to_raw",
    "durable_indices",
    "image_digest",
    "materialise",
    "read_log",
    "read_state",
    "sparse_copy",
    "state_writes",
    "volatile_indices",
    "with_writes_durable",
    "write_log_slice",
]
