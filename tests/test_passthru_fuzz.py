"""Random guest accesses to the vMSI-X capability, table and PBA never raise, never
unmask a vector the guest masked, and never deliver anything but the entry's message."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running

SLOT = 5
CAP = 0x50
N = 4

offsets_cfg = st.one_of(st.integers(CAP - 4, CAP + 0x1C), st.just(0x04), st.integers(0, 0xFF))
offsets_bar = st.one_of(st.integers(0, N * 16 + 8), st.integers(0x7F8, 0x810),
                        st.integers(0, 0xFFF))
op = st.one_of(
    st.tuples(st.just("cfg"), offsets_cfg, st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("ctrl"), st.just(CAP + 2), st.just(2),
              st.sampled_from([0, 0x4000, 0x8000, 0xC000, 0xFFFF])),
    st.tuples(st.just("bar"), offsets_bar, st.sampled_from([1, 2, 4, 8]),
              st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("vctrl"), st.integers(0, N - 1), st.just(4), st.integers(0, 1)),
    st.tuples(st.just("read"), offsets_bar, st.sampled_from([1, 2, 4, 8]), st.just(0)),
    st.tuples(st.just("fire"), st.integers(0, N - 1), st.just(0), st.just(0)),
    # what a driver does to get vector k going: enable, program entry k, unmask it
    st.tuples(st.just("linux"), st.integers(0, N - 1), st.just(0), st.integers(0x20, 0xFF)),
)


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


def check(dev, host, cap_ro) -> None:
    ctrl = dev.cfg.get16(CAP + 2)
    assert ctrl & 0x3FFF == N - 1
    assert bytes(dev.cfg.data[CAP : CAP + 2] + dev.cfg.data[CAP + 4 : CAP + 12]) == cap_ro
    assert dev.cfg.data[CAP + 12 : CAP + 24] == bytes(12)
    phys_mask = host.msi.mask
    for k in range(N):
        _, _, masked = dev.vmsix.entry(k)
        if masked or ctrl & 0x4000 or not ctrl & 0x8000:
            assert phys_mask >> k & 1, f"vector {k} unmasked on the device"
