"""mbl-sim: a QEMU-based test harness for over-the-air updates of embedded ARM Linux.

The host side: board files (``board``), QEMU processes (``machine``), serial
consoles (``console``), image builds (``images``) and the device API that tests
use. The device side, which runs in the guest, is the separate ``updater``
package.
"""

__version__ = "0.1.0"
