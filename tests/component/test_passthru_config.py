"""The physical device is input too: a malformed capability list or MSI structure from
the hardware ends in one clean PassthroughError, never another exception; and random
guest accesses to a plainly passed-through MSI capability deliver only what the guest
programmed."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.passthru.host import HostBar, HostPciDevice, PassthroughError, SimHostDevice
from devicemodel.passthru.vmsix_on_msi import check_eligible
from devicemodel.vm import running


class BytesDevice(HostPciDevice):
    """A device whose config space is whatever bytes we say."""

    name = "0000:09:00.0"

    def __init__(self, data: bytes, bars: list[HostBar] | None = None) -> None:
        self.data = bytearray(data.ljust(256, b"\0")[:256])
        self._bars = bars or []

    def config_read(self, off: int, size: int) -> int:
        return int.from_bytes(self.data[off : off + size], "little")

    def config_write(self, off: int, size: int, value: int) -> None:
        self.data[off : off + size] = value.to_bytes(size, "little")

    def bars(self) -> list[HostBar]:
        return self._bars

    def reset(self) -> bool:
        return False


def test_looping_capability_list_is_a_clean_error():
    cfg = bytearray(SimHostDevice(4).snapshot())
    cfg[0x69] = 0x40  # the last capability points back to the first
    try:
        check_eligible(BytesDevice(bytes(cfg)))
    except PassthroughError as e:
        assert "capability list" in str(e) and "loops" in str(e)
    else:
        raise AssertionError("a looping list was accepted")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=256), st.integers(0, 5))
def test_random_hardware_config_never_escapes(data, bar):
    cfg = bytearray(data.ljust(256, b"\0"))
    cfg[0x06] |= 0x10  # make the walker look at the list
    try:
        msi, got = check_eligible(BytesDevice(bytes(cfg)), bar)
    except PassthroughError:
        return
    assert msi.maskable and msi.count > 1 and got == bar


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=64, max_size=256))
def test_random_msi_structure_is_sized_safely(tail):
    cfg = bytearray(SimHostDevice(4).snapshot())
    cfg[0x52:0x54] = tail[:2]  # any Message Control the hardware may report
    try:
        msi, _ = check_eligible(BytesDevice(bytes(cfg)))
    except PassthroughError:
        return
    assert msi.offset + msi.regs.length <= 0x68 + 8


MSI = 0x50
op = st.one_of(
    st.tuples(st.just("cfg"), st.integers(MSI - 4, MSI + 0x1C), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("enable"), st.integers(0, 3), st.just(0), st.integers(0, 0xFFFF)),
    st.tuples(st.just("fire"), st.integers(0, 3), st.just(0), st.just(0)),
)


async def test_random_plain_msi_accesses_deliver_only_what_the_guest_programmed():
    sim = SimHypervisor()
    async with running(["-m", "128M", "-s", "5,passthru,sim:4", "vm1"], hypervisor=sim) as vm:
        dev = vm.passthrough(5)
        pci = vm.pci
        seen = {"delivered": 0}

        @settings(max_examples=200, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.lists(op, max_size=30))
        def run(ops):
            dev.reset()
            sim.msis.clear()
            pci.cfg_write(0, 5, 0, 0x04, 2, 0x6)
            for kind, a, size, value in ops:
                if kind == "cfg":
                    size_ok = a & (size - 1) == 0
                    pci.cfg_write(0, 5, 0, a, size, value & ((1 << 8 * size) - 1))
                    if size_ok:
                        pci.cfg_read(0, 5, 0, a, size)
                elif kind == "enable":  # MME = a, data = value, unmasked
                    pci.cfg_write(0, 5, 0, MSI + 4, 4, 0xFEE0_1000)
                    pci.cfg_write(0, 5, 0, MSI + 12, 2, value)
                    pci.cfg_write(0, 5, 0, MSI + 16, 4, 0)
                    pci.cfg_write(0, 5, 0, MSI + 2, 2, a << 4 | 1)
                else:
                    before = len(sim.msis)
                    dev.host.fire(a)
                    ctrl = dev.cfg.get16(MSI + 2)
                    n = 1 << min((ctrl >> 4) & 7, 2)
                    k = a & (n - 1)
                    mask = dev.cfg.get32(MSI + 16)
                    if len(sim.msis) > before:
                        assert ctrl & 1 and not mask >> k & 1
                        address = dev.cfg.get32(MSI + 4) | dev.cfg.get32(MSI + 8) << 32
                        data = (dev.cfg.get16(MSI + 12) & ~(n - 1)) | k
                        assert sim.msis[-1] == (address, data)
                        seen["delivered"] += 1
                assert dev.host.msi.mask == dev.cfg.get32(MSI + 16) or not dev.host.msi.enabled

        run()
        assert seen["delivered"]


PM = 0x40  # the synthetic device's power management capability


async def test_power_state_reads_back_as_written_and_stays_off_the_device():
    """QEMU's vfio client writes D3hot and reads PowerState back before it writes D0: the
    guest's PowerState reads back (D1/D2 only where PMC offers them), the rest of PMCSR
    stays read-only, the physical device stays in D0, a reset gives D0 again."""
    sim = SimHypervisor()
    async with running(["-m", "128M", "-s", "5,passthru,sim:4", "vm1"], hypervisor=sim) as vm:
        dev = vm.passthrough(5)
        pci = vm.pci
        assert pci is not None
        found = pci.cfg_read(0, 5, 0, PM + 4, 2)
        pci.cfg_write(0, 5, 0, PM + 4, 2, 0x0003)
        assert pci.cfg_read(0, 5, 0, PM + 4, 2) == found | 3
        pci.cfg_write(0, 5, 0, PM + 4, 2, 0x0001)  # D1: PMC does not offer it
        assert pci.cfg_read(0, 5, 0, PM + 4, 2) == found | 3
        pci.cfg_write(0, 5, 0, PM + 4, 1, 0xFC)  # other bits read-only, D0 written
        assert pci.cfg_read(0, 5, 0, PM + 4, 2) == found
        pci.cfg_write(0, 5, 0, PM + 4, 2, 0x0003)
        assert dev.host.config_read(PM + 4, 2) & 3 == 0
        dev.reset()
        assert pci.cfg_read(0, 5, 0, PM + 4, 2) == found


def test_power_state_d1_where_the_capability_offers_it():
    from devicemodel.context import standalone
    from devicemodel.lspci import Preview
    from devicemodel.passthru.device import Passthru, PassthruOptions
    from devicemodel.slot import SlotConfig

    host = SimHostDevice(4)
    host.cs.set16(PM + 2, host.cs.get16(PM + 2) | 1 << 9)  # D1 supported
    slot = SlotConfig(0, 5, 0, "passthru", "sim:4,no_reset")  # (a reset rebuilds the PMC)
    dev = Passthru(standalone(passthrough=Preview()), slot, host,
                   PassthruOptions(slot.options, slot.slot_text))
    try:
        dev.cfg_write(PM + 4, 2, 0x0001)
        assert dev.cfg_read(PM + 4, 2) & 3 == 1
        dev.cfg_write(PM + 4, 2, 0x0002)  # D2: not offered
        assert dev.cfg_read(PM + 4, 2) & 3 == 1
    finally:
        dev.close()
