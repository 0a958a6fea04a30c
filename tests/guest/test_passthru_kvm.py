"""vMSI-X on MSI with real guest code on the KVM backend: the device model emulates the
table, and every message reaches the vCPU through an eventfd routed by KVM's irqfd (the
KVM/VFIO remapper), never through the device model's request loop."""

from __future__ import annotations

import pytest

from devicemodel.guestkit.kvm_programs import VERDICT_PASS, build, kvm_skip_reason, run_guest
from devicemodel.irq.remap import IrqfdRemapper
from devicemodel.passthru import device as ptdev

SKIP = kvm_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"no usable KVM: {SKIP}")


async def test_guest_takes_each_vmsix_vector_through_irqfd(tmp_path, monkeypatch):
    _, image = build("vmsix", tmp_path)
    injected: list[tuple[int, int]] = []
    remappers = []

    def record_remapper(*args, **kw):
        remappers.append(real_remapper_for(*args, **kw))
        return remappers[-1]

    real_remapper_for = ptdev.remapper_for
    monkeypatch.setattr(ptdev, "remapper_for", record_remapper)

    def setup(run) -> None:
        inject = run.hv.inject_msi

        def record(address: int, data: int) -> None:  # the slow path must stay unused
            injected.append((address, data))
            inject(address, data)

        run.hv.inject_msi = record

    run = await run_guest(image, slots=("0:0,hostbridge", "5,passthru,sim:4,vmsix_on_msi"),
                          setup=setup)
    assert run.verdict == VERDICT_PASS, (hex(run.verdict or 0), run.uart.text)
    assert run.uart.text.endswith(
        "vmsix 4 vectors taken\nvmsix held while masked\nvmsix delivered on unmask\n"
        "vmsix function mask held and released\n")
    assert len(remappers) == 1 and isinstance(remappers[0], IrqfdRemapper)
    assert remappers[0].fds == []  # closed at teardown
    dev = run.vm.passthrough(5)
    assert injected == []
    host = dev.host
    assert not host.msi.enabled  # teardown left the device as it was after its reset
    # every message left the device at once (the kernel, which owns its MSI under VFIO,
    # unmasked them all); the masked ones waited in their eventfds, not in the device
    assert host.sent == [(0xFEE0_0000, k) for k in (3, 2, 1, 0, 2, 1)]
