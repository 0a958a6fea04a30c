"""The shape every emulated PCI function has."""

from __future__ import annotations


class PciDevice:
    """A PCI function: answers config cycles; may run background tasks.

    The PCI issue replaces this minimal base with ConfigSpace-backed devices.
    """

    name = "pci-device"

    def cfg_read(self, reg: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        pass

    async def run(self) -> None:
        """Device tasks (queue workers, backends); returns when the device has none."""

    def reset(self) -> None:
        """Back to power-on state (VM reset)."""

    def close(self) -> None:
        """Release host resources (files, taps, sockets)."""
