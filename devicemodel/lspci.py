"""``acrn-pydm lspci [acrn-dm options] <vm name>``: the VM's PCI functions as
``lspci -xxxx`` text, so the real ``lspci -F <file> -vvv`` decodes what a guest sees.

No VM and no backend: the functions are built from the same options a real launch takes,
through the same assembly (``vmm.vm.build_functions``), on a context of their own
(``context.standalone``: interrupts go nowhere, nothing runs), and every function's 4 KiB
config space is read through the bus exactly as guest config cycles are answered. A
passthrough device shows its guest view without anything being written to it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TextIO

from . import __version__
from .bus import MmioBus, PortBus
from .config import ConfigError, HelpRequested, VersionRequested, parse_args
from .context import standalone
from .hsm.base import (
    HypervisorError,
    InterruptRemapper,
    MessageSource,
    PciDevAssignment,
    PtdevIntx,
    VdevSpec,
)
from .irq.services import NoInterrupts
from .pci.bus import PciBus

USAGE = "usage: acrn-pydm lspci [acrn-dm options] <vm name>\n"


class Preview:
    """The hypervisor calls of a VM that only shows itself: the device model owns the
    guest view, no real device's interrupts or DMA reach anything, nothing is assigned,
    mapped or created (a hypervisor-emulated device shows what the hypervisor would)."""

    emulates_passthrough_config = False
    reaches_host_devices = False

    def assign_pcidev(self, dev: PciDevAssignment) -> None:
        raise HypervisorError("lspci: nothing is assigned outside a VM")

    deassign_pcidev = assign_pcidev

    def set_ptdev_intr(self, intx: PtdevIntx) -> None:
        raise HypervisorError("lspci: nothing is assigned outside a VM")

    reset_ptdev_intr = set_ptdev_intr

    # nothing is mapped and no hypervisor device is made: the devices only show themselves
    def set_memseg(self, gpa: int, backing: object, attr: int) -> None:
        pass

    def map_mmio(self, gpa: int, hpa: int, length: int) -> None:
        pass

    def unset_mmio(self, gpa: int, length: int) -> None:
        pass

    def create_vdev(self, vdev: VdevSpec) -> None:
        pass

    destroy_vdev = create_vdev


def _no_remapping(source: MessageSource, count: int) -> InterruptRemapper:
    raise HypervisorError("lspci: no interrupts are delivered outside a VM")


def dump(pci: PciBus, out: TextIO, size: int = 4096) -> None:
    """Write every function in ``lspci -xxxx`` format."""
    for (bus, dev, func), device in pci.functions():
        name = getattr(device, "name", "pci-device")
        out.write(f"{bus:02x}:{dev:02x}.{func:x} {name}\n")
        for row in range(0, size, 16):
            data = bytearray()
            for off in range(row, row + 16, 4):
                data += pci.cfg_read(bus, dev, func, off, 4).to_bytes(4, "little")
            label = f"{row:02x}" if row < 0x100 else f"{row:03x}"
            out.write(f"{label}: {' '.join(f'{b:02x}' for b in data)}\n")
        out.write("\n")


def main(args: list[str]) -> int:
    """Options in any order, as the main command takes them; ``-h``/``-v`` anywhere."""
    if not args:
        sys.stderr.write(USAGE)
        return 2
    from .vmcheck import check_vm
    from .vmm.vm import build_functions, device_choices

    cleanups: list[Callable[[], None]] = []
    try:
        try:
            cfg = parse_args(list(args))
            check_vm(cfg)
            ports, mmio, nothing = PortBus(), MmioBus(), NoInterrupts()
            preview = Preview()
            ctx = standalone(choices=device_choices(cfg), ports=ports, passthrough=preview,
                             remapper=_no_remapping, hypervisor=preview)
            pci = PciBus(ports, mmio, nothing, ovmf=ctx.choices.ovmf)
            build_functions(cfg, ctx, pci, cleanups)
        except HelpRequested:
            sys.stdout.write(USAGE)
            return 0
        except VersionRequested:
            print(f"acrn-pydm {__version__}")
            return 0
        except (ConfigError, HypervisorError) as e:
            print(f"acrn-pydm: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # building opens images and host ends: say which and why
            where = f"{e.filename}: " if e.filename else ""
            print(f"acrn-pydm: error: {where}{e.strerror or e}", file=sys.stderr)
            return 2
        try:
            dump(pci, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        while cleanups:
            cleanups.pop()()
    return 0

