"""``--ovmf [w,]<path>`` or ``--ovmf [w,]code=<path>,vars=<path>``: UEFI firmware that
ends at 4 GiB, started at the reset vector (acrn-facts §3.3).

The firmware lives in its own 2 MiB memfd region [4 GiB − 2 MiB, 4 GiB), handed to the
hypervisor with SET_MEMSEG like RAM (acrn-dm maps its BIOS region the same way).  A split
image is VARS then CODE, ending at 4 GiB.  ``w,`` writes the variable store back to its
file when the VM stops or resets.  acrn-dm also leaves an e820 copy for the firmware at
0xEF000 ("820\\0", count, entries).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct

from ..config import ConfigError, OvmfConfig
from ..hsm import abi
from ..hsm.base import Hypervisor, VcpuRegs
from ..memory import GiB, GuestMemory, KiB, MiB, RamRegion
from .loader_common import e820_bytes, read_image, write_guest

FIRMWARE_SIZE = 2 * MiB
FIRMWARE_BASE = 4 * GiB - FIRMWARE_SIZE
OVMF_LIMIT = 2 * MiB
VARS_LIMIT = 128 * KiB
CODE_LIMIT = OVMF_LIMIT - VARS_LIMIT
E820_COPY = 0xEF000
RESET_VECTOR = 4 * GiB - 16


class OvmfFirmware:
    """The firmware region of one VM and where its variable store came from."""

    def __init__(self, memory: GuestMemory, hv: Hypervisor, cfg: OvmfConfig) -> None:
        self.cfg = cfg
        self.memory = memory
        self.hv = hv
        self.region: RamRegion | None = None
        self.vars_at: int | None = None
        self.vars_len = 0

    def _images(self) -> list[tuple[str, bytes]]:
        """(path, bytes) in guest order, lowest address first."""
        cfg = self.cfg
        if cfg.vars is None:
            return [(cfg.code, read_image(cfg.code, "--ovmf", limit=OVMF_LIMIT))]
        vars_ = read_image(cfg.vars, "--ovmf vars=", limit=VARS_LIMIT)
        code = read_image(cfg.code, "--ovmf code=", limit=CODE_LIMIT)
        return [(cfg.vars, vars_), (cfg.code, code)]

    def _map(self) -> RamRegion:
        if self.region is not None:
            return self.region
        fd = os.memfd_create("ovmf", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, FIRMWARE_SIZE)
            mm = mmap.mmap(fd, FIRMWARE_SIZE, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        region = RamRegion(gpa=FIRMWARE_BASE, size=FIRMWARE_SIZE, mm=mm, fd=fd)
        self.memory.add(region)  # GuestMemory.close() releases it with the RAM
        self.hv.set_memseg(FIRMWARE_BASE, mm, abi.MEM_ACCESS_RWX | abi.MEM_TYPE_WB)
        self.region = region
        return region

    def load(self) -> VcpuRegs:
        images = self._images()
        total = sum(len(data) for _, data in images)
        if total > FIRMWARE_SIZE:
            raise ConfigError(f"--ovmf: code and vars together are {total} bytes; at most "
                              f"{FIRMWARE_SIZE} fit below 4 GiB")
        if total % 16:
            raise ConfigError(f"--ovmf {self.cfg.code}: the image size {total} is not a "
                              "multiple of 16, so its reset vector cannot end at 4 GiB")
        self._map()
        addr = 4 * GiB - total
        self.memory.view(FIRMWARE_BASE, FIRMWARE_SIZE)[:] = bytes(FIRMWARE_SIZE)
        for i, (path, data) in enumerate(images):
            write_guest(self.memory, addr, data, f"--ovmf {path}")
            if i == 0:
                self.vars_at = addr
                self.vars_len = len(data) if self.cfg.vars is not None else min(len(data),
                                                                               VARS_LIMIT)
            addr += len(data)
        table = self.memory.e820()
        write_guest(self.memory, E820_COPY,
                    b"820\0" + struct.pack("<I", len(table)) + e820_bytes(table),
                    "the firmware's e820 copy")
        return VcpuRegs(
            rip=RESET_VECTOR & 0xFFFF,
            rflags=0x2,
            cr0=0x30,  # ET | NE, real mode
            cs_sel=0xF000,
            cs_base=RESET_VECTOR & 0xFFFF_0000,
            cs_limit=0xFFFF,
            cs_ar=0x009F,
        )

    def writeback(self) -> None:
        """Store the guest's variable store into its file (``w,`` only)."""
        if not self.cfg.writeback or self.vars_at is None or self.region is None:
            return
        path = self.cfg.vars or self.cfg.code
        try:
            data = self.memory.read(self.vars_at, self.vars_len)
            with open(path, "r+b") as f:
                f.write(data)
        except (OSError, ValueError) as e:
            logging.getLogger(__name__).error("OVMF variable write-back to %s failed: %s",
                                              path, e)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writeback()
