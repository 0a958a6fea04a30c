"""A VM with every emulated device we have, built on the sim backend but not run: fuzz
targets drive its buses and PCI functions synchronously, so one build serves thousands of
inputs. ``reset_vm`` brings the devices back to power-on between inputs."""

from __future__ import annotations

import os
import tempfile

from devicemodel.config import parse_args
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import Vm

_TMP = tempfile.mkdtemp(prefix="acrn-fuzz-")
IMAGE = os.path.join(_TMP, "disk.img")
CONSOLE_OUT = os.path.join(_TMP, "console.out")

SLOTS = (
    "0:0,hostbridge",
    "3,dummy",
    f"4,virtio-blk,{IMAGE}",
    "5,virtio-rnd,transitional",
    f"6,virtio-console,@file:con0={CONSOLE_OUT}",
    f"7,virtio-blk,{IMAGE},modern,pio_notify",
    "8,passthru,sim:4,vmsix_on_msi",  # synthetic host device, config virtualized by us
    "9,passthru,sim:2",
    "31,lpc",
)


def build_vm(*extra_slots: str) -> tuple[Vm, SimHypervisor]:
    with open(IMAGE, "wb") as f:
        f.truncate(1 << 20)
    args = ["-m", "128M", "-l", "com1,stdio"]
    for s in (*SLOTS, *extra_slots):
        args += ["-s", s]
    sim = SimHypervisor()
    vm = Vm(parse_args([*args, "fuzzvm"]), sim)
    vm.build()
    return vm, sim


def reset_vm(vm: Vm) -> None:
    assert vm.pci is not None
    vm.pci.reset()
