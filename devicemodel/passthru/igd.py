"""Passthrough of an Intel integrated GPU (GVT-d), as acrn-dm's passthrough.c does it.

The GPU at host 00:02.0 (vendor 8086, class 03) keeps using memory outside its BARs: the
stolen memory (DSM: the BIOS reserves it, BDSM holds its base) and the OpRegion (ASLS
holds its base). acrn-dm

- adds an ISA bridge ``igd-lpc`` at 31:0 with the host LPC bridge's IDs (the GPU's GOP and
  guest driver look there);
- maps the DSM into the guest (gen 11 and later at the same address as on the host, the
  older ones at 0x7C000000) and the OpRegion just below it (0x5000 bytes), through
  SET_MEMSEG MMIO mappings;
- shows the guest BDSM (0x5C; gen 11+: 0xC0/0xC4) and ASLS (0xFC) pointing there, with
  the host's low control bits kept;
- assigns the device with ACRN_PTDEV_QUIRK_ASSIGN, so the hypervisor sends its config
  cycles to the device model, which answers those registers itself.

A passed-through GPU is refused for a real-time VM (acrn-dm: "RTVM doesn't support GVT-D").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..pci import config as pc
from .host import HostPciDevice

log = logging.getLogger(__name__)

#: the refusal of a passed-through GPU in a real-time VM (the validator says it too)
RTVM_REFUSAL = "a real-time VM cannot have a passed-through GPU (acrn-dm: RTVM doesn't " \
    "support GVT-d)"
GPU_DSM_GPA = 0x7C00_0000  # pre-gen-11 guests find the stolen memory here
GPU_OPREGION_SIZE = 0x5000
GGC, BDSM, BDSM_GEN11_LO, BDSM_GEN11_HI, ASLS = 0x50, 0x5C, 0xC0, 0xC4, 0xFC
BDSM_MASK = 0xFFF0_0000
ASLS_MASK = 0xFFFF_F000
IGD_BDF = 0x0010  # 00:02.0
MiB = 1 << 20

#: device-id prefixes of the families before gen 11 (Skylake .. Comet Lake, Apollo/Gemini
#: Lake); everything else is taken as gen 11 or later, as acrn-dm does for ids it lacks
_PRE_GEN11 = {0x19: 9, 0x59: 9, 0x3E: 9, 0x87: 9, 0x9B: 9, 0x5A: 9, 0x31: 9, 0x16: 8,
              0x22: 8}


def is_intel_graphics(host: HostPciDevice) -> bool:
    """acrn-dm's is_intel_graphics_dev: host 00:02.0, vendor 8086, display class."""
    return (host.phys_bdf == IGD_BDF and host.config_read(pc.VENDOR_ID, 2) == 0x8086
            and host.config_read(pc.CLASS_CODE + 2, 1) == 0x03)


def igd_gen(device: int) -> int:
    return _PRE_GEN11.get(device >> 8, 11)


def dsm_size(ggc: int) -> int:
    """The stolen memory size the GGC register's GMS field (15:8) says, 0 if invalid."""
    gms = (ggc >> 8) & 0xFF
    if gms <= 0x10:
        return gms * 32 * MiB
    sizes = {0x20: 1024 * MiB, 0x30: 1536 * MiB, 0x40: 2048 * MiB}
    if gms in sizes:
        return sizes[gms]
    if 0xF0 <= gms <= 0xFE:
        return (gms - 0xF0 + 1) * 4 * MiB
    return 0


@dataclass
class IgdPlan:
    """Where the stolen memory and OpRegion go, and the registers the guest sees."""

    gen: int
    dsm_hpa: int
    dsm_gpa: int
    dsm_size: int
    opregion_hpa: int
    opregion_gpa: int
    #: config offset -> virtual value (4 bytes each)
    regs: dict[int, int] = field(default_factory=dict)

    @property
    def mappings(self) -> list[tuple[int, int, int]]:
        """(gpa, hpa, length) of the two SET_MEMSEG MMIO mappings."""
        return [(self.dsm_gpa, self.dsm_hpa, self.dsm_size),
                (self.opregion_gpa, self.opregion_hpa, GPU_OPREGION_SIZE)]


def plan(host: HostPciDevice) -> IgdPlan | None:
    """acrn-dm's passthru_gpu_dsm_opregion, without side effects; None when the BIOS left
    no stolen memory (acrn-dm then maps nothing)."""
    device = host.config_read(pc.DEVICE_ID, 2)
    gen = igd_gen(device)
    asls = host.config_read(ASLS, 4)
    size = dsm_size(host.config_read(GGC, 2))
    if not size:
        log.error("passthru %s: invalid stolen memory size in GGC; check the DVMT "
                  "pre-allocated option in the BIOS", host.name)
        return None
    if gen >= 11:
        lo = host.config_read(BDSM_GEN11_LO, 4)
        hpa = (lo & BDSM_MASK) | host.config_read(BDSM_GEN11_HI, 4) << 32
        gpa = hpa  # identity: Windows' driver reads the DSM base from a BAR register too
        regs = {BDSM_GEN11_LO: (gpa & BDSM_MASK) | (lo & ~BDSM_MASK & 0xFFFF_FFFF),
                BDSM_GEN11_HI: 0}
    else:
        lo = host.config_read(BDSM, 4)
        hpa, gpa = lo & BDSM_MASK, GPU_DSM_GPA
        regs = {BDSM: gpa | (lo & ~BDSM_MASK & 0xFFFF_FFFF)}
    opregion_gpa = gpa - GPU_OPREGION_SIZE
    regs[ASLS] = (opregion_gpa & 0xFFFF_FFFF) | (asls & ~ASLS_MASK & 0xFFFF_FFFF)
    return IgdPlan(gen, hpa, gpa, size, asls & ASLS_MASK, opregion_gpa, regs)


def host_lpc_config(host: HostPciDevice) -> bytes:
    """The host LPC bridge's config space the igd-lpc copies its IDs from."""
    own = getattr(host, "lpc_config", None)
    if own is not None:  # a synthetic GPU brings its synthetic platform
        return bytes(own)
    from ..pci.igd_lpc import read_host_lpc

    return read_host_lpc()


__all__ = ["GPU_DSM_GPA", "GPU_OPREGION_SIZE", "RTVM_REFUSAL", "IgdPlan", "dsm_size",
           "host_lpc_config", "igd_gen", "is_intel_graphics", "plan"]
