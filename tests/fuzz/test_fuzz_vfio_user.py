"""vfio-user messages from a hostile client, over a real socketpair with real fds.

Each input is one 64-bit seed, expanded in plain Python (``_expand``) into a session: half
the time a well-formed start (VERSION, a DMA_MAP of a memfd whose bytes are random, MSI-X
on with eventfds, bus mastering), then up to 12 messages, each a known command with
fields drawn near the edges (offsets around region ends, DMA ranges that overlap, wrap or
split, SET_IRQS with more or fewer fds than vectors, INTx mask games) or raw bytes, with
eventfds, memfds or nothing attached, sometimes No_reply, sometimes a header that lies
about its size. The served device is, by seed, ``dummy,msix=8,intx`` (every interrupt
kind), a modern ``virtio-rnd`` (region writes to its common config can start a queue on
the random memory: hostile rings) or ``passthru,sim:8,vmsix_on_msi``.

The server must answer every command that asked for a reply, end the session normally
when the client goes, leave no descriptor behind, and, unless the stream became
unframeable, still answer a DEVICE_GET_INFO after the garbage. Sessions run on trio's
MockClock, so timers take no wall time and an input replays the same on a loaded machine.

Issue 18's attack classes are drawn too (``_hostile.draw``, from a second stream of the
seed): eventfds replaced by hostile descriptors, O_NONBLOCK cleared again on what was
handed over, and the memfd behind the DMA region truncated mid-session (the server must
drop the client, not die by SIGBUS).
"""

from __future__ import annotations

import os
import random
import socket
import struct

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.pci import caps as pcaps
from devicemodel.vfio_user import protocol as p
from devicemodel.vfio_user.device import ServedDevice
from devicemodel.vfio_user.server import serve_client
from tests.support.fds import fd_targets, open_fds

from ._common import count, fuzz_settings
from ._hostile import NO_HOSTILE, Hostile, clear_nonblock, draw, make_fd

SHM = 256 * 1024
LIMIT_S = 20.0
SPECS = ("dummy,msix=8,intx", "virtio-rnd,modern", "passthru,sim:8,vmsix_on_msi")
CMDS = [int(c) for c in p.Cmd] + [0, 14, 19, 0xFFFF]
TRIGGER = p.SET_DATA_EVENTFD | p.SET_ACTION_TRIGGER

Msg = tuple[int, int, bytes, list[str], int]  # command, flags, payload, fds, size lie


def _int(rnd: random.Random, lo: int, hi: int) -> int:
    """Mostly small offsets from ``lo``, sometimes a bound (like st.integers' shrinking)."""
    k = rnd.randrange(16)
    if k == 0:
        return rnd.choice([lo, hi])
    bits = (4, 8, 8, 12, 12, 16, 16, 16, 32, 32, 64, 64)[k % 12]
    v = lo + rnd.getrandbits(bits)
    return v if v <= hi else rnd.randint(lo, hi)


def _edge(rnd: random.Random, sizes: tuple[int, ...] = (0x8, 0x100, 0x1000, 0x4000)) -> int:
    """An offset near the end of a region of one of ``sizes``."""
    return rnd.choice(sizes) + rnd.randint(-9, 1)


def _binary(rnd: random.Random, max_size: int) -> bytes:
    return rnd.randbytes(rnd.choice([0, rnd.randrange(9), rnd.randrange(max_size + 1)]))


def _payload(rnd: random.Random, cmd: int) -> tuple[bytes, list[str]]:
    if cmd == p.Cmd.VERSION:
        caps = rnd.choice([b'{"capabilities":{"max_msg_fds":16,"write_multiple":true}}',
                           b'{"capabilities":{"pgsizes":8192}}', b"[]", b"{", b""])
        return struct.pack("<HH", rnd.choice([0, 0, 1]), _int(rnd, 0, 0xFFFF)) + caps + \
            rnd.choice([b"\0", b""]), []
    if cmd == p.Cmd.DMA_MAP:
        addr = rnd.choice([0, 0x1000, SHM, 0xC0000, 2**64 - 0x1000, _int(rnd, 0, 2**64 - 1)])
        size = rnd.choice([SHM, 0x1000, 0, 2 * SHM, 0x800, 2**63])
        off = rnd.choice([0, 0x1000, SHM, 1])
        flags = rnd.choice([3, 3, 1, 0, 0x10])
        return (p.dma_map.build({"argsz": rnd.choice([32, 32, 8]), "flags": flags,
                                 "offset": off, "address": addr, "size": size}),
                rnd.choice([["mem"], ["mem"], [], ["event"], ["mem", "mem"]]))
    if cmd == p.Cmd.DMA_UNMAP:
        return p.dma_unmap_payload(24, rnd.choice([0, 0, 2, 1, 4]),
                                   rnd.choice([0, 0x1000, SHM, _int(rnd, 0, 2**64 - 1)]),
                                   rnd.choice([SHM, 0x1000, 0, 2**64 - 1])), []
    if cmd in (p.Cmd.DEVICE_GET_INFO, p.Cmd.DEVICE_GET_REGION_INFO, p.Cmd.DEVICE_GET_IRQ_INFO):
        return struct.pack("<IIII", rnd.choice([16, 32, 0, 0xFFFF_FFFF]), 0,
                           _int(rnd, 0, 12), 0) + bytes(rnd.choice([0, 16])), []
    if cmd == p.Cmd.DEVICE_SET_IRQS:
        index = rnd.choice([0, 1, 2, 2, 3, 4, _int(rnd, 0, 2**32 - 1)])
        flags = rnd.choice([TRIGGER, TRIGGER, p.SET_DATA_NONE | p.SET_ACTION_TRIGGER,
                            p.SET_DATA_BOOL | p.SET_ACTION_TRIGGER,
                            p.SET_DATA_NONE | p.SET_ACTION_UNMASK,
                            p.SET_DATA_NONE | p.SET_ACTION_MASK,
                            p.SET_DATA_EVENTFD | p.SET_ACTION_UNMASK, _int(rnd, 0, 0x3F)])
        start, n = _int(rnd, 0, 9), rnd.choice([0, 1, 2, 8, 9, _int(rnd, 0, 2**32 - 1)])
        nfds = rnd.choice([0, 1, 2, min(n, 4), 17])
        return (p.irq_set.build({"argsz": 20, "flags": flags, "index": index, "start": start,
                                 "count": n, "data": _binary(rnd, 12)}), ["event"] * nfds)
    if cmd in (p.Cmd.REGION_READ, p.Cmd.REGION_WRITE):
        region = rnd.choice([0, 1, 2, 3, 4, 7, 7, 7, _int(rnd, 0, 2**32 - 1)])
        offset = rnd.choice([_edge(rnd), _int(rnd, 0, 0x40), 0x3000 + 4 * rnd.randrange(2),
                             _int(rnd, 0, 2**64 - 1)])
        n = rnd.choice([1, 2, 4, 8, 3, 0, 256, _int(rnd, 0, 2**32 - 1)])
        data = rnd.randbytes(min(n, 300)) if cmd == p.Cmd.REGION_WRITE else b""
        return p.REGION_ACCESS.pack(offset & (2**64 - 1), region, n & 0xFFFF_FFFF) + data, []
    if cmd == p.Cmd.REGION_WRITE_MULTI:
        writes = [(rnd.choice([0, 4, _edge(rnd)]) & 0xFFFF_FFFF, rnd.choice([0, 1, 3, 7]),
                   rnd.randbytes(rnd.choice([1, 2, 4, 8]))) for _ in range(rnd.randrange(4))]
        body = p.write_multi_payload(writes)
        return (body if rnd.randrange(4) else struct.pack("<Q", 5) + body[8:]), []
    return _binary(rnd, 40), rnd.choice([[], [], ["event"], ["mem"]])


def _message(rnd: random.Random) -> Msg:
    cmd = rnd.choice(CMDS)
    payload, fds = _payload(rnd, cmd)
    flags = rnd.choice([0, 0, 0, p.NO_REPLY, p.TYPE_REPLY, 0x40, 0x2])
    lie = rnd.choice([0] * 12 + [1, 2, 3])  # 1: bigger than sent, 2: under 16, 3: huge
    return cmd, flags, payload, fds, lie


#: where each spec's MSI-X Message Control is
MSIX_CTRL = {SPECS[0]: 0x5A, SPECS[1]: 0x42, SPECS[2]: 0x52}


def _w(region: int, offset: int, size: int, value: int) -> Msg:
    return (p.Cmd.REGION_WRITE, 0, p.region_access_payload(
        offset, region, size, value.to_bytes(size, "little")), [], 0)


def _rnd_driver(rnd: random.Random) -> list[Msg]:
    """Linux's modern virtio init of the rnd function's queue 0 through BAR4's common
    config, rings somewhere in (or around) the random memory, then a kick: the device
    then walks whatever the random bytes say."""
    base = rnd.choice([0x1000, 0x2000, SHM - 0x1000, SHM, _int(rnd, 0, 2**64 - 1)])
    desc, avail, used = (a & (2**64 - 1) for a in (base, base + 0x100,
                                                 base + rnd.choice([0x200, 0x1000, 0x101])))
    msgs = [_w(4, 20, 1, 0), _w(4, 20, 1, 3), _w(4, 8, 4, 1), _w(4, 12, 4, 1),
            _w(4, 20, 1, 11), _w(4, 22, 2, 0), _w(4, 24, 2, rnd.choice([8, 16, 3, 0]))]
    for off, addr in ((32, desc), (40, avail), (48, used)):
        msgs += [_w(4, off, 4, addr & 0xFFFF_FFFF), _w(4, off + 4, 4, addr >> 32)]
    msgs += [_w(4, 26, 2, rnd.choice([1, 0, 0xFFFF])), _w(4, 28, 2, 1), _w(4, 20, 1, 15),
             _w(4, 0x3000, 2, 0)]
    return msgs


def _start(spec: str, rnd: random.Random | None = None) -> list[Msg]:
    rings = _rnd_driver(rnd) if rnd is not None and spec == SPECS[1] else []
    return [
        (p.Cmd.VERSION, 0, p.version_payload(0, 0, {"max_msg_fds": 16,
                                                    "write_multiple": True}), [], 0),
        (p.Cmd.DMA_MAP, 0, p.dma_map_payload(3, 0, 0, SHM), ["mem"], 0),
        (p.Cmd.REGION_WRITE, 0, p.region_access_payload(4, 7, 2, b"\x07\x00"), [], 0),
        (p.Cmd.REGION_WRITE, 0, p.region_access_payload(MSIX_CTRL[spec], 7, 2, b"\x00\x80"),
         [], 0),
        (p.Cmd.DEVICE_SET_IRQS, 0, p.irq_set_payload(TRIGGER, 2, 0, 2), ["event"] * 2, 0),
        (p.Cmd.DEVICE_SET_IRQS, 0, p.irq_set_payload(TRIGGER, 0, 0, 1), ["event"], 0),
        *rings,
    ]


def _expand(seed: int) -> tuple[str, list[Msg], bytes]:
    """(device spec, messages, 256 bytes repeated over the client's memory) from ``seed``."""
    rnd = random.Random(seed)
    spec = SPECS[seed % len(SPECS)]
    n = min(12, int(rnd.expovariate(1 / 5))) if rnd.randrange(4) else rnd.randrange(13)
    msgs = (_start(spec, rnd) if rnd.randrange(2) else []) + [_message(rnd) for _ in range(n)]
    k = rnd.randrange(4)
    shm = bytes(256) if k == 0 else bytes(rnd.choices([0, 1, 2, 8, 0xFF], k=256)) if k == 1 \
        else rnd.randbytes(256)
    return spec, msgs, shm


# --- one session --------------------------------------------------------------------------
def _drain(sock: socket.socket, want: set[int]) -> bool:
    """Read whatever replies are there; False once the server closed the connection."""
    while True:
        try:
            head = sock.recv(p.HEADER.size, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not head:
            return False
        if len(head) < p.HEADER.size:
            return True
        msg_id, _, size, _, _ = p.HEADER.unpack(head)
        body = sock.recv(size, socket.MSG_DONTWAIT)
        assert len(body) == size, "a reply split across writes"
        want.discard(msg_id)


async def _session(spec: str, msgs: list[Msg], shm: bytes,
                   hostile: Hostile = NO_HOSTILE) -> None:
    served = ServedDevice(spec)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mem = os.memfd_create("fuzz-vfio-user", os.MFD_CLOEXEC)
    os.ftruncate(mem, SHM)
    os.pwrite(mem, shm * (SHM // len(shm)), 0)
    ended: list[bool] = []
    held: list[int] = []  # our descriptors, closed at the end (sent ones may be toggled)
    sent: list[int] = []
    try:
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(served.run)

                async def server() -> None:
                    await serve_client(served, trio.socket.from_stdlib_socket(ours))
                    ended.append(True)

                nursery.start_soon(server)
                front = trio.socket.from_stdlib_socket(theirs)
                want: set[int] = set()
                alive, framed = True, True
                for i, (cmd, flags, payload, fds, lie) in enumerate(msgs):
                    if hostile.shrink is not None and hostile.shrink[0] == i:
                        os.ftruncate(mem, hostile.shrink[1])  # under the server's maps
                    size = p.HEADER.size + len(payload)
                    size = {0: size, 1: size + 8, 2: 8, 3: p.MAX_MESSAGE + 9}[lie]
                    framed &= lie not in (1, 2)
                    data = p.HEADER.pack(i, cmd & 0xFFFF, size, flags, 0) + payload
                    kinds = [hostile.fd_kinds.get(i, "event") if f == "event" else f
                             for f in fds]
                    extra = [os.dup(mem) if k == "mem" else make_fd(k, held, _file())
                             for k in kinds]
                    try:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                struct.pack(f"{len(extra)}i", *extra))] if extra else []
                        await front.sendmsg([data], anc)
                        rest = memoryview(bytes(size - len(data) if lie == 3 else 0))
                        while rest:  # the rest of what a huge header announced, as zeros
                            rest = rest[await front.send(rest):]
                    except OSError:
                        alive = False
                        break
                    finally:
                        for fd, kind in zip(extra, kinds, strict=True):
                            if kind == "mem":
                                os.close(fd)
                            else:
                                sent.append(fd)
                    if flags & p.TYPE_MASK == 0 and not flags & p.NO_REPLY:
                        want.add(i)
                    await trio.testing.wait_all_tasks_blocked()
                    if i in hostile.toggle_after:  # O_NONBLOCK off again, behind its back
                        clear_nonblock(sent)
                    if not _drain(theirs, want):
                        alive = False
                        break
                    if framed:
                        assert not want, f"no reply to message {sorted(want)}"
                if alive and framed:  # the server still answers after all that
                    await front.send(
                        p.command(p.Cmd.DEVICE_GET_INFO, p.device_info_payload(0, 0, 0),
                                  msg_id=0xBEEF))
                    want = {0xBEEF}
                    await trio.testing.wait_all_tasks_blocked()
                    assert _drain(theirs, want) and not want, "the server stopped answering"
                if getattr(served.pci, "active", False):
                    count("vfio_user.active")  # a virtio queue ran on the random memory
                theirs.close()
                with trio.fail_after(LIMIT_S):
                    while not ended:
                        await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
    finally:
        served.close()
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()
        os.close(mem)
        for fd in held:
            os.close(fd)


_FILE: list[str] = []


def _file() -> str:
    """A regular file to hand over where an eventfd belongs."""
    if not _FILE:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="acrn-fuzz-vfio-user-")
        os.close(fd)
        _FILE.append(path)
    return _FILE[0]


def _run(spec: str, msgs: list[Msg], shm: bytes, hostile: Hostile = NO_HOSTILE) -> None:
    trio.run(_session, spec, msgs, shm, hostile,
             clock=trio.testing.MockClock(autojump_threshold=0))


_checked = 0


@fuzz_settings(150)
@given(seed=st.integers(0, 2**64 - 1))
def test_messages(seed: int) -> None:
    count("vfio_user.messages")
    global _checked
    spec, msgs, shm = _expand(seed)
    hostile = draw(seed, len(msgs), SHM)
    if hostile.fd_kinds or hostile.toggle_after:
        count("vfio_user.hostile_fds")
    if hostile.shrink is not None:
        count("vfio_user.shrinks")
    before = open_fds() if _checked % 1000 == 0 else fd_targets()
    _checked += 1
    _run(spec, msgs, shm, hostile)
    leaked = fd_targets() - before
    if leaked:
        leaked = open_fds() - before
    assert not leaked, f"the server leaked file descriptors: {sorted(leaked)}"


def test_start_prefix_turns_msix_on() -> None:
    """The well-formed start does what it says for every spec: MSI-X on, vectors wired."""
    for spec in SPECS:
        served = ServedDevice(spec)
        try:
            cap = pcaps.find(served.pci.cfg.data, pcaps.CAP_ID_MSIX)
            assert cap is not None and cap.offset + 2 == MSIX_CTRL[spec]
        finally:
            served.close()
    before = open_fds()
    for spec in SPECS:
        _run(spec, _start(spec), bytes(256))
    assert open_fds() - before == set()
