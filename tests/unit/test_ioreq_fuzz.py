"""Random slot contents: the server never raises, never hangs, never writes the state field,
and completes exactly the slots it owns (PROCESSING with kernel_handled == 0)."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.ioreq import IoreqServer
from tests.support.ioreq_slots import FakeHv, check_random_slots, slot


def _serve_in_trio(server: IoreqServer) -> None:
    async def main():
        with trio.fail_after(5):
            await server.serve()

    trio.run(main)


@settings(max_examples=300, deadline=None)
@given(vcpu_num=st.integers(1, 16), slots=st.lists(slot, min_size=16, max_size=16))
def test_random_slots_never_break_the_server(vcpu_num, slots):
    check_random_slots(vcpu_num, slots, FakeHv(), _serve_in_trio)
