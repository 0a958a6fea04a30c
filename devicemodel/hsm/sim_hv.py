"""The parts of the simulated hypervisor that answer the guest or the device model without
the device model's request loop: devices the hypervisor emulates itself (CREATE_VDEV),
memory mapped into the guest (EPT: an access to a mapped range never exits), MMIO device
passthrough, the interrupt storm monitor's counters and the CPU power-state data.

sim.py asks ``SimHvSide.emulate`` about every guest access before it posts a request; an
answer means the hypervisor handled it, as ACRN's does for its own vdevs and EPT-mapped
memory, and the device model never sees it.
"""

from __future__ import annotations

import errno
import mmap
import struct

from ..memory import MemoryMap
from . import abi
from .base import HypervisorError, MmioDevAssignment, VdevSpec
from .hv_vdevs import HvVdevView, view_for

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
ECAM_BASE, ECAM_END = 0xE000_0000, 0xF000_0000


class SimHvSide:
    """State the simulated hypervisor keeps besides requests and interrupts."""

    def __init__(self) -> None:
        #: the hypervisor's own PCI functions, by BDF (bus << 8 | dev << 3 | func)
        self.vdevs: dict[int, HvVdevView] = {}
        self.mmiodevs: list[MmioDevAssignment] = []
        #: answers to PM_GET_CPU_STATE: packed acrn_pstate_data / acrn_cstate_data entries
        self.px: list[bytes] = []
        self.cx: list[bytes] = []
        #: VM_INTR_MONITOR: (physical irq, count) pairs it reports; delays it was asked for
        self.intr_counts: list[tuple[int, int]] = []
        self.intr_delays: list[int] = []
        self._cf8 = 0

    def reset(self) -> None:
        self.vdevs.clear()
        self.mmiodevs.clear()
        self._cf8 = 0

    # --- the HSM calls ------------------------------------------------------------------
    def create_vdev(self, spec: VdevSpec) -> None:
        view = view_for(spec)
        if view is None or spec.bdf in self.vdevs:
            raise HypervisorError(f"CREATE_VDEV {spec.vendor:04x}:{spec.device:04x} at "
                                  f"{spec.bdf:#x}: the hypervisor cannot create it",
                                  errno.EINVAL)
        self.vdevs[spec.bdf] = view

    def destroy_vdev(self, spec: VdevSpec) -> None:
        if self.vdevs.pop(spec.bdf, None) is None:
            raise HypervisorError(f"DESTROY_VDEV at {spec.bdf:#x}: no such device", errno.EINVAL)

    def assign_mmiodev(self, dev: MmioDevAssignment) -> None:
        if any(d.name == dev.name for d in self.mmiodevs):
            raise HypervisorError(f"ASSIGN_MMIODEV {dev.name}: already assigned", errno.EEXIST)
        self.mmiodevs.append(dev)

    def deassign_mmiodev(self, dev: MmioDevAssignment) -> None:
        self.mmiodevs = [d for d in self.mmiodevs if d.name != dev.name]

    def intr_monitor(self, page: mmap.mmap) -> None:
        cmd, buf_cnt = struct.unpack_from("<II", page)
        if cmd == abi.INTR_CMD_GET_DATA:
            words = [w for pair in self.intr_counts for w in pair][:min(buf_cnt, 48)]
            struct.pack_into(f"<I{len(words)}Q", page, 4, len(words), *words)
        elif cmd == abi.INTR_CMD_DELAY_INT:
            self.intr_delays.append(struct.unpack_from("<Q", page, 8)[0])
        else:
            raise HypervisorError(f"VM_INTR_MONITOR: bad command {cmd}", errno.EINVAL)

    def pm_get_cpu_state(self, cmd: int, size: int, vcpus: int) -> bytes:
        kind, state, vcpu = cmd & 0xFF, (cmd >> 8) & 0xFF, (cmd >> 16) & 0xFF
        if vcpu >= vcpus:
            raise HypervisorError("PM_GET_CPU_STATE: no such vCPU", errno.EINVAL)
        if kind in (abi.PMCMD_GET_PX_CNT, abi.PMCMD_GET_CX_CNT):
            count = len(self.px if kind == abi.PMCMD_GET_PX_CNT else self.cx)
            return struct.pack("<Q", count).ljust(size, b"\0")[:size]
        table, first = (self.px, 0) if kind == abi.PMCMD_GET_PX_DATA else (self.cx, 1)
        if kind not in (abi.PMCMD_GET_PX_DATA, abi.PMCMD_GET_CX_DATA) or \
                not first <= state < first + len(table):
            raise HypervisorError("PM_GET_CPU_STATE: no such state", errno.EINVAL)
        return table[state - first].ljust(size, b"\0")[:size]

    # --- guest accesses the hypervisor answers itself ----------------------------------
    def emulate(self, rtype: int, direction: int, address: int, size: int, value: int,
                ram: MemoryMap) -> int | None:
        """The value a guest access gets when the hypervisor handles it, else None (the
        access goes on to the HSM and the device model)."""
        write = direction == abi.IOREQ_DIR_WRITE
        if rtype == abi.IOREQ_TYPE_PORTIO:
            return self._pio(address, size, value, write)
        if rtype != abi.IOREQ_TYPE_MMIO:
            return None
        if ECAM_BASE <= address < ECAM_END and self.vdevs:
            bdf = (address - ECAM_BASE) >> 12
            view = self.vdevs.get(bdf)
            if view is not None:
                return self._cfg(view, address & 0xFFF, size, value, write)
        for view in self.vdevs.values():
            hit = view.bar_at(address, size)
            if hit is not None:
                if write:
                    view.mmio_write(hit[0], hit[1], size, value)
                    return 0
                return view.mmio_read(hit[0], hit[1], size)
        return self._ept(ram, address, size, value, write)

    def _pio(self, port: int, size: int, value: int, write: bool) -> int | None:
        if port == CONFIG_ADDRESS and size == 4 and write:
            self._cf8 = value
            return 0 if self._cf8_vdev() is not None else None
        if CONFIG_DATA <= port < CONFIG_DATA + 4:
            view = self._cf8_vdev()
            if view is not None:
                reg = (self._cf8 & 0xFC) | ((self._cf8 >> 16) & 0xF00)
                return self._cf8_access(view, reg + port - CONFIG_DATA, size, value, write)
        return None

    def _cf8_vdev(self) -> HvVdevView | None:
        if not self._cf8 & 0x8000_0000 or not self.vdevs:
            return None
        return self.vdevs.get((self._cf8 >> 8) & 0xFFFF)

    def _cf8_access(self, view: HvVdevView, reg: int, size: int, value: int,
                    write: bool) -> int:
        return self._cfg(view, reg, size, value, write)

    @staticmethod
    def _cfg(view: HvVdevView, reg: int, size: int, value: int, write: bool) -> int:
        if write:
            view.cfg_write(reg, size, value)
            return 0
        return view.cfg_read(reg, size)

    @staticmethod
    def _ept(ram: MemoryMap, address: int, size: int, value: int, write: bool) -> int | None:
        """Memory the hypervisor maps into the guest is read and written, never trapped
        (RAM, an ivshmem region the device model mapped with SET_MEMSEG)."""
        if size not in (1, 2, 4, 8) or not ram.contains(address, size):
            return None
        view = ram.view(address, size)
        if write:
            view[:] = value.to_bytes(size, "little")
            return 0
        return int.from_bytes(view, "little")


__all__ = ["SimHvSide"]
