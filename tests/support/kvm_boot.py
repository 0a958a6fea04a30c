"""A guest program booted through acrn-dm's launch line on KVM: the platform's ELF loader,
LPC UART and debugexit (devicemodel/guestkit/kvm_programs.py's ``run_guest`` uses test
stand-ins for them instead)."""

from __future__ import annotations

from pathlib import Path

import trio

from devicemodel.vm import running


async def boot_elf(elf: Path, serial: Path, *extra: str) -> tuple[int | None, str, object]:
    """acrn-dm's launch line for a test guest, on KVM: the platform's ELF loader, LPC
    UART and debugexit instead of the test stand-ins."""
    args = ["--hv", "kvm", "--debugexit", "-E", str(elf), "-m", "128M",
            "-s", "0:0,hostbridge", "-s", "1:0,lpc", "-l", f"com1,file:{serial}", *extra,
            "kvmcli"]
    async with running(args) as vm:
        with trio.move_on_after(30):
            await vm.wait_stopped()
    assert vm.platform is not None
    return vm.platform.exit_code, serial.read_text(), vm.hv
