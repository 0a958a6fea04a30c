"""Small freestanding x86 programs (devicemodel/guestkit/programs/) run on the KVM backend
in a real Vm: every port and MMIO access goes KVM exit → request slot → IoreqServer → completion."""

from __future__ import annotations

import os
import re

import pytest

from devicemodel.guestkit.kvm_programs import (
    VERDICT_PASS,
    GuestRun,
    build,
    kvm_skip_reason,
    run_guest,
)
from devicemodel.hsm import abi
from tests.support.kvm_boot import boot_elf

SKIP = kvm_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"no usable KVM: {SKIP}")

TEST_MMIO = 0xD000_0000
TEST_PORT = 0xE0
REQ_PORT = 0xE1
EVENT_PORT = 0xE2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("guests")
    return {name: build(name, out)[1] for name in ("hello", "pci", "msi", "msix")}


class Storage:
    """A port/MMIO handler that logs writes and answers reads from a function."""

    def __init__(self, answer=lambda off, size: 0) -> None:
        self.answer = answer
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.answer(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


async def test_hello_prints_over_com1_and_exits_through_debugexit(images):
    mmio = Storage(lambda off, size: 0x1234_5678 if off == 4 else 0)
    port = Storage(lambda off, size: 0xA0 + len(port.reads) - 1)

    def setup(run: GuestRun) -> None:
        run.vm.mmio.register(TEST_MMIO, 0x1000, mmio, "test-mmio")
        run.vm.ports.register(TEST_PORT, 1, port, "test-port")

    run = await run_guest(images["hello"], setup=setup)
    assert run.verdict == VERDICT_PASS, run.uart.text
    assert run.uart.text == "hello from a KVM guest\nok\nhello done\n"
    assert run.exit_reason is None
    # the MMIO write and read arrived with their guest addresses and sizes
    assert mmio.writes == [(0, 4, 0xCAFE_F00D)]
    assert mmio.reads == [(4, 4)]
    # `rep insb` of 4 bytes is four separate 1-byte requests, answered in order
    assert port.reads == [(0, 1)] * 4
    assert run.vm.server is not None
    assert run.vm.server.stats["mmio"] == 2


async def test_pci_enumeration_through_cf8_cfc_matches_the_bus(images):
    run = await run_guest(images["pci"], slots=("0:0,hostbridge", "3:0,dummy"))
    assert run.verdict == VERDICT_PASS, run.uart.text
    found = re.findall(r"pci 00:([0-9a-f]{2})\.0 ([0-9a-f]{4}):([0-9a-f]{4}) class ([0-9a-f]{6})",
                       run.uart.text)
    pci = run.vm.pci
    assert pci is not None
    expected = []
    for (bus, dev, func), _ in sorted(pci.functions()):
        if bus == 0 and func == 0:
            ident = pci.cfg_read(0, dev, 0, 0, 4)
            cls = pci.cfg_read(0, dev, 0, 8, 4) >> 8
            expected.append((f"{dev:02x}", f"{ident & 0xFFFF:04x}", f"{ident >> 16:04x}",
                             f"{cls:06x}"))
    assert found == expected
    assert [f[0] for f in found] == ["00", "03"]
    assert f"pci devices: {len(expected):02x}" in run.uart.text
    # the DM saw PCICFG requests only (32 vendor reads at least); CF8/CFC themselves
    # never reached it as port I/O (nothing is registered there, so they would count)
    server = run.vm.server
    assert server is not None
    assert server.stats["pcicfg"] >= 32
    assert server.stats["unhandled_pio"] == 0


async def test_msi_irqfd_intx_and_ioeventfd(images):
    irq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    io_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    requests: list[int] = []

    def setup(run: GuestRun) -> None:
        hv = run.hv

        class Requests:
            def read(self, offset: int, size: int) -> int:
                return 0

            def write(self, offset: int, size: int, value: int) -> None:
                requests.append(value)
                if value == 1:
                    hv.inject_msi(0xFEE0_0000, 0x40)
                elif value == 2:
                    os.eventfd_write(irq_efd, 1)
                elif value == 3:
                    hv.set_irqline(20, abi.GSI_SET_LOW)  # active-low pin: asserted
                elif value == 4:
                    hv.set_irqline(20, abi.GSI_SET_HIGH)

        hv.irqfd(irq_efd, 0xFEE0_0000, 0x41)
        hv.ioeventfd(io_efd, EVENT_PORT, 2, pio=True)
        run.vm.ports.register(REQ_PORT, 1, Requests(), "test-requests")

    try:
        run = await run_guest(images["msi"], setup=setup)
        assert run.verdict == VERDICT_PASS, (run.uart.text, run.exit_reason)
        assert run.uart.text == "msi 0x40 taken\nirqfd 0x41 taken\nintx 0x42 taken\n"
        # the level interrupt fired once: the handler's deassert came before its EOI
        assert requests == [1, 2, 3, 4]
        # both writes signalled the eventfd: the 2-byte one in KVM, the 1-byte one by the
        # HSM half (ACRN matches registered len >= access size); neither reached the DM
        assert os.eventfd_read(io_efd) == 2
    finally:
        os.close(irq_efd)
        os.close(io_efd)


async def test_msix_from_the_dummy_device_masked_then_unmasked(images):
    injected: list[tuple[int, int]] = []

    def setup(run: GuestRun) -> None:
        inject = run.hv.inject_msi

        def record(address: int, data: int) -> None:
            injected.append((address, data))
            inject(address, data)

        run.hv.inject_msi = record  # type: ignore[method-assign]

    run = await run_guest(images["msix"], slots=("0:0,hostbridge", "3:0,dummy,msix=8"),
                          setup=setup)
    assert run.verdict == VERDICT_PASS, (hex(run.verdict or 0), run.uart.text)
    assert "msix held while masked\nmsix pending delivered on unmask\nmsix 0x43 taken\n" in (
        run.uart.text)
    # one message for the held-then-unmasked fire, one for the plain fire: nothing while masked
    assert injected == [(0xFEE0_0000, 0x43)] * 2


@pytest.fixture(scope="module")
def elves(tmp_path_factory):
    out = tmp_path_factory.mktemp("elves")
    return {name: build(name, out)[0] for name in ("pci", "reboot")}


async def test_pci_guest_loaded_with_dash_e_on_the_real_platform(elves, tmp_path):
    code, text, hv = await boot_elf(elves["pci"], tmp_path / "com1")
    assert code == VERDICT_PASS, (text, hv.exit_reason)
    assert "pci 00:00.0 1275:1275 class 060000\n" in text  # acrn-dm's host bridge IDs
    assert re.search(r"pci 00:01\.0 [0-9a-f]{4}:[0-9a-f]{4} class 0601", text)  # ISA bridge
    assert "pci devices: 02\n" in text


async def test_reset_through_cf9_boots_the_guest_again(elves, tmp_path):
    code, text, hv = await boot_elf(elves["reboot"], tmp_path / "com1")
    assert code == VERDICT_PASS, (text, hv.exit_reason)
    assert text == "first boot\nsecond boot\n"
