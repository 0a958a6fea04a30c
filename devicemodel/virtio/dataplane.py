"""One virtqueue served on its own thread, woken by the front end's kick eventfd itself.

A vhost-user front end kicks a ring by writing an eventfd and waits for the call eventfd.
Served from the event loop, a blocking request (virtio-blk writes: ext4 refuses
``RWF_NOWAIT`` for buffered writes) costs three cross-CPU wake-ups per request (kick to the
loop, loop to an I/O thread, back to the loop), which is most of a 1 MiB write's latency
here. A data-plane thread owns the queue instead: it waits on (a duplicate of) the kick
eventfd, serves the ring with blocking calls, and signals the call eventfd itself, as a
QEMU iothread does. The loop keeps the control plane; it stops the thread (and waits for
the request in progress) before it changes or unmaps anything the thread uses.

The thread is the only user of its queue while it runs. A kick that reaches the loop
anyway (the front end replaced the kick fd) is forwarded with :meth:`Dataplane.poke`.

The front end chooses the kick fd, so it may be anything: the thread polls it only if it
is an event source (an eventfd or another anonymous inode, a pipe, a socket), takes any
bytes it holds as one kick (a pipe may hold a partial value), and stops polling it once it
hangs up or fails. A regular file or device is never polled (it is always readable: the
thread would spin). Either way the ring is then served on pokes only, as the loop's own
kick watcher does with such an fd.

The thread sleeps in an epoll. An eventfd kick (and the thread's own wake-up eventfd)
is registered edge-triggered: every write wakes the thread once, so a wake-up costs one
system call and the counter is never read. Any other kick is level-triggered and drained
with one read per wake-up (a pipe that still holds bytes wakes the next poll at once).
Then the thread serves, re-arms kicks and sleeps: no empty second pass over the ring.
A device may run its own loop instead (``Lane``: virtio-blk's serves a lone request in
one frame, ``blk/lane.py``) on an eventfd kick.
An idle ring is looked at every ``idle_s`` anyway (``look_again``): a guest that
lost a kick or an interrupt pauses instead of hanging.
Its interrupts go through ``peerfd.relax_guard`` (the guard timer is not disarmed after
every signal, ≈3 µs a request): everything the thread blocks in restarts on EINTR.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import threading
from collections.abc import Callable

from ..peerfd import read_nowait, relax_guard
from ..ratelimit import RateLimitedLog
from .queue import Virtqueue, VirtqueueError

log = logging.getLogger(__name__)
glog = RateLimitedLog(log)



def pollable_kick(fd: int) -> bool:
    """Whether ``fd`` can wake a thread the way an eventfd does: an anonymous inode
    (eventfd), a pipe or a socket. Regular files and devices always poll readable."""
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
    except OSError:
        return False
    return kind in (0, stat.S_IFIFO, stat.S_IFSOCK)


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd: every write to one wakes an edge-triggered epoll,
    so its counter need never be read (False where /proc cannot tell)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def drain_kick(fd: int, buf: bytearray | None = None) -> bool:
    """Consume what a kick fd holds with one read (an eventfd's whole counter, or up to
    ``len(buf)`` bytes of a pipe: the rest wakes the next poll, so a flooding peer is
    served in turn); False once it hung up or failed (nothing more will come from it).
    The read never waits: the front end shares the fd's O_NONBLOCK with us and may
    clear it, then read its own kick before us (``peerfd.read_nowait``)."""
    try:
        n = read_nowait(fd, bytearray(4096) if buf is None else buf)
    except OSError:
        return False
    return n is None or n > 0  # 0: end of file, the writer is gone


#: a device's own serving loop for a queue (``blk/lane.py``): run on the thread with the
#: thread's :class:`Dataplane` once its kicks are set up; returns False at once when it
#: does not apply to the queue (the general loop then serves it)
Lane = Callable[["Dataplane"], bool]


class Dataplane:
    """Serve ``q`` with ``serve(q)`` on a thread until :meth:`stop`.

    ``serve`` handles one batch of available requests and says whether there was one (so
    a stop waits for one batch at most); ``fail(reason)`` is called (on the thread) when it
    raises, after which the thread ends.
    ``kick_fd`` becomes the thread's own (it is closed by :meth:`stop`).
    ``lane``, if given, serves the queue instead while the kick fd is an eventfd: it loops
    until :attr:`stopping`, sleeping in :attr:`poll` (edge-triggered: no kick is read)
    and calling :meth:`look_again` when that times out after :attr:`idle_s`.
    """

    #: how long the thread sleeps before it looks at an idle ring anyway
    idle_s = 0.25

    def __init__(self, name: str, q: Virtqueue, kick_fd: int,
                 serve: Callable[[Virtqueue], bool], fail: Callable[[str], None],
                 interrupt: Callable[[Virtqueue], None] | None = None,
                 lane: Lane | None = None) -> None:
        self.q = q
        self._interrupt = interrupt
        #: requests found with no kick, interrupts sent again (``look_again``)
        self.unkicked = self.reinterrupted = 0
        self._kick = kick_fd
        os.set_blocking(kick_fd, False)  # a read after a wake-up another reader took waits not
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._serve = serve
        self._fail = fail
        self._lane = lane
        #: set once the thread is to end (a lane checks it after every request)
        self.stopping = False
        #: the thread's wait for a kick or a poke (``epoll.poll``), once it runs
        self.poll: Callable[[float], list[tuple[int, int]]] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(self._wake)
            raise

    def poke(self) -> None:
        """Wake the thread to look at the ring (a kick that arrived through the loop)."""
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """End the thread once the request in progress is done; idempotent."""
        if not self.stopping:
            self.stopping = True
            os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join()
        for name in ("_kick", "_wake"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def _run(self) -> None:
        q = self.q
        kick, wake = self._kick, self._wake
        relax_guard()
        # Edge-triggered for eventfds (ours and an eventfd kick): each write wakes the
        # poll once, so their counters are never read. Any other kick is level-triggered
        # and drained after it woke the thread.
        epoll = select.epoll()
        epoll.register(wake, select.EPOLLIN | select.EPOLLET)
        drained = -1  # the kick fd, when it is level-triggered
        try:
            if is_eventfd(kick):
                epoll.register(kick, select.EPOLLIN | select.EPOLLET)
            elif pollable_kick(kick):
                epoll.register(kick, select.EPOLLIN)
                drained = kick
            else:
                self._kick_lost("is not an eventfd, pipe or socket")
        except OSError as e:  # an anonymous inode that cannot be polled (EPERM)
            self._kick_lost(f"cannot be polled ({e.strerror})")
        self.poll = epoll.poll
        try:
            if drained < 0 and self._lane is not None and self._lane(self):
                return
            self._serve_loop(q, epoll, drained)
        except VirtqueueError as e:
            self._fail(str(e))
        except Exception as e:  # a bug must stop this device, not the process
            log.exception("%s crashed", threading.current_thread().name)
            self._fail(f"internal error: {e!r}")
        finally:
            epoll.close()

    def _serve_loop(self, q: Virtqueue, epoll: select.epoll, drained: int) -> None:
        """The general loop: a batch, then sleep unless more arrived meanwhile."""
        serve = self._serve
        buf = bytearray(4096)
        idle_s = self.idle_s
        while not self.stopping:
            serve(q)
            if q.enable_notification():  # more arrived, or a batch left some
                q.disable_notification()
                continue
            ready = epoll.poll(idle_s)
            if not ready:
                self.look_again(q)
            for fd, _ in ready:
                if fd == drained and not drain_kick(fd, buf):
                    epoll.unregister(fd)
                    drained = -1
                    self._kick_lost("hung up")
            q.disable_notification()

    def look_again(self, q: Virtqueue) -> None:
        """The ring was idle for ``idle_s``: serve what the driver posted without a
        kick, and interrupt again if it seems to wait for one it missed. The ring
        protocol rules both out, but only if the guest's memory barriers work (QEMU TCG
        before 8.1 drops them with one vCPU: then a kick or an interrupt is lost now
        and then, and the guest would wait for ever); this turns that into a pause."""
        if q.has_available():  # (the loop serves it next)
            self.unkicked += 1
            glog.warning("%s: the driver posted requests without a kick; served after %.2f s",
                         threading.current_thread().name, self.idle_s)
        elif self._interrupt is not None and q.interrupt_unheeded():
            self.reinterrupted += 1
            glog.warning("%s: the driver has not taken used buffers for %.2f s: interrupting"
                         " again", threading.current_thread().name, self.idle_s)
            self._interrupt(q)

    def _kick_lost(self, why: str) -> None:
        glog.warning("%s: the kick fd %s; serving kicks that reach the loop only",
                     threading.current_thread().name, why)
