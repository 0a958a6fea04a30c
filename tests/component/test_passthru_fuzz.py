"""Random guest accesses to the vMSI-X capability, table and PBA never raise, never
unmask a vector the guest masked, and never deliver anything but the entry's message."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running
from tests.support.vmsix_ops import CAP, SLOT, N, check, op


async def test_random_accesses_keep_the_guests_masks():
    sim = SimHypervisor()
    args = ["-m", "128M", "-s", f"{SLOT},passthru,sim:{N},vmsix_on_msi", "vm1"]
    async with running(args, hypervisor=sim) as vm:
        dev = vm.passthrough(SLOT)
        host = dev.host
        pci = vm.pci
        bar = dev.bar(1)
        cap_ro = bytes(dev.cfg.data[CAP : CAP + 2] + dev.cfg.data[CAP + 4 : CAP + 12])
        seen = {"delivered": 0, "held": 0}

        @settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(op, max_size=40))
        def run(ops):
            dev.reset()
            sim.msis.clear()
            pci.cfg_write(0, SLOT, 0, 0x04, 2, 0x6)  # memory decode + bus master
            for kind, a, size, value in ops:
                if kind in ("cfg", "ctrl"):
                    pci.cfg_write(0, SLOT, 0, a, size, value & ((1 << 8 * size) - 1))
                    pci.cfg_read(0, SLOT, 0, a & ~(size - 1), size)
                elif kind == "bar":
                    bar.write(a, size, value & ((1 << 8 * size) - 1))
                elif kind == "vctrl":
                    bar.write(16 * a + 12, 4, value)
                elif kind == "read":
                    bar.read(a, size)
                elif kind == "linux":
                    pci.cfg_write(0, SLOT, 0, CAP + 2, 2, 0x8000)
                    bar.write(16 * a, 8, 0xFEE0_0000 | a << 12)
                    bar.write(16 * a + 8, 4, value)
                    bar.write(16 * a + 12, 4, 0)
                else:
                    before = len(sim.msis)
                    host.fire(a)
                    ctrl = dev.cfg.get16(CAP + 2)
                    address, data, masked = dev.vmsix.entry(a)
                    may = ctrl & 0x8000 and not ctrl & 0x4000 and not masked
                    if len(sim.msis) > before:
                        assert may, f"message {a} delivered while masked/disabled"
                        assert sim.msis[-1] == (address, data)
                        seen["delivered"] += 1
                    elif ctrl & 0x8000:
                        seen["held"] += 1
                check(dev, host, cap_ro)

        run()
        assert seen["delivered"] and seen["held"]  # the examples reached both paths

