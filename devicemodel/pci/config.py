"""A PCI function's configuration space: 4 KiB of bytes plus two per-bit masks.

The guest may change only the bits of ``wmask``; writing 1 to a bit of ``w1cmask`` clears
it (status bits). Device code writes the bytes directly (``set8``..``set32``) and is not
bound by the masks. Read-only IDs, the command/status rules of acrn-dm (acrn-facts §3.4)
and acrn-dm's answer for the extended space of emulated functions live here, so every
device gets them without thinking about it.
"""

from __future__ import annotations

CONFIG_SIZE = 4096
STD_SIZE = 256

# type-0 header offsets
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
PROG_IF = 0x09
CLASS_CODE = 0x09  # 3 bytes: prog-if, subclass, base class
SUBCLASS = 0x0A
BASE_CLASS = 0x0B
CACHE_LINE = 0x0C
LATENCY = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
CARDBUS_CIS = 0x28
SUBSYS_VENDOR = 0x2C
SUBSYS_ID = 0x2E
ROM_BAR = 0x30
CAP_PTR = 0x34
INT_LINE = 0x3C
INT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F
CAP_START = 0x40

# command bits
CMD_IO = 0x0001
CMD_MEM = 0x0002
CMD_MASTER = 0x0004
CMD_INTX_DISABLE = 0x0400
#: acrn-dm: the writable command bits are ~0xF880 (bits 0-6 and 8-10)
CMD_WRITABLE = 0x077F

# status bits
STATUS_INTX = 0x0008
STATUS_CAP_LIST = 0x0010
#: the error bits of the status register that the PCI spec makes write-1-to-clear
STATUS_W1C = 0xF900

HEADER_MULTIFUNCTION = 0x80

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


class ConfigSpace:
    """Bytes, writable mask and write-1-to-clear mask of one function.

    ``extended=False`` (every emulated function) answers acrn-dm's way beyond 0x100:
    reads are all-ones except 0x100..0x103, which read 0 so that the guest finds an empty
    extended capability list; writes there are dropped. Passthrough sets ``extended=True``.
    """

    __slots__ = ("data", "wmask", "w1cmask", "extended", "cap_last", "cap_end")

    def __init__(self, *, extended: bool = False) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self.extended = extended
        #: offset of the last capability in the chain (0: none) and the first free byte
        self.cap_last = 0
        self.cap_end = CAP_START
        self.set16(COMMAND, 0)
        self.set_wmask(COMMAND, 2, CMD_WRITABLE)
        self.set_w1c(STATUS, 2, STATUS_W1C)
        for off in (CACHE_LINE, LATENCY, INT_LINE):
            self.set_wmask(off, 1, 0xFF)

    # --- guest accesses ---------------------------------------------------------------
    def read(self, off: int, size: int) -> int:
        """A guest read; the caller has checked size in (1, 2, 4) and alignment."""
        if off >= STD_SIZE and not self.extended:
            return 0 if off < STD_SIZE + 4 else _ONES[size]
        if off + size > CONFIG_SIZE:
            return _ONES.get(size, 0xFFFF_FFFF)
        return int.from_bytes(self.data[off : off + size], "little")

    def write(self, off: int, size: int, value: int) -> None:
        """A guest write through the masks."""
        if (off >= STD_SIZE and not self.extended) or off + size > CONFIG_SIZE:
            return
        end = off + size
        old = int.from_bytes(self.data[off:end], "little")
        wm = int.from_bytes(self.wmask[off:end], "little")
        w1c = int.from_bytes(self.w1cmask[off:end], "little")
        value &= _ONES.get(size, (1 << (8 * size)) - 1)
        new = ((old & ~wm) | (value & wm)) & ~(value & w1c)
        if new != old:
            self.data[off:end] = new.to_bytes(size, "little")

    # --- device-side accesses (no masks) ----------------------------------------------
    def get(self, off: int, size: int) -> int:
        return int.from_bytes(self.data[off : off + size], "little")

    def set(self, off: int, size: int, value: int) -> None:
        self.data[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def get8(self, off: int) -> int:
        return self.data[off]

    def get16(self, off: int) -> int:
        return self.get(off, 2)

    def get32(self, off: int) -> int:
        return self.get(off, 4)

    def set8(self, off: int, value: int) -> None:
        self.data[off] = value & 0xFF

    def set16(self, off: int, value: int) -> None:
        self.set(off, 2, value)

    def set32(self, off: int, value: int) -> None:
        self.set(off, 4, value)

    def set_bytes(self, off: int, data: bytes) -> None:
        self.data[off : off + len(data)] = data

    def set_wmask(self, off: int, size: int, mask: int) -> None:
        self.wmask[off : off + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_w1c(self, off: int, size: int, mask: int) -> None:
        self.w1cmask[off : off + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    # --- header helpers ---------------------------------------------------------------
    def set_ids(
        self,
        vendor: int,
        device: int,
        class_code: int,
        *,
        revision: int = 0,
        subsys_vendor: int = 0,
        subsys_id: int = 0,
    ) -> None:
        """IDs and the 24-bit class code (base << 16 | sub << 8 | prog-if); all read-only."""
        self.set16(VENDOR_ID, vendor)
        self.set16(DEVICE_ID, device)
        self.set8(REVISION, revision)
        self.set(CLASS_CODE, 3, class_code)
        self.set16(SUBSYS_VENDOR, subsys_vendor)
        self.set16(SUBSYS_ID, subsys_id)

    @property
    def vendor_id(self) -> int:
        return self.get16(VENDOR_ID)

    @property
    def device_id(self) -> int:
        return self.get16(DEVICE_ID)

    @property
    def class_code(self) -> int:
        return self.get(CLASS_CODE, 3)

    @property
    def command(self) -> int:
        return self.get16(COMMAND)

    @property
    def status(self) -> int:
        return self.get16(STATUS)

    def set_status_bits(self, bits: int, on: bool) -> None:
        st = self.get16(STATUS)
        self.set16(STATUS, (st | bits) if on else (st & ~bits))

    @property
    def multifunction(self) -> bool:
        return bool(self.data[HEADER_TYPE] & HEADER_MULTIFUNCTION)

    @multifunction.setter
    def multifunction(self, on: bool) -> None:
        h = self.data[HEADER_TYPE] & 0x7F
        self.data[HEADER_TYPE] = h | (HEADER_MULTIFUNCTION if on else 0)
