"""Hypothesis: a guest writing anything, of any size, anywhere in the transport's registers
(common cfg, ISR, device cfg, notify, legacy BAR0, PIO notify, MSI-X table, the PCI_CFG
window) never makes a handler raise, never stops the device model, and leaves a function
that a well-behaved driver can reset and use again."""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running
from tests.support.pci_guest import PciGuest
from tests.support.virtio_pci_driver import VirtioPciDriver, blk_read

# (region, offsets worth hitting); region "bar4" offsets are inside the 16 KiB BAR
_INTERESTING = {
    "bar4": [0, 4, 8, 12, 16, 18, 20, 21, 22, 24, 26, 28, 30, 32, 36, 40, 44, 48, 52, 56,
             0x1000, 0x2000, 0x2001, 0x2008, 0x3000, 0x3004, 0x3008, 0x3FFC],
    "bar0": [0, 4, 8, 12, 14, 16, 18, 19, 20, 22, 24, 28, 60, 80],
    "bar2": [0, 1, 2],
    "bar1": [0, 4, 8, 12, 16, 28, 0x1000],
    "pcicfg": [4, 8, 12, 16],
}
_SIZES = {"bar4": [1, 2, 4, 8], "bar1": [1, 2, 4, 8], "bar0": [1, 2, 4], "bar2": [1, 2, 4],
          "pcicfg": [1, 2, 4]}

_values = st.one_of(st.integers(0, 3), st.sampled_from([0xF, 0xFF, 0xFFFF, 0x8000, 0xFFFF_FFFF,
                                                        0x1000, 0x10_0000]),
                    st.integers(0, 2**64 - 1))


@st.composite
def _op(draw: st.DrawFn) -> tuple[str, int, int, int, bool]:
    region = draw(st.sampled_from(sorted(_INTERESTING)))
    off = draw(st.one_of(st.sampled_from(_INTERESTING[region]), st.integers(0, 0x3FFF)))
    size = draw(st.sampled_from(_SIZES[region]))
    return region, off, size, draw(_values), draw(st.booleans())


async def _replay(img: Path, mode: str, ops: list[tuple[str, int, int, int, bool]],
                  caplog_records: list[logging.LogRecord]) -> None:
    sim = SimHypervisor()
    async with running(["-m", "256M", "-s", f"3,virtio-blk,{img},{mode},pio_notify", "vm1"],
                       hypervisor=sim) as vm:
        pci = PciGuest(sim.guest(0))
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        g = pci.g
        bars = {b.idx: b for b in drv.fn.bars}
        pcicfg = drv.caps[5].pos
        for region, off, size, value, write in ops:
            if region == "pcicfg":
                reg = pcicfg + (off & ~(size - 1))
                if write:
                    await pci.write(drv.bdf, reg, size, value & ((1 << 8 * size) - 1))
                else:
                    await pci.read(drv.bdf, reg, size)
                continue
            bar = bars.get(int(region[-1]))
            if bar is None:
                continue
            addr = bar.addr + off % bar.size
            if bar.io:
                addr = bar.addr + off % min(bar.size, 0x10000)
                await (g.pio_write(addr, size, value) if write else g.pio_read(addr, size))
            else:
                await (g.mmio_write(addr, size, value) if write else g.mmio_read(addr, size))
        await trio.sleep(0.005)  # let the device chew on whatever rings that made
        assert vm.server is not None and vm.server.stats["handler_error"] == 0
        # the function is still usable: reset and do one read
        drv2 = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        await drv2.init()
        q = await drv2.setup_queue(0)
        await drv2.driver_ok()
        h = blk_read(q, 0, 512)
        await drv2.kick(0)
        assert await drv2.wait_used(0) == [(h, 513)]
    bad = [r for r in caplog_records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(_op(), max_size=40), mode=st.sampled_from(["modern", "transitional"]))
def test_random_register_traffic_never_breaks_the_transport(
        tmp_path: Path, caplog, ops: list, mode: str) -> None:  # noqa: ANN001
    img = tmp_path / "f.img"
    if not img.exists():
        img.write_bytes(bytes(64 * 1024))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trio.run(_replay, img, mode, ops, caplog.records)
