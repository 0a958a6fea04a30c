"""acrn-dm's options for real-time VMs and platform-device passthrough, parsed as acrn-dm
parses them: ``--intr_monitor``, ``--mmiodev_pt``, ``--acpidev_pt`` (``--rtvm`` and
``--lapic_pt`` are plain flags). Both front ends use these parsers; one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

#: acrn-dm's MAX_MMIO_DEV_NUM: --mmiodev_pt and --acpidev_pt devices together
MAX_MMIO_DEVS = 2
#: the ACPI devices acrn-dm can pass through (tpm.c's is_hid_tpm2_device)
ACPI_PT_HIDS = ("MSFT0101",)
U32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class IntrMonitor:
    """``--intr_monitor <threshold/s>,<period s>,<delay ms>,<duration ms>``: every period,
    ask the hypervisor for the passthrough interrupt counts; when one grew by more than
    threshold × period, delay its injections by ``delay_ms`` for ``duration_ms``."""

    threshold: int
    period: int
    delay_ms: int
    duration_ms: int

    def to_arg(self) -> str:
        return f"{self.threshold},{self.period},{self.delay_ms},{self.duration_ms}"


@dataclass(frozen=True)
class MmioDevPt:
    """``--mmiodev_pt <base>,<size>`` (hex): a host MMIO range given to the guest."""

    base: int
    size: int

    def to_arg(self) -> str:
        return f"{self.base:#x},{self.size:#x}"


@dataclass(frozen=True)
class AcpiDevPt:
    """``--acpidev_pt <HID>[,<UID>]``: an ACPI platform device (the TPM) given to the guest."""

    hid: str
    uid: int = 0

    def to_arg(self) -> str:
        return f"{self.hid},{self.uid:02x}"


def parse_intr_monitor(text: str) -> IntrMonitor:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and int(p) <= U32 for p in parts):
        raise ConfigError(f"--intr_monitor {text}: write <threshold per second>,<period s>,"
                          "<delay ms>,<duration ms>, e.g. --intr_monitor 10000,10,1,100")
    threshold, period, delay, duration = (int(p) for p in parts)
    if period == 0:
        raise ConfigError(f"--intr_monitor {text}: a probe period of 0 s would poll the "
                          "hypervisor without pause; give at least 1")
    return IntrMonitor(threshold, period, delay, duration)


def _hex(text: str) -> int | None:
    body = text[2:] if text[:2].lower() == "0x" else text
    if not body or not all(c in "0123456789abcdefABCDEF" for c in body):
        return None
    return int(body, 16)


def parse_mmiodev_pt(text: str) -> MmioDevPt:
    base_text, _, size_text = text.partition(",")
    base, size = _hex(base_text), _hex(size_text)
    if base is None or size is None:
        raise ConfigError(f"--mmiodev_pt {text}: write <base>,<size> in hex, e.g. "
                          "--mmiodev_pt 0xFED40000,0x00005000")
    if not size or base % 4096 or size % 4096 or base + size > 1 << 52:
        raise ConfigError(f"--mmiodev_pt {text}: base and size must be whole 4 KiB pages "
                          "(and the size not 0)")
    return MmioDevPt(base, size)


def parse_acpidev_pt(text: str) -> AcpiDevPt:
    hid, _, uid_text = text.partition(",")
    if hid not in ACPI_PT_HIDS:
        raise ConfigError(f"--acpidev_pt {text}: unsupported ACPI device {hid!r}; acrn-dm "
                          f"(and acrn-pydm) pass through {', '.join(ACPI_PT_HIDS)} (TPM 2.0)")
    uid = _hex(uid_text) if uid_text else 0
    if uid is None or uid > 0xFF:
        raise ConfigError(f"--acpidev_pt {text}: the UID is the device's instance in hex, "
                          "e.g. MSFT0101,00")
    return AcpiDevPt(hid, uid)


__all__ = ["ACPI_PT_HIDS", "AcpiDevPt", "IntrMonitor", "MAX_MMIO_DEVS", "MmioDevPt",
           "parse_acpidev_pt", "parse_intr_monitor", "parse_mmiodev_pt"]
