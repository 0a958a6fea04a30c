"""acrn-dm's PCI test device ``dummy``: 10DD:0001, class 02, 4 MSI messages, BAR0 I/O of
8 bytes, BAR1 and BAR2 MEM32 of 4 KiB each, all plain storage.

Behaviour kept from acrn-dm: a 4-byte write to I/O offset 4 raises MSI ``value % n``;
writing 0xABCDEF raises every allocated MSI message.

Options of our own (``-s 3,dummy,msix=8,intx``), for testing the PCI core:
* ``msix[=N]``: an MSI-X capability with N entries (default 16) in MEM32 BAR3; the offset-4
  write then raises MSI-X entry ``value % N`` while MSI-X is enabled.
* ``intx``: request an INTx pin; writing a non-zero byte to I/O offset 7 asserts the line,
  zero deasserts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .device import BarKind, PciDevice

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

DIOSZ = 8
DMEMSZ = 4096
MSI_MSGS = 4
MSIX_MSGS = 16
MAGIC_ALL = 0xABCDEF


class Dummy(PciDevice):
    name = "dummy"

    def __init__(self, ctx: DeviceContext | None = None, slot: SlotConfig | None = None, *,
                 msix: int = 0, intx: bool = False) -> None:
        super().__init__(ctx, slot)
        self.ioregs = bytearray(DIOSZ)
        self.memregs = [bytearray(DMEMSZ), bytearray(DMEMSZ)]
        self.cfg.set_ids(0x10DD, 0x0001, 0x020000)
        self.add_msi(MSI_MSGS)
        self.add_bar(0, BarKind.IO, DIOSZ, read=self._io_read, write=self._io_write)
        self.add_bar(1, BarKind.MEM32, DMEMSZ, read=self._mem_reader(0),
                     write=self._mem_writer(0))
        self.add_bar(2, BarKind.MEM32, DMEMSZ, read=self._mem_reader(1),
                     write=self._mem_writer(1))
        if msix:
            self.add_msix(msix, bar=3)
        if intx:
            self.request_intx()

    def _io_read(self, offset: int, size: int) -> int:
        if offset + size > DIOSZ:
            return 0
        return int.from_bytes(self.ioregs[offset : offset + size], "little")

    def _io_write(self, offset: int, size: int, value: int) -> None:
        if offset + size > DIOSZ:
            return
        self.ioregs[offset : offset + size] = value.to_bytes(size, "little")
        if offset == 4 and size == 4:
            if self.msix is not None and self.msix.enabled:
                self.msix.send(value % self.msix.entries)
            elif self.msi is not None and self.msi.enabled:
                self.msi.send(value % self.msi.vectors)
        if value == MAGIC_ALL and self.msi is not None and self.msi.enabled:
            for i in range(self.msi.vectors):
                self.msi.send(i)
        if self.intx is not None and offset <= 7 < offset + size:
            if self.ioregs[7]:
                self.intx.assert_()
            else:
                self.intx.deassert()

    def _mem_reader(self, i: int):
        regs = self.memregs[i]

        def read(offset: int, size: int) -> int:
            if offset + size > DMEMSZ:
                return 0
            return int.from_bytes(regs[offset : offset + size], "little")

        return read

    def _mem_writer(self, i: int):
        regs = self.memregs[i]

        def write(offset: int, size: int, value: int) -> None:
            if offset + size <= DMEMSZ:
                regs[offset : offset + size] = value.to_bytes(size, "little")

        return write


def parse_options(text: str) -> dict[str, int | bool]:
    opts: dict[str, int | bool] = {"msix": 0, "intx": False}
    for item in filter(None, text.split(",")):
        key, eq, val = item.partition("=")
        if key == "msix":
            try:
                n = int(val, 0) if eq else MSIX_MSGS
            except ValueError:
                n = -1
            if not 1 <= n <= 2048:
                raise ConfigError(f"dummy: msix={val} must be 1..2048 entries")
            opts["msix"] = n
        elif key == "intx" and not eq:
            opts["intx"] = True
        else:
            raise ConfigError(f"dummy: unknown option {item!r}; known: msix[=N], intx")
    return opts


def check_options(slot: SlotConfig, options: str) -> object:
    """The validator's check: what ``create`` parses, without building anything."""
    return parse_options(options)


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> Dummy:
    """``-s <slot>,dummy[,msix[=N]][,intx]``."""
    opts = parse_options(options)
    return Dummy(ctx, slot, msix=int(opts["msix"]), intx=bool(opts["intx"]))
