"""What the guest sees of a device the ACRN hypervisor emulates itself (CREATE_VDEV): the
hypervisor's ivshmem (1AF4:1110) and its PCI vUART, an MCS9900 (9710:9900).

The device model only reserves the slot and BAR addresses and asks for the device; from
then on the hypervisor answers the guest's config cycles and BAR accesses for that BDF.
The sim backend answers them with these models, as ACRN's hypervisor would
(hypervisor/dm/vpci/ivshmem.c, vmcs9900.c), and ``acrn-pydm lspci`` prints their config
space, so both show the function a guest on ACRN finds there.
"""

from __future__ import annotations

import mmap
import struct

from .base import VdevSpec

IVSHMEM_IDS = (0x1AF4, 0x1110)
MCS9900_IDS = (0x9710, 0x9900)
VUART_MMIO_SIZE = 0x1000
IVSHMEM_MMIO_SIZE = 0x100
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800  # the hypervisor's VMSIX_MAX_ENTRY_TABLE_SIZE
IVSHMEM_VECTORS = 8  # MAX_IVSHMEM_MSIX_TBL_ENTRY_NUM
CAP_START = 0x40
_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}

#: the hypervisor's shared memory regions, by name: shared by every VM of this process,
#: as ACRN's are by every VM that names the region
_SHM_REGIONS: dict[str, mmap.mmap] = {}


def shm_region(name: str, size: int) -> mmap.mmap:
    region = _SHM_REGIONS.get(name)
    if region is None or len(region) != size:
        region = _SHM_REGIONS[name] = mmap.mmap(-1, size)
    return region


class HvVdevView:
    """One hypervisor-emulated PCI function: its config space, BARs and registers."""

    def __init__(self, spec: VdevSpec, kind: str, vectors: int,
                 bars: dict[int, tuple[int, int]]) -> None:
        self.spec = spec
        self.kind = kind
        self.config = bytearray(256)
        self.wmask = bytearray(256)
        #: BAR index -> (size, type bits); a 64-bit BAR's high dword is index + 1
        self.bar_sizes = bars
        self.msix = bytearray(MSIX_BAR_SIZE)
        for k in range(vectors):  # every entry starts masked (add_vmsix_capability)
            struct.pack_into("<I", self.msix, 16 * k + 12, 1)
        self.regs = bytearray(IVSHMEM_MMIO_SIZE)
        self.output = bytearray()  # what the guest wrote to a vUART's THR
        self.doorbells: list[int] = []
        self.memory: mmap.mmap | None = None
        self._put(0x04, 2, 0x0006)  # command: memory decode, bus master
        self._mask(0x04, 0x0547)
        self._put(0x06, 2, 0x0010)  # status: capability list
        # MSI-X: table at offset 0 of BAR1, PBA at 0x800 of BAR1
        self._put(0x34, 1, CAP_START)
        self._put(CAP_START, 4, 0x11 | (vectors - 1) << 16)
        self._put(CAP_START + 4, 4, 1)
        self._put(CAP_START + 8, 4, MSIX_PBA_OFFSET | 1)
        self._mask(CAP_START + 2, 0xC000)
        for idx in bars:
            lo = spec.io_addr[idx]
            self._put(0x10 + 4 * idx, 4, lo)
            if bars[idx][1] & 0x4:
                self._put(0x14 + 4 * idx, 4, spec.io_addr[idx + 1])
        self._put(0x3C, 1, 0xFF)
        self._mask(0x3C, 0xFF)

    def _put(self, off: int, size: int, value: int) -> None:
        self.config[off:off + size] = value.to_bytes(size, "little")

    def _mask(self, off: int, bits: int) -> None:
        size = 2 if bits <= 0xFFFF else 4
        self.wmask[off:off + size] = bits.to_bytes(size, "little")

    # --- config space ---------------------------------------------------------------------
    def cfg_read(self, reg: int, size: int) -> int:
        if reg + size > 256:  # no extended capabilities
            return 0 if 0x100 <= reg < 0x104 else _ONES.get(size, 0xFFFF_FFFF)
        return int.from_bytes(self.config[reg:reg + size], "little")

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        if reg + size > 256 or size not in (1, 2, 4):
            return
        if 0x10 <= reg < 0x28 and size == 4 and reg % 4 == 0:
            self._bar_write((reg - 0x10) // 4, value)
            return
        for i in range(size):
            m = self.wmask[reg + i]
            byte = (value >> 8 * i) & 0xFF
            self.config[reg + i] = (self.config[reg + i] & ~m) | (byte & m)

    def _bar_write(self, idx: int, value: int) -> None:
        if idx in self.bar_sizes:
            size, bits = self.bar_sizes[idx]
            self._put(0x10 + 4 * idx, 4, (value & ~(size - 1) & 0xFFFF_FFF0) | bits)
        elif idx - 1 in self.bar_sizes and self.bar_sizes[idx - 1][1] & 0x4:
            size = self.bar_sizes[idx - 1][0]
            self._put(0x10 + 4 * idx, 4, value & ~((size - 1) >> 32) & 0xFFFF_FFFF)

    def bar_base(self, idx: int) -> int:
        lo = int.from_bytes(self.config[0x10 + 4 * idx:0x14 + 4 * idx], "little")
        base = lo & 0xFFFF_FFF0
        if self.bar_sizes[idx][1] & 0x4:
            base |= int.from_bytes(self.config[0x14 + 4 * idx:0x18 + 4 * idx], "little") << 32
        return base

    def bar_at(self, gpa: int, size: int) -> tuple[int, int] | None:
        """(BAR index, offset) of a guest access the device decodes, else None."""
        if not self.config[0x04] & 0x2:
            return None
        for idx, (bar_size, _) in self.bar_sizes.items():
            base = self.bar_base(idx)
            if base and base <= gpa and gpa + size <= base + bar_size:
                return idx, gpa - base
        return None

    # --- BAR accesses -----------------------------------------------------------------------
    def mmio_read(self, idx: int, off: int, size: int) -> int:
        if idx == 1:
            return int.from_bytes(self.msix[off:off + size], "little") if off < MSIX_PBA_OFFSET \
                else 0
        if idx == 2 and self.memory is not None:
            return int.from_bytes(self.memory[off:off + size], "little")
        return self.reg_read(off, size)

    def mmio_write(self, idx: int, off: int, size: int, value: int) -> None:
        if idx == 1:
            if off < MSIX_PBA_OFFSET and size in (4, 8) and off % size == 0:
                self.msix[off:off + size] = value.to_bytes(size, "little")
        elif idx == 2 and self.memory is not None:
            self.memory[off:off + size] = value.to_bytes(size, "little")
        else:
            self.reg_write(off, size, value)

    def reg_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.regs[off:off + size], "little") if off + size <= 16 else 0

    def reg_write(self, off: int, size: int, value: int) -> None:
        if off + size <= 8:  # interrupt mask and status
            self.regs[off:off + size] = value.to_bytes(size, "little")
        elif off == 0x0C and size == 4:
            self.doorbells.append(value)


class VuartView(HvVdevView):
    """The PCI vUART: 8250 registers, one per byte of BAR0. What the guest transmits is
    kept in ``output`` (on ACRN it goes to the vUART's peer or the hypervisor console)."""

    def reg_read(self, off: int, size: int) -> int:
        if off == 5:  # LSR: transmitter empty, nothing received
            return 0x60
        if off == 2:  # IIR: no interrupt pending
            return 0x01
        return self.regs[off] if off < 8 else 0

    def reg_write(self, off: int, size: int, value: int) -> None:
        lcr_dlab = self.regs[3] & 0x80
        if off == 0 and not lcr_dlab:
            self.output.append(value & 0xFF)
        elif off < 8:
            self.regs[off] = value & 0xFF


def view_for(spec: VdevSpec, vm_id: int = 0) -> HvVdevView | None:
    """The guest's view of ``spec`` as ACRN's hypervisor builds it; None for an id the
    hypervisor has no emulation for (it refuses CREATE_VDEV)."""
    ids = (spec.vendor, spec.device)
    if ids == IVSHMEM_IDS:
        size = spec.io_size[2]
        if size <= 0 or size & (size - 1):
            return None
        view = HvVdevView(spec, "ivshmem", IVSHMEM_VECTORS,
                          {0: (IVSHMEM_MMIO_SIZE, 0), 1: (MSIX_BAR_SIZE, 0), 2: (size, 0xC)})
        view._put(0x00, 4, IVSHMEM_IDS[0] | IVSHMEM_IDS[1] << 16)
        view._put(0x08, 4, 0x05000001)  # class 05 (memory), revision 1
        view._put(0x0E, 1, 0x80 if spec.bdf & 7 == 0 else 0)  # as the hypervisor sets it
        view._put(0x2C, 2, 0x8086)
        view.regs[8:12] = vm_id.to_bytes(4, "little")  # IVPosition: the VM's id
        name = spec.args.split(b"\0", 1)[0].decode(errors="replace")
        view.memory = shm_region(name, size)
        return view
    if ids == MCS9900_IDS:
        view = VuartView(spec, "vuart", 1, {0: (VUART_MMIO_SIZE, 0), 1: (MSIX_BAR_SIZE, 0)})
        view._put(0x00, 4, MCS9900_IDS[0] | MCS9900_IDS[1] << 16)
        view._put(0x08, 4, 0x07000200)  # class 07 (communication), 00, prog-if 02
        view._put(0x2C, 4, 0x1000A000)  # subsystem vendor A000, device 1000
        return view
    return None


__all__ = ["HvVdevView", "IVSHMEM_IDS", "MCS9900_IDS", "VuartView",
           "shm_region", "view_for"]
