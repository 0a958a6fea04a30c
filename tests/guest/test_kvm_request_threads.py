"""Where a KVM guest's requests are answered: a ``vcpu_safe`` handler on the vCPU thread
itself (no hand-off to the loop), any other handler on the event loop; a loop that is busy
when the request comes still gets it, and the guest sees the same values either way."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from devicemodel.guestkit.kvm_programs import (
    VERDICT_PASS,
    GuestRun,
    build,
    kvm_skip_reason,
    run_guest,
)

SKIP = kvm_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"no usable KVM: {SKIP}")

LOOP_PORT = 0xE4  # loop.c writes 0, 1, 2, ... here
COUNT_PORT = 0xE5  # and reads its count from here
COUNT = 300


class Port:
    def __init__(self, *, safe: bool, count: int = COUNT) -> None:
        self.vcpu_safe = safe
        self.count = count
        self.values: list[int] = []
        self.threads: set[int] = set()

    def read(self, offset: int, size: int) -> int:
        self.threads.add(threading.get_ident())
        return self.count if offset == 1 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.threads.add(threading.get_ident())
        self.values.append(value)


@pytest.fixture(scope="module")
def loop_image(tmp_path_factory):
    return build("loop", tmp_path_factory.mktemp("guests"))[1]


@pytest.mark.parametrize("safe", [True, False])
async def test_a_vcpu_safe_handler_runs_on_the_vcpu_thread_others_on_the_loop(loop_image, safe):
    port = Port(safe=safe)

    def setup(run: GuestRun) -> None:
        run.vm.ports.register(LOOP_PORT, 8, port, "loop")

    loop_thread = threading.get_ident()
    run = await run_guest(loop_image, setup=setup, timeout=60)
    assert run.verdict == VERDICT_PASS
    assert port.values == list(range(COUNT))
    if safe:
        # the loop answers only what reached it while it was awake (start-up)
        assert loop_thread not in port.threads or len(port.threads) == 2
        assert any(t != loop_thread for t in port.threads)
    else:
        assert port.threads == {loop_thread}


async def test_requests_reach_a_busy_loop_and_complete(loop_image):
    """The loop holds the gate while it runs: a vCPU that finds it busy hands over."""
    port = Port(safe=True, count=5000)

    async def during(run: GuestRun) -> None:
        for _ in range(20):  # the loop is busy (holds the gate) now and then
            time.sleep(0.005)
            await trio.sleep(0.002)

    def setup(run: GuestRun) -> None:
        run.vm.ports.register(LOOP_PORT, 8, port, "loop")

    run = await run_guest(loop_image, setup=setup, during=during, timeout=60)
    assert run.verdict == VERDICT_PASS
    assert port.values == list(range(5000))
    assert threading.get_ident() in port.threads  # some reached the loop
    assert len(port.threads) == 2  # and the rest were answered on the vCPU thread
