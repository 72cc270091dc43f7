"""Exceptions raised by the device-side updater.

Every error the updater raises on purpose derives from one root::

    UpdaterError
    ├── ConfigError              device.json or fw_env.config missing or invalid
    ├── BootEnvError             U-Boot environment cannot be encoded, read, written
    │   ├── BootEnvCopyError     one environment copy is invalid (CRC, layout)
    │   └── BootEnvCorruptError  both copies invalid: nothing is read or written
    ├── SlotError                running or requested A/B slot unknown
    ├── PayloadError             payload rejected before anything changed
    │   └── PackageError         an .ipk is invalid or cannot be installed here
    ├── InstallError             writing the root filesystem into a slot failed
    │   └── UnsafeMemberError    rootfs tarball member would escape the new root
    ├── AppError                 installing, starting or stopping an app failed
    └── CommandError             external command failed or could not be started

Each message says what was expected, what was seen, where, and what to do next, because
on the device the message printed by ``mbl-update`` is often the only diagnostic.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class UpdaterError(Exception):
    """Root of all errors the updater raises on purpose."""


class ConfigError(UpdaterError):
    """Invalid device configuration (device.json or fw_env.config)."""


class BootEnvError(UpdaterError):
    """The U-Boot environment cannot be encoded, read or written."""


class BootEnvCopyError(BootEnvError):
    """One copy of the redundant environment is invalid."""


class BootEnvCorruptError(BootEnvError):
    """Both copies of the redundant environment are invalid."""


class SlotError(UpdaterError):
    """The running or requested A/B slot is unknown."""


class PayloadError(UpdaterError):
    """The payload was rejected before anything on the device changed."""


class PackageError(PayloadError):
    """An .ipk package was rejected before anything on the device changed."""


class InstallError(UpdaterError):
    """Writing the root filesystem into the inactive slot failed."""


class UnsafeMemberError(InstallError):
    """A member of the rootfs tarball would escape or corrupt the new root."""


class AppError(UpdaterError):
    """Installing, starting, stopping or rolling back an application failed."""


class CommandError(UpdaterError):
    """An external command exited non-zero, timed out or could not be started.

    Attributes:
        argv: the command line.
        returncode: the exit status, or None if the command did not run to completion.
        stderr: the command's standard error output.
        stdout: the command's standard output.
    """

    def __init__(
        self,
        message: str,
        argv: Sequence[str],
        returncode: int | None = None,
        stderr: str = "",
        stdout: str = "",
    ) -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout

    @property
    def command_line(self) -> str:
        """The command line quoted as a shell would need it."""
        return shlex.join(self.argv)
