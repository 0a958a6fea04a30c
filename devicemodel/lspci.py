"""``acrn-pydm lspci [acrn-dm options] <vm name>``: the VM's PCI functions as
``lspci -xxxx`` text, so the real ``lspci -F <file> -vvv`` decodes what a guest sees.

The VM is built on the sim hypervisor (nothing is started, no guest runs) from the same
options a real launch takes; every function's 4 KiB config space is read through the
bus exactly as guest config cycles are answered.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from . import __version__
from .config import ConfigError, HelpRequested, VersionRequested, parse_args
from .hsm.base import HypervisorError
from .pci.bus import PciBus

USAGE = "usage: acrn-pydm lspci [acrn-dm options] <vm name>\n"


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
    from .hsm.sim import SimHypervisor
    from .vm import Vm
    from .vmcheck import check_vm

    try:
        cfg = parse_args(list(args))
        check_vm(cfg)
        cfg.hv = "sim"
        vm = Vm(cfg, SimHypervisor(cfg.vcpus))
        vm.build()
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
        assert vm.pci is not None
        dump(vm.pci, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        vm._release()  # build without run: give back what build took
    return 0
