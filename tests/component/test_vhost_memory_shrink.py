"""A front end that truncates its guest memory under the back end (issue 18, item 2).

Set up the rings, serve a request, ``ftruncate`` the front end's memfd to 0 and kick:
before the fix the back end (blk on its data-plane thread, rnd on the loop) died by
signal 7 with no message, as qemu-storage-daemon 7.2 does (measured in the report). Now
the vanished pages read as zeros, the device fails (DEVICE_NEEDS_RESET, err fd signalled),
the front end is dropped with one line, and the back end serves the next front end.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import time

import pytest
import trio

from devicemodel import memguard
from devicemodel.memory import MemoryMap, MiB, RamRegion
from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.frontend import Frontend
from devicemodel.vhost_user.protocol import Req
from tests.component.test_vhost_hostile_fds import _answers, _request, _start_backend
from tests.support.vhost import NO_EVENT_IDX, start

SIZE = 16 * MiB


def _unsealed_memory() -> tuple[MemoryMap, int]:
    """Guest RAM in a memfd that can shrink (no F_SEAL_SHRINK), as a hostile front end's."""
    fd = os.memfd_create("hostile-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    mm = mmap.mmap(fd, SIZE)
    assert not memguard.shrink_sealed(fd)
    return MemoryMap([RamRegion(gpa=0, size=SIZE, mm=mm, fd=fd)]), fd


@pytest.mark.parametrize("device", ["blk", "rnd"])
async def test_memory_truncated_under_running_rings_is_a_device_error(tmp_path, device):
    proc, sock = _start_backend(tmp_path, device)
    mem, memfd = _unsealed_memory()
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        fe = await Frontend.connect(str(sock))
        try:
            await fe.negotiate(NO_EVENT_IDX)
            drv = await start(fe, mem)
            await fe.send(Req.SET_VRING_ERR, p.U64.pack(0), [err])
            _request(drv, device)
            fe.kick_ring(0)
            await fe.wait_call(0)
            assert drv.used_idx() == 1
            os.ftruncate(memfd, 0)  # from here on, neither side may touch the pages
            fe.kick_ring(0)
            with trio.fail_after(10):  # the back end drops us ...
                while await fe.conn.sock.recv(64):
                    pass
            await trio.sleep(0.2)
            assert proc.poll() is None, f"the back end died: {proc.returncode}"
            assert os.eventfd_read(err) >= 1  # ... after failing the device
        finally:
            fe.close()
        assert proc.poll() is None, f"the back end died: {proc.returncode}"
        assert await _answers(sock), "a new front end was not answered"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1].decode(errors="replace")
        os.close(err)
        os.close(memfd)
        for r in mem.regions:
            with contextlib.suppress(BufferError):  # the mock driver may still hold a view
                r.mm.close()
    assert "the front end truncated its memory under region at 0x0 (+0x" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_a_guarded_mapping_survives_its_file_shrinking():
    """memguard itself, in this process: reads see zeros, writes are dropped, the fault is
    recorded and the owner's eventfd signalled; an unguarded mapping still faults."""
    fd = os.memfd_create("shrinks", os.MFD_CLOEXEC)
    notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    os.ftruncate(fd, 4 * mmap.PAGESIZE)
    mm = mmap.mmap(fd, 4 * mmap.PAGESIZE)
    region = memguard.guard(mm, "test", notify)
    try:
        mm[0:4] = b"keep"
        os.ftruncate(fd, mmap.PAGESIZE)  # pages 1..3 vanish
        before = memguard.patched_pages()
        assert mm[0:4] == b"keep"  # what is still in the file is untouched
        assert mm[mmap.PAGESIZE : mmap.PAGESIZE + 8] == bytes(8)
        mm[2 * mmap.PAGESIZE : 2 * mmap.PAGESIZE + 4] = b"lost"
        assert struct.unpack_from("<Q", mm, 3 * mmap.PAGESIZE)[0] == 0
        assert region.faults == [mmap.PAGESIZE, 2 * mmap.PAGESIZE, 3 * mmap.PAGESIZE]
        assert memguard.patched_pages() - before == 3
        assert os.eventfd_read(notify) == 3
        assert os.pread(fd, 8, 0) == b"keep" + bytes(4)
    finally:
        memguard.unguard(region)
        mm.close()
        os.close(fd)
        os.close(notify)


def test_our_own_guest_ram_is_sealed_against_resizing():
    """The VM's RAM memfds are handed to vhost-user peers: sealed like QEMU's, no peer can
    shrink them under us."""
    from devicemodel.memory import GuestMemory

    mem = GuestMemory(128 * MiB)
    try:
        for r in mem.regions:
            assert memguard.shrink_sealed(r.fd)
            with pytest.raises(PermissionError):
                os.ftruncate(r.fd, 0)
    finally:
        mem.close()


def test_a_fault_outside_guarded_memory_still_kills(tmp_path):
    """A SIGBUS outside every guarded region is not swallowed: the process dies as before."""
    import subprocess
    import sys

    from tests.support.paths import ROOT

    code = ("import mmap, os\n"
            "from devicemodel import memguard\n"
            "g = os.memfd_create('g'); os.ftruncate(g, 4096); gm = mmap.mmap(g, 4096)\n"
            "memguard.guard(gm, 'guarded', os.eventfd(0))\n"
            "u = os.memfd_create('u'); os.ftruncate(u, 4096); um = mmap.mmap(u, 4096)\n"
            "os.ftruncate(u, 0); os.ftruncate(g, 0)\n"
            "assert gm[0] == 0\n"
            "print('guarded ok', flush=True)\n"
            "um[0]\n"
            "print('not reached', flush=True)\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout == "guarded ok\n"
    assert out.returncode == -signal.SIGBUS
    assert time.monotonic() - t0 < 20
