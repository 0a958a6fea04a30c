"""Platform (non-PCI) devices passed through with ASSIGN_MMIODEV, as acrn-dm's
hw/mmio/core.c and tpm.c do it:

- ``--mmiodev_pt <base>,<size>``: the host range, named "MMIODEV", shown to the guest at a
  guest address taken from [0xF0000000, 0xFE000000) (aligned to its size);
- ``--acpidev_pt MSFT0101[,<uid>]``: the host's TPM 2.0 (CRB). Its buffer is the
  ``MSFT0101:<uid>`` range of /proc/iomem, identity mapped; the host's TPM2 ACPI table
  must say start method 6 or 7 (CRB) and put the control area inside that buffer; its
  event log, when it has one, is shown at an address from the same window. The guest
  gets a ``\\_SB.TPM`` device and a TPM2 table (platform/acpi.py).

Everything is read from the host when the VM is built; a missing TPM is one line.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from ..config import VmConfig
from ..errors import ConfigError
from ..hsm.base import Hypervisor, HypervisorError, MmioDevAssignment, MmioResource

log = logging.getLogger(__name__)

MMIO_DEV_BASE = 0xF000_0000
MMIO_DEV_LIMIT = 0xFE00_0000
PAGE = 4096
#: where the host says what it has (module constants so tests can point them at files)
PROC_IOMEM = "/proc/iomem"
TPM2_TABLE = "/sys/firmware/acpi/tables/TPM2"


@dataclass(frozen=True)
class TpmWindow:
    """What the guest's ACPI tables say about a passed-through TPM."""

    base: int
    size: int
    log_length: int = 0
    log_address: int = 0


class GpaWindow:
    """acrn-dm's mmio_dev_alloc_gpa_resource32: size rounded to pages, aligned to itself."""

    def __init__(self) -> None:
        self.next = MMIO_DEV_BASE

    def take(self, size: int, what: str) -> int:
        size = -(-size // PAGE) * PAGE
        base = -(-self.next // size) * size if size & (size - 1) == 0 else \
            -(-self.next // PAGE) * PAGE
        if base + size > MMIO_DEV_LIMIT:
            raise ConfigError(f"{what}: no room left in the guest's MMIO device window "
                              f"[{MMIO_DEV_BASE:#x}, {MMIO_DEV_LIMIT:#x})")
        self.next = base + size
        return base


def iomem_range(name: str, path: str | None = None) -> tuple[int, int] | None:
    """(start, size) of the first /proc/iomem line that names ``name``."""
    path = path or PROC_IOMEM
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--acpidev_pt: cannot read {path}: {e.strerror}") from None
    for line in lines:
        if name not in line:
            continue
        span = line.split(":", 1)[0].strip()
        start, _, end = span.partition("-")
        try:
            lo, hi = int(start, 16), int(end, 16)
        except ValueError:
            return None
        if lo == hi == 0:
            raise ConfigError(f"--acpidev_pt: {path} shows no addresses to this user; run as "
                              "root")
        return lo, hi - lo + 1
    return None


def host_tpm2_table(path: str | None = None) -> tuple[int, int, int, int]:
    """(control address, start method, log length, log address) of the host's TPM2 table."""
    path = path or TPM2_TABLE
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"--acpidev_pt MSFT0101: the host has no TPM2 ACPI table ({path}: "
                          f"{e.strerror})") from None
    if len(data) < 52 or data[:4] != b"TPM2":
        raise ConfigError(f"--acpidev_pt MSFT0101: {path} is not a TPM2 table")
    control, method = struct.unpack_from("<QI", data, 40)
    log_length, log_address = (struct.unpack_from("<IQ", data, 64) if len(data) >= 76
                               else (0, 0))
    return control, method, log_length, log_address


class MmioDevices:
    """The VM's passed-through platform devices; ``close`` gives them back."""

    def __init__(self, cfg: VmConfig, hv: Hypervisor) -> None:
        self.hv = hv
        self.assigned: list[MmioDevAssignment] = []
        self.tpm: TpmWindow | None = None
        window = GpaWindow()
        wanted: list[MmioDevAssignment] = []
        for dev in cfg.mmiodev_pt:
            gpa = window.take(dev.size, f"--mmiodev_pt {dev.to_arg()}")
            wanted.append(MmioDevAssignment("MMIODEV", (MmioResource(gpa, dev.base, dev.size),)))
        for adev in cfg.acpidev_pt:
            wanted.append(self._tpm(f"{adev.hid}:{adev.uid:02x}", window))
        try:
            for assignment in wanted:
                hv.assign_mmiodev(assignment)
                self.assigned.append(assignment)
        except BaseException:
            self.close()
            raise

    def _tpm(self, name: str, window: GpaWindow) -> MmioDevAssignment:
        found = iomem_range(name)
        if found is None:
            raise ConfigError(f"--acpidev_pt {name.replace(':', ',')}: the host has no such "
                              f"ACPI device in {PROC_IOMEM}; check the HID and UID")
        base, size = found
        control, method, log_length, log_address = host_tpm2_table()
        if method not in (6, 7):
            raise ConfigError(f"--acpidev_pt: the host TPM's start method {method} is not "
                              "CRB (6 or 7); only a CRB TPM can be passed through")
        if not base <= control <= base + size:
            raise ConfigError(f"--acpidev_pt: the host TPM's control area {control:#x} is "
                              f"outside its buffer {base:#x}+{size:#x}")
        if MMIO_DEV_BASE <= control <= MMIO_DEV_LIMIT:
            raise ConfigError("--acpidev_pt: the host TPM's buffer lies in the guest's MMIO "
                              "device window; acrn-dm cannot pass it through either")
        res = [MmioResource(base, base, size)]
        log_gpa = 0
        if log_length and log_address:
            log_gpa = window.take(log_length, "--acpidev_pt")
            res.append(MmioResource(log_gpa, log_address, log_length))
        self.tpm = TpmWindow(base, size, log_length if log_gpa else 0, log_gpa)
        return MmioDevAssignment("MSFT0101", tuple(res))

    def close(self) -> None:
        while self.assigned:
            dev = self.assigned.pop()
            try:
                self.hv.deassign_mmiodev(dev)
            except HypervisorError as e:
                log.warning("DEASSIGN_MMIODEV %s failed: %s", dev.name, e)


__all__ = ["MMIO_DEV_BASE", "MmioDevices", "PROC_IOMEM", "TPM2_TABLE", "TpmWindow",
           "host_tpm2_table", "iomem_range"]
