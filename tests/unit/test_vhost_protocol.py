"""The vhost-user parsers and the back end's message loop against malformed input.

A front end is another process: whatever it sends, the back end must answer well-formed
requests, reject the rest with a clean drop of that connection, never raise out of the
session, never leak a file descriptor, and keep serving the next front end.
"""

from __future__ import annotations

import os
import socket
import struct

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.backend import VhostUserBackend
from devicemodel.vhost_user.connection import Connection
from devicemodel.vhost_user.frontend import Frontend, RingSetup
from devicemodel.vhost_user.protocol import ProtocolError, Req
from devicemodel.virtio.rnd import VirtioRnd
from tests.support.fds import open_fds

PARSERS = [
    p.parse_header,
    p.parse_u64,
    p.parse_vring_state,
    p.parse_vring_addr,
    p.parse_vring_file,
    p.parse_mem_table,
    lambda b: p.parse_config(b, with_data=True),
    lambda b: p.parse_config(b, with_data=False),
]


@given(st.sampled_from(range(len(PARSERS))), st.binary(max_size=400))
def test_parsers_return_or_raise_protocol_error(which: int, data: bytes) -> None:
    try:
        PARSERS[which](data)
    except ProtocolError:
        pass


def test_header_rules() -> None:
    ok = p.parse_header(struct.pack("=III", Req.GET_FEATURES, 1, 0))
    assert ok.request == Req.GET_FEATURES and ok.size == 0 and not ok.need_reply
    for flags, size in ((0, 0), (2, 0), (1 | p.FLAG_REPLY, 0), (1, p.MAX_PAYLOAD + 1)):
        try:
            p.parse_header(struct.pack("=III", 1, flags, size))
        except ProtocolError:
            continue
        raise AssertionError(f"flags {flags:#x} size {size} accepted")


def test_mem_table_rejects_overlap_zero_size_and_too_many_regions() -> None:
    def table(*regions: tuple[int, int]) -> bytes:
        out = p.MEM_HEADER.pack(len(regions), 0)
        for gpa, size in regions:
            out += p.MEM_REGION.pack(gpa, size, 0x1000, 0)
        return out

    assert len(p.parse_mem_table(table((0, 4096), (4096, 4096)))) == 2
    for bad in (table((0, 8192), (4096, 4096)), table((0, 0)), table(),
                table(*[(i << 20, 4096) for i in range(9)]), table((2**64 - 4096, 8192))):
        try:
            p.parse_mem_table(bad)
        except ProtocolError:
            continue
        raise AssertionError("accepted a bad memory table")


def test_vring_file_payload() -> None:
    assert p.parse_vring_file(p.U64.pack(3)) == (3, False)
    assert p.parse_vring_file(p.U64.pack(3 | p.VRING_NOFD)) == (3, True)
    try:
        p.parse_vring_file(p.U64.pack(1 << 9))
    except ProtocolError:
        return
    raise AssertionError("unknown bits accepted")


_requests = st.sampled_from([int(r) for r in Req] + [0, 99, 2**31])
_message = st.tuples(
    _requests,
    st.sampled_from([1, 1 | p.FLAG_NEED_REPLY, 0, 5, 0xFFFF_FFFF]),
    st.binary(max_size=300),
    st.integers(0, 3),  # eventfds to attach
    st.booleans(),  # lie about the size
)


def _encode(req: int, flags: int, payload: bytes, lie: bool) -> bytes:
    size = len(payload) + (7 if lie else 0)
    return struct.pack("=III", req & 0xFFFF_FFFF, flags, size) + payload


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_message, max_size=12), st.binary(max_size=64))
async def test_backend_survives_any_message_stream(msgs: list, tail: bytes) -> None:
    dev = VirtioRnd()
    backend = VhostUserBackend(dev)
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            done = trio.Event()

            async def run() -> None:
                conn = Connection(trio.socket.from_stdlib_socket(b))
                await backend.serve(conn)
                conn.close()
                done.set()

            nursery.start_soon(run)
            fe = trio.socket.from_stdlib_socket(a)
            try:
                for req, flags, payload, nfds, lie in msgs:
                    fds = [os.eventfd(0) for _ in range(nfds)]
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))]
                    try:
                        await fe.sendmsg([_encode(req, flags, payload, lie)], anc if fds else [])
                    finally:
                        for fd in fds:
                            os.close(fd)
                    if done.is_set():
                        break
                if tail and not done.is_set():
                    await fe.send(tail)
            except OSError:
                pass  # the back end dropped us mid-stream: that is a clean rejection
            fe.close()
            await done.wait()  # the session ends by itself once we hang up
            nursery.cancel_scope.cancel()
    assert backend.mem is None and backend.queues is None
    assert open_fds() - before == set()


async def test_malformed_mem_table_fds_do_not_leak_and_next_session_works() -> None:
    dev = VirtioRnd()
    backend = VhostUserBackend(dev)
    mem = GuestMemory(128 * MiB)
    before = open_fds()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        for attempt in range(2):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            done = trio.Event()

            async def run(sock: socket.socket = b, done: trio.Event = done) -> None:
                conn = Connection(trio.socket.from_stdlib_socket(sock))
                await backend.serve(conn)
                conn.close()
                done.set()

            nursery.start_soon(run)
            fe = trio.socket.from_stdlib_socket(a)
            r = mem.regions[0]
            # region larger than its file on the first attempt, correct on the second
            size = r.size * (2 if attempt == 0 else 1)
            body = p.MEM_HEADER.pack(1, 0) + p.MEM_REGION.pack(0, size, 0x7000_0000, 0)
            await fe.sendmsg([p.encode(Req.SET_MEM_TABLE, body, reply=False)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r.fd))])
            await trio.sleep(0.05)
            assert (backend.mem is None) == (attempt == 0)
            fe.close()
            with trio.fail_after(5):
                await done.wait()
        nursery.cancel_scope.cancel()
    assert open_fds() - before == set()


async def test_ring_outside_the_memory_table_drops_the_front_end() -> None:
    dev = VirtioRnd()
    backend = VhostUserBackend(dev)
    mem = GuestMemory(128 * MiB)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        done = trio.Event()

        async def run() -> None:
            conn = Connection(trio.socket.from_stdlib_socket(b))
            await backend.serve(conn)
            conn.close()
            done.set()

        nursery.start_soon(run)
        fe = Frontend(Connection(trio.socket.from_stdlib_socket(a)))
        await fe.negotiate()
        assert await fe.set_mem_table(mem) == 0
        # user addresses that no region covers
        await fe.start_ring(RingSetup(0, 64, 1 << 40, 1 << 40, 1 << 40))
        with trio.fail_after(5):
            await done.wait()  # dropped once the ring setup settled, process still alive
        assert backend.mem is None
        fe.close()
        nursery.cancel_scope.cancel()
