"""Which interrupt remapper a passthrough device gets: the one its backend supplies.

The remappers themselves are the backend's (``hsm/sim_remap.py`` for the sim,
``irq.remap.IrqfdRemapper`` for KVM/VFIO); on ACRN the hypervisor remaps and there is
none. The context carries the factory; these helpers name what is missing when it is
absent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hsm.base import InterruptRemapper
from ..irq.remap import kernel_programs_msi
from .host import HostPciDevice, PassthroughError

if TYPE_CHECKING:
    from ..context import DeviceContext


def remapping_missing(ctx: DeviceContext) -> str | None:
    """Why this backend cannot remap a passthrough device's MSI, or None if it can."""
    if ctx.remapper is not None:
        return None
    return f"the {ctx.backend} backend offers no interrupt remapping (needs the sim remap " \
        "table or irqfd)"


def kernel_owns_msi(ctx: DeviceContext) -> bool:
    """Whether the host kernel programs the devices' MSI on this backend (VFIO with irqfd
    routes), so the device model must never write the capability."""
    return ctx.remapper is not None and kernel_programs_msi(ctx.remapper)


def remapper_for(ctx: DeviceContext, host: HostPciDevice, count: int) -> InterruptRemapper:
    """The backend's remapper for ``count`` messages of ``host``."""
    if ctx.remapper is None:
        raise PassthroughError(f"passthru {host.name}: {remapping_missing(ctx)}")
    return ctx.remapper(host, count)


__all__ = ["kernel_owns_msi", "remapper_for", "remapping_missing"]
