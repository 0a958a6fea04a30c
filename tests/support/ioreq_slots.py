"""Random request-slot contents and the IoreqServer's property over them: whatever the
slots hold, the server completes exactly the slots the device model owns and never
writes the state field."""

from __future__ import annotations

import struct
from collections.abc import Callable

import trio
from hypothesis import strategies as st

from devicemodel.bus import MmioBus, PortBus
from devicemodel.hsm import abi
from devicemodel.ioreq import IoreqServer, new_ioreq_page
from tests.support.served import Recorder

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

slot = st.fixed_dictionaries(
    {
        "type": st.one_of(st.sampled_from([0, 1, 2, 3]), u32),
        "direction": st.one_of(st.sampled_from([0, 1]), u32),
        "address": st.one_of(st.sampled_from([0x3F8, 0xCFC, 0xC000_0000, 0xFFFF]), u64),
        "size": st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 16]), u64),
        "value": u64,
        "bdfr": st.tuples(u32, u32, u32, u32),
        "kernel_handled": st.sampled_from([0, 1, 2**32 - 1]),
        "state": st.one_of(st.sampled_from([0, 1, 2, 3]), u32),
        "noise": st.binary(min_size=0, max_size=56),
    }
)


class FakeHv:
    """Just what the server calls: attach once, then report the client gone."""

    name = "fake"

    def __init__(self) -> None:
        self.finished: list[int] = []
        self.attached = 0

    async def attach_ioreq_client(self) -> bool:
        self.attached += 1
        await trio.lowlevel.checkpoint()
        return self.attached == 1

    def notify_request_finish(self, vcpu: int) -> None:
        self.finished.append(vcpu)


def _write_slot(page, vcpu: int, s: dict) -> None:
    off = abi.slot_offset(vcpu)
    page[off + 8 : off + 8 + len(s["noise"])] = s["noise"]
    struct.pack_into("<I", page, off, s["type"])
    struct.pack_into("<IIQQQ", page, off + 64, s["direction"], 0, s["address"], s["size"],
                     s["value"])
    if s["type"] == abi.IOREQ_TYPE_PCICFG:
        struct.pack_into("<IIII", page, off + abi.SLOT_PCI_BDFR_OFF, *s["bdfr"])
    struct.pack_into("<II", page, off + abi.SLOT_KERNEL_HANDLED_OFF, s["kernel_handled"],
                     s["state"])


class AnyPci:
    def cfg_read(self, bus, dev, func, reg, size):
        return 0x5A5A5A5A

    def cfg_write(self, bus, dev, func, reg, size, value):
        pass

    def vcpu_safe(self, bus, dev, func, reg, size, write):
        return not write  # reads may be served off the loop, writes on it


def check_random_slots(vcpu_num: int, slots: list[dict], hv: FakeHv,
                       run: Callable[[IoreqServer], None], *,
                       safe_ports: bool = False) -> None:
    """The property: whatever the slots hold, ``run(server)`` (serving the page until
    ``serve()`` returns) completes exactly the slots the device model owns and never
    writes ``processed``. ``safe_ports``: the port handler is ``vcpu_safe`` (the MMIO one
    never is)."""
    page_mm = new_ioreq_page()
    page = memoryview(page_mm)
    for v, s in enumerate(slots):
        _write_slot(page, v, s)
    states_before = [
        abi.SLOT_U32.unpack_from(page, abi.slot_offset(v) + abi.SLOT_PROCESSED_OFF)[0]
        for v in range(16)
    ]
    ports, mmio = PortBus(), MmioBus()
    ports.register(0x3F8, 8, Recorder(answer=0x41), vcpu_safe=safe_ports)
    mmio.register(0xC000_0000, 0x1000, Recorder(answer=0x1234))
    server = IoreqServer(hv, page_mm, vcpu_num, ports, mmio, AnyPci())
    run(server)
    owned = [
        v
        for v in range(vcpu_num)
        if slots[v]["state"] == abi.IOREQ_STATE_PROCESSING and slots[v]["kernel_handled"] == 0
    ]
    assert sorted(hv.finished) == owned
    states_after = [
        abi.SLOT_U32.unpack_from(page, abi.slot_offset(v) + abi.SLOT_PROCESSED_OFF)[0]
        for v in range(16)
    ]
    if getattr(hv, "completes", False):  # NOTIFY stores COMPLETE, as the HSM does
        states_before = [abi.IOREQ_STATE_COMPLETE if v in owned else st
                         for v, st in enumerate(states_before)]
    assert states_after == states_before  # the DM never writes `processed`
    page.release()
    server.page.release()
    page_mm.close()
