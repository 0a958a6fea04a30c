"""The VM description: plain data that both front ends (acrn-dm's command line and the TOML
VM file) fill, and that assembly reads to build the VM.

Nothing here parses text or touches devices; the few derived values that need a host fact
(the pCPUs behind ``--cpu_affinity``) ask devicemodel.hostinfo, at the bottom of the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..hostinfo import host_lapic_ids
from ..memory import GiB, KiB, MiB
from ..slot import SlotConfig
from .rt_options import AcpiDevPt, IntrMonitor, MmioDevPt

DEFAULT_MEMSIZE = 256 * MiB
HYPERVISORS = ("acrn", "kvm", "sim")
VM_NAME_MAX = 15  # acrn-dm: MAX_VM_NAME_LEN 16 including the NUL
DEFAULT_SHUTDOWN_TIMEOUT = 60.0
#: seconds a monitor client may stay without completing a request (0: no limit)
DEFAULT_MONITOR_IDLE_TIMEOUT = 30.0
LPC_DEVICES = ("com1", "com2", "com3", "com4", "com5")


@dataclass(frozen=True)
class LpcConfig:
    """One ``-l`` option: an LPC device such as ``com1,stdio``.

    ``backend`` is everything after the first comma for COM1-COM4 (acrn-dm hands it to the
    UART backend whole); COM5 has ``<backend>,<port>,<irq>`` and ``extra`` = (port, irq).
    """

    device: str
    backend: str = ""
    extra: tuple[str, ...] = ()

    def to_arg(self) -> str:
        return ",".join([self.device, *([self.backend] if self.backend or self.extra else []),
                         *self.extra])


@dataclass(frozen=True)
class OvmfConfig:
    """``--ovmf``: one OVMF.fd, or a CODE/VARS pair; ``writeback`` keeps variable changes."""

    code: str
    vars: str | None = None
    writeback: bool = False

    def to_arg(self) -> str:
        prefix = "w," if self.writeback else ""
        if self.vars is None:
            return f"{prefix}{self.code}"
        return f"{prefix}code={self.code},vars={self.vars}"


@dataclass
class VmConfig:
    """One user VM as the user described it (see docs/vm-toml.md for every field)."""

    name: str = ""
    memsize: int = DEFAULT_MEMSIZE
    cpu_affinity: list[int] = field(default_factory=list)
    slots: list[SlotConfig] = field(default_factory=list)
    lpc: list[LpcConfig] = field(default_factory=list)
    kernel: str | None = None
    bootargs: str | None = None
    ramdisk: str | None = None
    elf: str | None = None
    ovmf: OvmfConfig | None = None
    debugexit: bool = False
    virtio_poll: int | None = None
    virtio_msi: bool = False
    windows: bool = False
    cmd_monitor: str | None = None
    logger_setting: str | None = None
    #: a real-time VM (``--rtvm``; acrn-dm then passes the local APIC through too)
    rtvm: bool = False
    #: ``--lapic_pt`` as given; it takes effect only with ``rtvm`` (acrn-dm's rule)
    lapic_pt: bool = False
    intr_monitor: IntrMonitor | None = None
    mmiodev_pt: list[MmioDevPt] = field(default_factory=list)
    acpidev_pt: list[AcpiDevPt] = field(default_factory=list)
    hv: str | None = None
    #: seconds a guest gets to power off after SIGTERM/``poweroff`` before it is destroyed
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    #: seconds a monitor client may go without completing a request before it is closed
    monitor_idle_timeout: float = DEFAULT_MONITOR_IDLE_TIMEOUT
    #: what the parser ignored on purpose (obsolete acrn-dm options); logged at start
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def vcpus(self) -> int:
        return len(self.cpu_affinity) or 1

    @property
    def pcpus(self) -> list[int]:
        """The physical CPU indexes behind ``cpu_affinity``.

        acrn-dm HEAD takes LAPIC ids (what ACRN's launch scripts pass) and maps each to the
        pCPU whose LAPIC it is: the n-th enabled LAPIC of the host MADT is pCPU n. Where the
        MADT cannot be read or does not list an id, the ids are taken as pCPU indexes.
        """
        host = host_lapic_ids()
        if host and all(i in host for i in self.cpu_affinity):
            return [host.index(i) for i in self.cpu_affinity]
        return list(self.cpu_affinity)

    @property
    def cpu_affinity_mask(self) -> int:
        """CREATE_VM's pCPU bitmap."""
        mask = 0
        for cpu in self.pcpus:
            if cpu > 63:
                raise ConfigError(f"--cpu_affinity {','.join(map(str, self.cpu_affinity))}: "
                                  f"pCPU {cpu} is beyond the 64 ACRN supports; pick other CPUs")
            mask |= 1 << cpu
        return mask

    @property
    def vm_flag(self) -> int:
        """CREATE_VM's GUEST_FLAG_* bits, as acrn-dm's vm_create sets them: ``--rtvm``
        (which implies ``--lapic_pt``) gives LAPIC passthrough, RT, I/O completion polling
        and PMU passthrough; ``--lapic_pt`` alone is ignored."""
        if not self.rtvm:
            return 0
        return (1 << 1) | (1 << 4) | (1 << 2) | (1 << 11)

    def slot(self, bus: int, dev: int, func: int) -> SlotConfig | None:
        for s in self.slots:
            if (s.bus, s.dev, s.func) == (bus, dev, func):
                return s
        return None

    def to_args(self) -> list[str]:
        """An acrn-dm command line (without the program name) that parses back to self."""
        out: list[str] = []
        if self.hv:
            out += ["--hv", self.hv]
        out += ["-m", format_memsize(self.memsize)]
        if self.cpu_affinity:
            out += ["--cpu_affinity", ",".join(map(str, self.cpu_affinity))]
        for flag, on in (("--windows", self.windows), ("--debugexit", self.debugexit),
                         ("--virtio_msi", self.virtio_msi), ("--rtvm", self.rtvm),
                         ("--lapic_pt", self.lapic_pt)):
            if on:
                out.append(flag)
        if self.ovmf:
            out += ["--ovmf", self.ovmf.to_arg()]
        for opt, val in (("-k", self.kernel), ("-r", self.ramdisk), ("-B", self.bootargs),
                         ("-E", self.elf), ("--cmd_monitor", self.cmd_monitor),
                         ("--logger_setting", self.logger_setting)):
            if val is not None:
                out += [opt, val]
        if self.virtio_poll is not None:
            out += ["--virtio_poll", str(self.virtio_poll)]
        if self.intr_monitor is not None:
            out += ["--intr_monitor", self.intr_monitor.to_arg()]
        for dev in self.mmiodev_pt:
            out += ["--mmiodev_pt", dev.to_arg()]
        for adev in self.acpidev_pt:
            out += ["--acpidev_pt", adev.to_arg()]
        if self.shutdown_timeout != DEFAULT_SHUTDOWN_TIMEOUT:
            out += ["--shutdown_timeout", f"{self.shutdown_timeout:g}"]
        if self.monitor_idle_timeout != DEFAULT_MONITOR_IDLE_TIMEOUT:
            out += ["--monitor_idle_timeout", f"{self.monitor_idle_timeout:g}"]
        for lpc in self.lpc:
            out += ["-l", lpc.to_arg()]
        for s in self.slots:
            out += ["-s", s.to_arg()]
        out.append(self.name)
        return out


def format_memsize(size: int) -> str:
    """The shortest acrn-dm spelling of a byte count (``4G``, ``4096M`` is ``4G``)."""
    for unit, mult in (("G", GiB), ("M", MiB), ("K", KiB)):
        if size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{size}B"


__all__ = [
    "DEFAULT_MEMSIZE", "DEFAULT_MONITOR_IDLE_TIMEOUT", "DEFAULT_SHUTDOWN_TIMEOUT", "HYPERVISORS",
    "LPC_DEVICES", "VM_NAME_MAX",
    "LpcConfig", "OvmfConfig", "SlotConfig", "VmConfig", "format_memsize",
]
