"""The platform under real guest code on the KVM backend: the ELF/multiboot loader starts
the program, it prints through the LPC COM1 (file backend), resets through 0xCF9 and the
acrn-dm reset sequence, boots again, and ends through --debugexit with its verdict."""

from __future__ import annotations

import pytest
import trio

from devicemodel.guestkit.kvm_programs import VERDICT_PASS, build, kvm_skip_reason
from devicemodel.vm import running

SKIP = kvm_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"no usable KVM: {SKIP}")


async def test_reboot_guest_through_lpc_reset_and_debugexit(tmp_path):
    from devicemodel.hsm.kvm import KvmHypervisor

    elf, _ = build("reboot", tmp_path)
    out = tmp_path / "com1.log"
    args = ["--debugexit", "-E", str(elf), "-s", "0:0,hostbridge", "-s", "1:0,lpc",
            "-l", f"com1,file:{out}", "--cpu_affinity", "0,1", "reboot"]
    async with running(args, KvmHypervisor()) as vm:
        with trio.fail_after(60):
            await vm.wait_stopped()
        assert vm.platform.power.resets == 1
        assert vm.platform.exit_code == VERDICT_PASS
    assert out.read_text() == "first boot\nsecond boot\n"
