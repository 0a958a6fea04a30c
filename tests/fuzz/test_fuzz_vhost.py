"""vhost-user messages from a hostile front end, over a real socketpair with real fds.

Sequences of requests (known and unknown types, good and bad flags and sizes, structured
payloads aimed at a shared memfd whose bytes are random, so activated rings are hostile
too, and random payloads) with memfds and eventfds attached. The back end may drop the
front end (a ``ProtocolError``, logged) but its ``serve`` must return normally when the
front end goes away, within a time limit, and leave no file descriptor behind.

Each input is one 64-bit seed, expanded in plain Python (``_expand``) into the session
the strategies used to draw (hypothesis decoding nested strategies cost more than the
session itself). The harness stays out of the way: sessions run one after another on one
trio loop (a trio run costs about 0.7 ms to set up), on ``MockClock`` with autojump, so
the back end's settle timer and pauses take no wall time and an input replays the same
way on a loaded machine; the front end waits for the back end to be idle after each
message instead of for a reply timeout; descriptor leaks are listed without a garbage
collection per input (tens of ms in a test process), collecting only when a listing
looks suspect. Taking the kick fd before refusing extra ones (the regression below) is
caught about once in 500 inputs; not closing the old kick fd on a new kick, once in 1000.

The device is virtio-rnd (served from the loop) for half the seeds and virtio-blk for the
other half: blk serves each ring on a data-plane thread that waits on the kick fd and
signals the call fd itself, so the control messages race a thread doing real I/O on
hostile rings (the session's end stops it wherever it is).

Issue 18's attack classes are drawn too (``Hostile``, from a second stream of the seed
so the messages stay what they were): eventfds replaced by hostile descriptors (blocking
and saturated eventfds, full pipes, pipe read ends, hung-up pipes, sockets, regular files,
/dev/null), O_NONBLOCK cleared again on every fd already handed over (the front end
shares the open file description with us), and the shared memory truncated in the middle
of the sequence (the back end must drop the front end, not die by SIGBUS).
"""

from __future__ import annotations

import math
import os
import random
import socket
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.backend import SETTLE_S, VhostUserBackend
from devicemodel.vhost_user.connection import Connection
from devicemodel.vhost_user.protocol import Req
from devicemodel.virtio.blk import VirtioBlk, parse_blk_options
from devicemodel.virtio.device import VirtioDevice
from devicemodel.virtio.rnd import VirtioRnd
from tests.support.fds import fd_targets, open_fds

from ._common import count, fuzz_settings
from ._hostile import NO_HOSTILE, Hostile, clear_nonblock, draw, kick, make_fd

SHM = 64 * 1024
UVA = 0x7F00_0000_0000
GPA = 0
LIMIT_S = 20.0  # a session that outlives this (in mock or real time) hangs
FULL_CHECK_EVERY = 1000  # inputs between leak checks that collect garbage first

Fds = list[str]  # what to attach: "event" (an eventfd) or "mem" (a dup of the shared memfd)

Msg = tuple[int, int, tuple[bytes, Fds]]  # request, flags, (payload, fds)

REQS = list(Req)
FEATURES = VirtioRnd().device_features
START: list[Msg] = [
    (Req.SET_OWNER, p.VERSION, (b"", [])),
    (Req.SET_FEATURES, p.VERSION, (p.U64.pack(FEATURES), [])),
    (Req.SET_MEM_TABLE, p.VERSION,
     (struct.pack("=IIQQQQ", 1, 0, GPA, SHM, UVA, 0), ["mem"])),
    (Req.SET_VRING_NUM, p.VERSION, (p.VRING_STATE.pack(0, 8), [])),
    (Req.SET_VRING_ADDR, p.VERSION, (p.VRING_ADDR.pack(0, 0, UVA, UVA + 0x1000, UVA + 0x800,
                                                       0), [])),
    (Req.SET_VRING_KICK, p.VERSION, (p.U64.pack(0), ["event"])),
]


# -- the input: a seed expanded like the strategies drew ------------------------------

def _int(rnd: random.Random, lo: int, hi: int) -> int:
    """Like ``st.integers(lo, hi)``: mostly small offsets from ``lo``, sometimes a bound."""
    k = rnd.randrange(16)
    if k == 0:
        return rnd.choice([lo, hi])
    bits = (8, 8, 8, 16, 16, 16, 16, 16, 32, 32, 64, 64)[k % 12]
    v = lo + rnd.getrandbits(bits)
    return v if v <= hi else rnd.randint(lo, hi)


def _u64(rnd: random.Random) -> int:
    if rnd.randrange(2):
        return _int(rnd, 0, 2**64 - 1)
    return rnd.choice([0, 1, 1 << 30, 1 << 32, 2**64 - 1])


def _ring_index(rnd: random.Random) -> int:
    return _int(rnd, 0, 2) if rnd.randrange(2) else _int(rnd, 0, 0xFFFF_FFFF)


def _ring_addr(rnd: random.Random) -> int:
    if rnd.randrange(2):
        return _int(rnd, UVA, UVA + SHM)
    return rnd.choice([0, UVA - 16, 2**64 - 8])


def _binary(rnd: random.Random, max_size: int) -> bytes:
    """Like ``st.binary(max_size=...)``: short ones often, empty sometimes."""
    n = rnd.choice([0, rnd.randrange(9), rnd.randrange(max_size + 1), max_size])
    return rnd.randbytes(n)


def _payload(rnd: random.Random, req: int) -> tuple[bytes, Fds]:
    """(payload, fds to attach) for a request type."""
    if req in (Req.SET_FEATURES, Req.SET_PROTOCOL_FEATURES):
        value = rnd.choice([FEATURES | p.F_PROTOCOL_FEATURES, 1 << 32, _u64(rnd)])
        return p.U64.pack(value), []
    if req in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE,
               Req.SET_VRING_ENABLE):
        num = (rnd.choice([0, 1, 8, 256, 3, 0x10000]) if rnd.randrange(2)
               else _int(rnd, 0, 2**32 - 1))
        return p.VRING_STATE.pack(_ring_index(rnd), num), []
    if req == Req.SET_VRING_ADDR:
        return p.VRING_ADDR.pack(_ring_index(rnd), rnd.randrange(2), _ring_addr(rnd),
                                 _ring_addr(rnd), _ring_addr(rnd), _u64(rnd)), []
    if req in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
        value = rnd.choice([_int(rnd, 0, 2), p.VRING_NOFD, _int(rnd, 0, 2**64 - 1)])
        return p.U64.pack(value), rnd.choice([["event"], [], ["event", "event"]])
    if req == Req.SET_MEM_TABLE:
        regions = b"".join(struct.pack(
            "=QQQQ", rnd.choice([GPA, GPA + 4096, 2**64 - 4096]),
            rnd.choice([SHM, SHM // 2, 0, 2 * SHM, 2**63]), rnd.choice([UVA, UVA + 1]),
            rnd.choice([0, 4096, 1])) for _ in range(rnd.randint(1, 2)))
        head = struct.pack("=II", rnd.choice([1, 1, 2, 0, 9]), 0)
        return head + regions, rnd.choice([["mem"], ["mem", "mem"], [], ["event"]])
    if req in (Req.GET_CONFIG, Req.SET_CONFIG):
        head = struct.pack("=III", _int(rnd, 0, 300), _int(rnd, 0, 300), rnd.randrange(2))
        return head + _binary(rnd, 64), []
    return _binary(rnd, 40), rnd.choice([[], ["event"]])


def _message(rnd: random.Random) -> Msg:
    if rnd.randrange(2):
        req = rnd.choice(REQS)
        return (int(req), rnd.choice([p.VERSION, p.VERSION | p.FLAG_NEED_REPLY]),
                _payload(rnd, req))
    return (_int(rnd, 0, 2**32 - 1), _int(rnd, 0, 2**32 - 1), (_binary(rnd, 64), []))


def _shm(rnd: random.Random) -> bytes:
    """256 bytes repeated over the shared memory (so over the rings): random, or zeros,
    or small numbers (ring indexes and lengths a walker gets further with)."""
    k = rnd.randrange(8)
    if k == 0:
        return bytes(256)
    if k == 1:
        return bytes(rnd.choices([0, 0, 1, 2, 8, 0xFF, rnd.randrange(256)], k=256))
    return rnd.randbytes(256)


def _expand(seed: int) -> tuple[list[tuple[Msg, bool]], bytes, int, bool]:
    """(messages each with "pause after it", shm, lie_size, settle) from ``seed``.

    Up to 12 messages (about 5 on average), after the START prefix half the time. A pause
    after a message (one in 5) lets the back end settle and activate the rings in the
    middle of the sequence, so later messages hit running rings."""
    rnd = random.Random(seed)
    n = min(12, int(rnd.expovariate(1 / 5))) if rnd.randrange(4) else rnd.randrange(13)
    msgs = (START if rnd.randrange(2) else []) + [_message(rnd) for _ in range(n)]
    seq = [(m, rnd.randrange(5) == 0) for m in msgs]
    return seq, _shm(rnd), rnd.randrange(4), bool(rnd.randrange(2))


# -- the check -----------------------------------------------------------------------

_checked = 0  # inputs checked in this process


@pytest.fixture(scope="module")
def loop() -> Iterator[_Loop]:
    lp = _Loop()
    try:
        yield lp
    finally:
        lp.close()


@fuzz_settings(300)
@given(seed=st.integers(0, 2**64 - 1))
def test_messages(loop, seed):
    count("vhost.messages")
    seq, shm, lie_size, settle = _expand(seed)
    blk = bool(seed >> 63)
    hostile = draw(seed, len(seq), SHM)
    if hostile.fd_kinds or hostile.toggle_after:
        count("vhost.hostile_fds")
    if hostile.shrink is not None:
        count("vhost.shrinks")
    _check_no_leak(lambda: loop.run(seq, shm, lie_size, settle, blk, hostile))


def test_kick_with_two_fds_leaks_nothing():
    """Found by this target: a kick with two fds leaked the one the back end had taken."""
    kick = (Req.SET_VRING_KICK, p.VERSION, (p.U64.pack(0), ["event", "event"]))
    before = open_fds()
    _run([(kick, False)], bytes(256), lie_size=0, settle=False)
    leaked = open_fds() - before
    assert not leaked, f"the back end leaked file descriptors: {sorted(leaked)}"


def _check_no_leak(session: Callable[[], None]) -> None:
    """Run ``session``; no descriptor it opened may stay open.

    A listing without collecting garbage first is exact here except for garbage still
    holding a descriptor: after this session, that shows up as a new one (so only then
    collect and list again); from before it, it cannot exist once every earlier input in
    this process passed this check, so a collection now and then (and at the first input:
    other tests' garbage) is enough."""
    global _checked
    before = open_fds() if _checked % FULL_CHECK_EVERY == 0 else fd_targets()
    _checked += 1
    session()
    leaked = fd_targets() - before
    if leaked:
        leaked = open_fds() - before
    assert not leaked, f"the back end leaked file descriptors: {sorted(leaked)}"


def test_leak_check_without_collections():
    """The per-input check fails on a descriptor left open, not on garbage holding one."""
    left: list[int] = []

    def garbage() -> None:
        cycle: list[object] = [socket.socket()]
        cycle.append(cycle)  # only a collection closes it

    try:
        with pytest.raises(AssertionError, match="leaked file descriptors"):
            _check_no_leak(lambda: left.append(os.eventfd(0)))
    finally:
        os.close(left.pop())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        _check_no_leak(garbage)


class _RealTimeLimit(trio.abc.Instrument):
    """Cancels a session after LIMIT_S of real time: the mock clock stands still while
    tasks keep running without sleeping, so its deadline alone misses a busy loop."""

    def __init__(self) -> None:
        self.deadline = math.inf
        self.scope: trio.CancelScope | None = None
        self.expired = False

    def arm(self, scope: trio.CancelScope) -> None:
        self.deadline = time.monotonic() + LIMIT_S
        self.scope, self.expired = scope, False

    def before_io_wait(self, timeout: float) -> None:
        if self.scope is not None and time.monotonic() > self.deadline:
            self.expired = True
            self.scope.cancel()


def _run(seq: list[tuple[Msg, bool]], shm: bytes, lie_size: int, settle: bool) -> None:
    """One session in a trio run of its own."""
    limit = _RealTimeLimit()
    trio.run(_session, seq, shm, lie_size, settle, limit, instruments=[limit],
             clock=trio.testing.MockClock(autojump_threshold=0))
    assert not limit.expired, f"the session ran for more than {LIMIT_S} s"


class _Loop:
    """One trio loop, on a thread of its own, that runs this process's sessions in turn.

    Setting up and tearing down a trio run costs about 0.7 ms, a third of a session. The
    sessions stay apart all the same: each has its own socketpair, memfd, device, back end
    and nursery, all gone when it returns (the leak check sees to the descriptors)."""

    def __init__(self) -> None:
        # autojump only while a session runs: with no deadline at all it spins
        self.clock = trio.testing.MockClock(autojump_threshold=math.inf)
        self.limit = _RealTimeLimit()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fuzz-vhost-trio", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the session loop did not start")

    def _main(self) -> None:
        trio.run(self._idle, clock=self.clock, instruments=[self.limit])

    async def _idle(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self._started.set()
        await self._stop.wait()

    def run(self, seq: list[tuple[Msg, bool]], shm: bytes, lie_size: int,
            settle: bool, blk: bool = False, hostile: Hostile = NO_HOSTILE) -> None:
        trio.from_thread.run(self._one, seq, shm, lie_size, settle, blk, hostile,
                             trio_token=self._token)
        assert not self.limit.expired, f"the session ran for more than {LIMIT_S} s"

    async def _one(self, seq: list[tuple[Msg, bool]], shm: bytes, lie_size: int,
                   settle: bool, blk: bool, hostile: Hostile) -> None:
        self.clock.autojump_threshold = 0
        try:
            await _session(seq, shm, lie_size, settle, self.limit, blk, hostile)
        finally:
            self.clock.autojump_threshold = math.inf
            self.limit.scope = None

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()


async def _session(seq: list[tuple[Msg, bool]], shm: bytes, lie_size: int, settle: bool,
                   limit: _RealTimeLimit, blk: bool = False,
                   hostile: Hostile = NO_HOSTILE) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev: VirtioDevice = VirtioBlk(parse_blk_options(_image())) if blk else VirtioRnd()
    backend = VhostUserBackend(dev)
    activate = dev.activate

    def counted_activate(*a, **kw):
        count("vhost.activations")  # the sequence got as far as running rings
        return activate(*a, **kw)

    dev.activate = counted_activate  # type: ignore[method-assign]
    start_dataplane = dev.start_dataplane

    def counted_dataplane(*a, **kw):
        started = start_dataplane(*a, **kw)
        if started:
            count("vhost.dataplanes")  # a blk ring served by a thread, racing the messages
        return started

    dev.start_dataplane = counted_dataplane  # type: ignore[method-assign]
    mem = os.memfd_create("fuzz-shm", os.MFD_CLOEXEC)
    os.ftruncate(mem, SHM)
    os.pwrite(mem, shm * (SHM // len(shm)), 0)
    kicks: list[tuple[int, str]] = []
    held: list[int] = []  # every fd of ours, closed at the end (sent ones: toggled too)
    sent: list[int] = []
    try:
        with trio.fail_after(LIMIT_S), trio.CancelScope() as scope:
            limit.arm(scope)
            async with trio.open_nursery() as nursery:
                await nursery.start(dev.run)
                conn = Connection(trio.socket.from_stdlib_socket(ours))
                nursery.start_soon(_serve, backend, conn, nursery.cancel_scope)
                front = trio.socket.from_stdlib_socket(theirs)
                for i, ((req, flags, (payload, fds)), pause) in enumerate(seq):
                    if hostile.shrink is not None and hostile.shrink[0] == i:
                        os.ftruncate(mem, hostile.shrink[1])  # under the back end's maps
                    size = len(payload)
                    if lie_size == 3:
                        size = len(payload) + 8  # more than sent: a short message at the end
                    data = p.HEADER.pack(req & 0xFFFF_FFFF, flags & 0xFFFF_FFFF,
                                         size & 0xFFFF_FFFF) + payload
                    kinds = [hostile.fd_kinds.get(i, "event") if f == "event" else f
                             for f in fds]
                    extra = [os.dup(mem) if k == "mem" else make_fd(k, held, _image())
                             for k in kinds]
                    try:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                struct.pack(f"{len(extra)}i", *extra))] if extra else []
                        if not _send(theirs, data, anc):
                            await front.sendmsg([data], anc)
                    except OSError:
                        break  # the back end hung up on us
                    finally:
                        for fd, kind in zip(extra, kinds, strict=True):
                            if kind == "mem":
                                os.close(fd)
                            else:
                                sent.append(fd)
                                if req == Req.SET_VRING_KICK:
                                    kicks.append((fd, kind))  # kept to kick the ring later
                    # the back end has done all it will with the message (no time passes)
                    await trio.testing.wait_all_tasks_blocked()
                    if i in hostile.toggle_after:  # O_NONBLOCK off again, behind its back
                        clear_nonblock(sent)
                    if not _drain(theirs):
                        break
                    if pause:
                        await trio.sleep(2 * SETTLE_S)
                if settle:  # let the back end activate the (hostile) rings, then kick
                    await trio.sleep(2 * SETTLE_S)
                    for fd, kind in kicks:
                        kick(fd, kind, held)
                    await trio.sleep(0.01)
                front.close()
    finally:
        dev.close()  # blk: its data-plane threads are stopped by then; the image closes
        ours.close()
        theirs.close()
        os.close(mem)
        for fd in held:
            os.close(fd)



_IMAGE: list[str] = []


def _image() -> str:
    """A 1 MiB image for the blk sessions of this process (hostile rings write it)."""
    if not _IMAGE:
        path = os.path.join(tempfile.mkdtemp(prefix="acrn-fuzz-vhost-"), "disk.img")
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        _IMAGE.append(path)
    return _IMAGE[0]


def _send(sock: socket.socket, data: bytes, anc: list) -> bool:
    """Send without a trip through the scheduler; False if the socket is full."""
    try:
        sock.sendmsg([data], anc, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    return True


def _drain(sock: socket.socket) -> bool:
    """Read the replies sent so far; False once the back end has hung up."""
    while True:
        try:
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                return False
        except BlockingIOError:
            return True
        except OSError:
            return False


async def _serve(backend: VhostUserBackend, conn: Connection, scope: trio.CancelScope) -> None:
    try:
        await backend.serve(conn)
    finally:
        conn.close()
        scope.cancel()
