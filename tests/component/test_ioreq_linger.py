"""The request server's bounded poll on ACRN (``IoreqServer.linger_ns``): after serving on
the loop it watches the slots for a moment, so a vCPU that exits again at once is answered
without a wake of the loop; a guest that never stops exiting still leaves the loop's other
tasks their turn; nothing polls where the vCPUs are threads of ours (KVM, the sim).

The guest is bench/fake_hsm.c's poster: a vCPU, hypervisor and HSM dispatch in another
process at C speed (a Python one would hold the GIL the server needs), on the backend's
real ATTACH/NOTIFY path through ``IpcHsm``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from devicemodel.bus import MmioBus, PortBus
from devicemodel.hsm.acrn import AcrnHypervisor
from devicemodel.hsm.kvm.hypervisor import KvmHypervisor
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.ioreq import IoreqServer
from tests.support.served import Recorder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from fake_hsm import IpcHsm, Shared, build  # noqa: E402


@pytest.fixture(scope="module")
def poster_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("fake-hsm"))


async def _serve(exe: Path, linger_ns: int, requests: int, watch_s: float = 0.0
                 ) -> tuple[int, int, int]:
    """Let the C vCPU read port 0x3F9 ``requests`` times, each as soon as the last was
    answered (or for ``watch_s`` seconds, while a task counts its turns): the reads
    answered, the loop's wakes, the other task's turns."""
    shared = Shared()
    hv = AcrnHypervisor(IpcHsm(shared))
    ticks = 0

    async def ticker() -> None:  # a periodic task of the device model (a timer)
        nonlocal ticks
        while True:
            await trio.sleep(0.001)
            ticks += 1

    try:
        hv.create_vm("linger", shared.page)
        ports = PortBus()
        ports.register(0x3F8, 8, Recorder(answer=0x5A))  # served on the loop
        server = IoreqServer(hv, shared.page, 1, ports, MmioBus())
        server.linger_ns = linger_ns
        hv.create_ioreq_client()
        hv.start_vm()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            poster = subprocess.Popen(
                [str(exe), "poster", *shared.args(), str(requests), "0", "notify"],
                pass_fds=shared.fds, stdout=subprocess.DEVNULL)
            try:
                with trio.fail_after(60):
                    if watch_s:
                        nursery.start_soon(ticker)
                        await trio.sleep(watch_s)
                    else:
                        while poster.poll() is None:
                            await trio.sleep(0.005)
                        assert poster.returncode == 0
            finally:
                poster.kill()
                poster.wait()
            wakes = hv._waiter.loop_wakes
            nursery.cancel_scope.cancel()
        return server.stats["pio"], wakes, ticks
    finally:
        hv.close()
        shared.close()


async def test_reads_that_follow_one_another_are_answered_without_waking_the_loop(poster_exe):
    served, wakes, _ = await _serve(poster_exe, 1_000_000, 2000)  # 1 ms: room for noise
    assert served == 2000 and wakes < 200
    served, wakes, _ = await _serve(poster_exe, 0, 2000)  # no poll: a wake per read
    assert served == 2000 and wakes >= 1900


async def test_a_guest_that_never_stops_exiting_leaves_the_loop_its_other_tasks(poster_exe):
    # only the budget ends a poll: the reads never stop coming
    served, _, ticks = await _serve(poster_exe, 10**10, 10**8, watch_s=0.3)
    assert served > 500  # the guest kept the loop busy …
    # … and a 1 ms timer still fired: up to 300 times in 0.3 s; between two budgets of
    # polling (LINGER_BUDGET_NS, 1 ms), about as often
    assert ticks >= 30


def test_nothing_polls_where_the_vcpus_are_our_own_threads():
    """KVM's and the sim's vCPUs are threads of this process that would wait for the GIL
    a poll holds; only ACRN's run elsewhere."""
    assert AcrnHypervisor.vcpus_elsewhere
    assert not SimHypervisor.vcpus_elsewhere
    assert not KvmHypervisor.vcpus_elsewhere
