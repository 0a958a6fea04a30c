"""Request slots into the IoreqServer.

1. ``tests/support/ioreq_slots.py``'s property (random slot bytes never break the server, it
   completes exactly the slots it owns and never writes ``processed``), re-run here with
   the fuzz settings so it gets a long mode.
2. Well-formed-looking requests aimed at every range a real VM registers (all emulated
   devices' BARs, platform ports, CF8/CFC-converted PCICFG, the ECAM window): no device
   handler may raise (the server would hide it, answering all-ones: ``handler_error``
   must stay 0), every read answers within its size, and a completed slot keeps state.
3. Guest port/MMIO accesses through the sim vCPU and the HSM half into a running VM.

Each test draws one 64-bit seed and expands it with ``random.Random`` into the slots,
requests or accesses its hypothesis strategies used to draw (the same special values,
sampled lists and ranges; ``_int`` gives plain integers hypothesis' lean to small and
boundary values): decoding nested strategies cost hypothesis more per input than the
server spent answering, so a million-input long run took hours.
"""

from __future__ import annotations

import logging
import random
import struct
import traceback

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.hsm import abi
from devicemodel.ioreq import IoreqServer, new_ioreq_page
from tests.support import ioreq_slots as base

from ._common import count, drive, fuzz_settings
from ._vm import build_vm, reset_vm

SEED = st.integers(0, 2**64 - 1)


def _int(rnd: random.Random, lo: int, hi: int) -> int:
    """An integer in [lo, hi] leaning, as hypothesis' st.integers does, to the ends of
    the range and to small offsets from its start."""
    k = rnd.getrandbits(3)
    if k == 0:
        return hi if rnd.getrandbits(1) else lo
    if k < 3:
        return min(lo + rnd.getrandbits((1, 4, 8, 8)[rnd.getrandbits(2)]), hi)
    span = hi - lo + 1
    return lo + rnd.getrandbits(span.bit_length() + 8) % span  # randint, without its cost


def _pick(rnd: random.Random, seq: tuple):  # noqa: ANN202 - any element type
    """``rnd.choice`` at a third of its cost (these run a few hundred times per input)."""
    return seq[int(rnd.random() * len(seq))]


def _either(rnd: random.Random, special: tuple[int, ...], lo: int, hi: int) -> int:
    """``st.one_of(st.sampled_from(special), st.integers(lo, hi))``."""
    return _pick(rnd, special) if rnd.getrandbits(1) else _int(rnd, lo, hi)


U32, U64 = 2**32 - 1, 2**64 - 1


def _word(bits, mode: int, width: int) -> int:  # noqa: ANN001 - rnd.getrandbits
    """``_int(rnd, 0, 2**width - 1)`` with its choice made by the 4-bit ``mode`` drawn
    beforehand (the slot test draws over a hundred of these per input)."""
    if mode >= 6:
        return bits(width)
    if mode >= 2:
        return bits((1, 4, 8, 8)[mode - 2])
    return mode and (1 << width) - 1


def _slot(rnd: random.Random) -> dict:
    """One slot as ``test_ioreq_fuzz.slot`` draws it: each field one of its special
    values or (half the time) any integer of its width, leaning to 0, ones and small."""
    bits = rnd.getrandbits
    m = bits(48)  # 5 bits per field: one for special-or-integer, four for _word's mode
    return {
        "type": (0, 1, 2, 3)[m >> 1 & 3] if m & 1 else _word(bits, m >> 1 & 15, 32),
        "direction": m >> 6 & 1 if m & 32 else _word(bits, m >> 6 & 15, 32),
        "address": ((0x3F8, 0xCFC, 0xC000_0000, 0xFFFF)[m >> 11 & 3] if m >> 10 & 1
                    else _word(bits, m >> 11 & 15, 64)),
        "size": (_pick(rnd, (0, 1, 2, 3, 4, 8, 16)) if m >> 15 & 1
                 else _word(bits, m >> 16 & 15, 64)),
        "value": _word(bits, m >> 20 & 15, 64),
        "bdfr": (_word(bits, m >> 24 & 15, 32), _word(bits, m >> 28 & 15, 32),
                 _word(bits, m >> 32 & 15, 32), _word(bits, m >> 36 & 15, 32)),
        "kernel_handled": (0, 1, U32, 0)[m >> 40 & 3] if m >> 40 & 3 != 3 else _pick(
            rnd, (0, 1, U32)),
        "state": (0, 1, 2, 3)[m >> 43 & 3] if m >> 42 & 1 else _word(bits, m >> 43 & 15, 32),
        "noise": rnd.randbytes(_int(rnd, 0, 56)),
    }


def _slots(seed: int) -> tuple[int, list[dict]]:
    rnd = random.Random(seed)
    return _int(rnd, 1, 16), [_slot(rnd) for _ in range(16)]


class _SyncHv(base.FakeHv):
    """``base.FakeHv`` whose attach never suspends, so ``serve()`` runs to its end in a
    single ``send`` without a trio.run per input (a serve() that waited on anything
    else would be caught: the coroutine would not finish)."""

    async def attach_ioreq_client(self) -> bool:
        self.attached += 1
        return self.attached == 1


@fuzz_settings(50)
@given(seed=SEED)
def test_random_slot_bytes(seed):
    """``test_ioreq_fuzz``'s property on slots drawn from ``seed``."""
    count("ioreq.slot_bytes")
    vcpu_num, slots = _slots(seed)
    hv = _SyncHv()
    base.check_random_slots(vcpu_num, slots, hv, _serve_in_one_send)
    assert hv.attached == 2


def _serve_in_one_send(server: IoreqServer) -> None:
    coro = server.serve()
    try:
        coro.send(None)
    except StopIteration:
        pass
    else:
        coro.close()
        raise AssertionError("serve() waited on something other than the hypervisor")


def _targets(vm) -> list[tuple[int, int, int]]:
    """(request type, base, length) of everything registered, plus holes around it."""
    out = [(abi.IOREQ_TYPE_PORTIO, r.base, r.length) for r in vm.ports.ranges()]
    out += [(abi.IOREQ_TYPE_MMIO, r.base, min(r.length, 0x10000)) for r in vm.mmio.ranges()]
    out += [(abi.IOREQ_TYPE_PORTIO, 0xCF8, 8), (abi.IOREQ_TYPE_MMIO, 0x7FFF_F000, 0x2000),
            (abi.IOREQ_TYPE_PORTIO, 0, 0x10000)]
    return out


def _requests(seed: int) -> list[tuple]:
    """1..40 requests (which target, offset in it, size, write?, value, PCI b/d/f/reg,
    PCICFG instead of the target?), as the old ``st.lists(op, max_size=40)`` drew."""
    rnd = random.Random(seed)
    bits = rnd.getrandbits
    out = []
    for _ in range(_list_len(rnd, 40)):
        m = bits(32)  # the coin flips and _word modes of one request
        out.append((
            _int(rnd, 0, 10_000),                                   # which target
            _word(bits, m & 15, 32),                                # offset (mod length)
            _pick(rnd, (1, 2, 4, 8, 3, 0)),                         # size
            bool(m >> 8 & 1),                                       # write?
            (0, 1, 0xFF, U32)[m >> 9 & 3] if m >> 11 & 1 else _word(bits, m >> 12 & 15, 64),
            (_pick(rnd, (0, 0, 0, 1, 255)),                         # PCI bus
             _either(rnd, (0, 3, 4, 5, 6, 7, 8, 9, 31), 0, 31),     # device
             _pick(rnd, (0, 0, 0, 1, 7)),                           # function
             _int(rnd, 0, 0x1000 if m >> 22 & 1 else 0x100)),       # register
            bool(m >> 23 & 1)))                                     # PCICFG instead?
    return out


def _list_len(rnd: random.Random, most: int) -> int:
    """Mostly hypothesis' geometric list lengths (about 6), one in eight up to ``most``."""
    if not rnd.getrandbits(3):
        return most if rnd.getrandbits(1) else _int(rnd, 1, most)
    n = 1
    while n < most and rnd.random() < 5 / 6:
        n += 1
    return n


class _Tracebacks(logging.Handler):
    """Keeps the tracebacks the server logs (at DEBUG) when a handler raises."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append("".join(traceback.format_exception(*record.exc_info)))


class _Hv:
    def __init__(self) -> None:
        self.finished: list[int] = []

    def notify_request_finish(self, vcpu: int) -> None:
        self.finished.append(vcpu)


class _Rig:
    """One VM, request page, server and traceback catcher per process: only the devices
    need to go back to power-on between inputs (the server's counters are cleared)."""

    def __init__(self) -> None:
        self.vm, _ = build_vm()
        self.targets = _targets(self.vm)
        self.page_mm = new_ioreq_page()
        self.page = memoryview(self.page_mm)
        self.hv = _Hv()
        self.server = IoreqServer(self.hv, self.page_mm, 1, self.vm.ports,  # type: ignore[arg-type]
                                  self.vm.mmio, self.vm.pci)
        self.tb = _Tracebacks()
        self.log = logging.getLogger("devicemodel.ioreq")
        self.old_level = self.log.level
        self.log.addHandler(self.tb)
        self.log.setLevel(logging.DEBUG)

    def close(self) -> None:
        self.log.removeHandler(self.tb)
        self.log.setLevel(self.old_level)
        self.server.page.release()
        self.page.release()
        self.page_mm.close()
        self.vm._release()


@pytest.fixture(scope="module")
def rig():
    r = _Rig()
    yield r
    r.close()


@fuzz_settings(60)
@given(seed=SEED)
def test_requests_into_every_device(rig, seed):
    count("ioreq.devices")
    reset_vm(rig.vm)
    rig.vm.platform.reset()  # RTC index, PM registers: so that an input replays alike
    assert _targets(rig.vm) == rig.targets  # a reset puts every BAR back
    targets, page, hv, server = rig.targets, rig.page, rig.hv, rig.server
    server.events.clear()
    rig.tb.seen.clear()
    for which, offset, size, write, value, bdfr, pcicfg in _requests(seed):
        rtype, base_addr, length = targets[which % len(targets)]
        addr = base_addr + offset % length
        direction = abi.IOREQ_DIR_WRITE if write else abi.IOREQ_DIR_READ
        if pcicfg:
            rtype = abi.IOREQ_TYPE_PCICFG
        page[0:256] = bytes(256)
        struct.pack_into("<I", page, 0, rtype)
        struct.pack_into("<IIQQQ", page, 64, direction, 0, addr, size, value)
        if pcicfg:
            struct.pack_into("<IIII", page, abi.SLOT_PCI_BDFR_OFF, *bdfr)
        struct.pack_into("<II", page, abi.SLOT_KERNEL_HANDLED_OFF, 0,
                         abi.IOREQ_STATE_PROCESSING)
        hv.finished.clear()
        assert server.scan() == 1
        assert hv.finished == [0]
        (state,) = struct.unpack_from("<I", page, abi.SLOT_PROCESSED_OFF)
        assert state == abi.IOREQ_STATE_PROCESSING  # the DM never writes it
        if not write:
            wide = rtype == abi.IOREQ_TYPE_MMIO
            (result,) = struct.unpack_from("<Q" if wide else "<I", page, abi.SLOT_VALUE_OFF)
            # a request the server rejects as malformed may answer 4 bytes of ones
            # (the hypervisor masks by size); a handled one answers within its size
            if size in (1, 2, 4, 8) and not pcicfg and (wide or addr <= 0xFFFF):
                assert result < 1 << (8 * size)
    assert server.stats["handler_error"] == 0, \
        "a device handler raised:\n" + "".join(rig.tb.seen)


def test_guest_accesses_through_the_hsm_path(tmp_path):
    """Guest port/MMIO accesses posted by the sim vCPU into a running VM: the HSM half
    (hsm/hsm_dispatch.py, shared with the KVM backend: cached CF8, CFC..CFF turned into
    PCICFG in place, ioeventfd matching) and the IoreqServer answer each one; the vCPU
    always gets a value within its access size, no handler raises, nothing hangs. The
    accesses come from ``_accesses(seed)``; what bounds the rate is the sim's trio
    round trip per access (about 0.1 ms) and one thread hop per input, not generation."""
    import trio

    from devicemodel.hsm.sim import SimHypervisor
    from devicemodel.vm import running

    from ._vm import IMAGE, SLOTS

    with open(IMAGE, "wb") as f:
        f.truncate(1 << 20)

    async def main() -> None:
        args = ["-m", "128M"]
        for s in SLOTS:
            if "lpc" not in s:
                args += ["-s", s]
        sim = SimHypervisor()
        async with running([*args, "fuzzvm"], hypervisor=sim) as vm:
            await trio.to_thread.run_sync(run_examples, vm, sim)

    def run_examples(vm, sim) -> None:
        @fuzz_settings(40)
        @given(seed=SEED)
        def one(seed):
            count("ioreq.hsm_path")
            trio.from_thread.run(play, vm, sim, _accesses(seed))

        drive(one)

    async def play(vm, sim, ops) -> None:
        g = sim.guest(0)
        errors = vm.server.stats["handler_error"]
        with trio.fail_after(10):
            for kind, addr, size, write, value in ops:
                if kind == "pio":
                    size = min(size, 4)
                    if write:
                        value = _no_poweroff(addr, size, value)
                        await g.pio_write(addr, size, value & ((1 << 8 * size) - 1))
                    else:
                        got = await g.pio_read(addr, size)
                        assert 0 <= got < 1 << 32
                elif write:
                    await g.mmio_write(addr, size, value & ((1 << 8 * size) - 1))
                else:
                    got = await g.mmio_read(addr, size)
                    assert 0 <= got < 1 << 64
        assert vm.server.stats["handler_error"] == errors, "a device handler raised"

    trio.run(main)


GUEST_PORTS = (0xCF8, 0xCFC, 0xCFD, 0xCFE, 0xCFF, 0x70, 0x71, 0x3F8, 0x3FD, 0x400, 0x404,
               0xCF9, 0x2000, 0x3000, 0x3010, 0x4000, 0x6000)


def _accesses(seed: int) -> list[tuple[str, int, int, bool, int]]:
    """1..30 guest accesses (pio twice as often as mmio, address, size, write?, value):
    addresses from the ports the VM decodes, any port, the BAR window and ECAM; values
    any u64 or a CF8-style config address (enable bit, bus 0/1, the slots, any reg)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(_list_len(rnd, 30)):
        k = rnd.getrandbits(2)
        if k == 0:
            addr = _pick(rnd, GUEST_PORTS)
        elif k == 1:
            addr = _int(rnd, 0, 0xFFFF)
        elif k == 2:
            addr = _int(rnd, 0x8000_0000, 0x8002_0000)
        else:
            addr = _int(rnd, 0xE000_0000, 0xE010_0000)
        if rnd.getrandbits(1):
            value = _int(rnd, 0, U64)
        else:
            value = (0x8000_0000 | _pick(rnd, (0, 0, 1)) << 16
                     | _pick(rnd, (0, 3, 4, 5, 6, 7, 8)) << 11
                     | _pick(rnd, (0, 0, 1)) << 8 | _int(rnd, 0, 0xFF))
        out.append((_pick(rnd, ("pio", "pio", "mmio")), addr, _pick(rnd, (1, 2, 4, 8)),
                    bool(rnd.getrandbits(1)), value))
    return out


def _no_poweroff(addr: int, size: int, value: int) -> int:
    """Clear SLP_EN (PM1a control bit 13, in port 0x405) and the 0xCF9 reset bits in a
    port write: a guest may power its VM off or reset it, which would end the VM these
    inputs share (found by the fast long mode, as SimVmGone on every later input)."""
    for port, bits in ((0x405, 0x20), (0xCF9, 0x0C)):
        i = port - addr
        if 0 <= i < size:
            value &= ~(bits << 8 * i)
    return value
