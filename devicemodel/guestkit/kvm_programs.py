"""Build the guest test programs (``programs/``: freestanding C and asm) and run them on
the KVM backend inside a real Vm.

``run_guest`` copies a flat binary (linked at 1 MiB) into guest RAM itself and starts the
BSP there in 32-bit protected mode with flat 4 GiB segments and paging off (the state
ACRN's ELF/multiboot loader sets up), with tiny test stand-ins for COM1 and debugexit:
those tests then depend on the backend and the request path only.  ``build`` also keeps
the ELF, so other tests can boot the same program through ``-E`` and the real platform.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from devicemodel.config import parse_args
from devicemodel.hsm.base import VcpuRegs
from devicemodel.hsm.kvm import KvmHypervisor, kvm_usable
from devicemodel.vm import Vm

GUESTS = Path(__file__).resolve().parent / "programs"  # the C/asm sources, linker script
LOAD_ADDR = 0x10_0000
COM1 = 0x3F8
DEBUGEXIT = 0xF4
VERDICT_PASS = 0x01
_RUNTIME = ("start.S", "lib.c", "lib.h", "guest.ld")
_CFLAGS = ["-m32", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
           "-fno-asynchronous-unwind-tables", "-mgeneral-regs-only", "-nostdlib", "-O2",
           "-Wall", "-Werror"]


def kvm_skip_reason() -> str | None:
    """Why the KVM guest tests cannot run here (None: they can)."""
    why = kvm_usable()
    if why:
        return why
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def build(name: str, out_dir: Path) -> tuple[Path, bytes]:
    """Compile programs/<name>.c with the runtime: returns (ELF path, flat image)."""
    extra = [f"{name}.S"] if (GUESTS / f"{name}.S").exists() else []
    sources = [GUESTS / f"{name}.c", *(GUESTS / s for s in (*_RUNTIME, *extra))]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    work = out_dir / f"{name}-{digest}"
    elf, flat = work / f"{name}.elf", work / f"{name}.bin"
    if not flat.exists():
        work.mkdir(parents=True, exist_ok=True)
        objs = []
        for src in ("start.S", "lib.c", f"{name}.c", *extra):
            obj = work / (src.replace(".", "_") + ".o")
            subprocess.run(["gcc", *_CFLAGS, "-c", str(GUESTS / src), "-o", str(obj)],
                           check=True, capture_output=True, text=True)
            objs.append(str(obj))
        subprocess.run(["ld", "-m", "elf_i386", "-nostdlib", "-T", str(GUESTS / "guest.ld"),
                        "-o", str(elf), *objs], check=True, capture_output=True, text=True)
        subprocess.run(["objcopy", "-O", "binary", str(elf), str(flat)], check=True,
                       capture_output=True, text=True)
    return elf, flat.read_bytes()


def pm32_regs(entry: int, esp: int = 0) -> VcpuRegs:
    """32-bit protected mode, flat 4 GiB code/data, paging off, interrupts off."""
    return VcpuRegs(
        rip=entry, rsp=esp, rflags=0x2, cr0=0x11,
        cs_base=0, cs_limit=0xFFFF_FFFF, cs_ar=0xC09B, cs_sel=0x08,
        ss_sel=0x10, ds_sel=0x10, es_sel=0x10, fs_sel=0x10, gs_sel=0x10,
    )


class Uart:
    """Just enough of a 16550 at COM1 to print: THR writes captured, LSR always ready
    (plain state: answered on the vCPU thread, ``vcpu_safe``)."""

    vcpu_safe = True

    def __init__(self) -> None:
        self.out = bytearray()

    def read(self, offset: int, size: int) -> int:
        return 0x60 if offset == 5 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.out.append(value & 0xFF)

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")


@dataclass
class GuestRun:
    """What a guest did: its serial output, its debugexit verdict, why the VM stopped."""

    vm: Vm
    hv: KvmHypervisor
    uart: Uart = field(default_factory=Uart)
    verdict: int | None = None
    exit_reason: str | None = None
    done: trio.Event = field(default_factory=trio.Event)


class DebugExit:
    def __init__(self, run: GuestRun) -> None:
        self.run = run

    def read(self, offset: int, size: int) -> int:
        return 0xFFFF_FFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if self.run.verdict is None:
            self.run.verdict = value & 0xFF
        self.run.done.set()
        self.run.vm.poweroff()


async def run_guest(
    image: bytes,
    *,
    vcpus: int = 1,
    slots: tuple[str, ...] = ("0:0,hostbridge",),
    setup: Callable[[GuestRun], None] | None = None,
    during: Callable[[GuestRun], Awaitable[None]] | None = None,
    timeout: float = 30.0,
) -> GuestRun:
    """Boot ``image`` on a fresh KVM VM and serve it until debugexit, a stop, or timeout.

    ``setup`` runs before the VM starts (register handlers); ``during`` runs as a task
    beside the running VM (pause, reset, inject)."""
    argv = ["-m", "128M", "--hv", "kvm", "--cpu_affinity", ",".join(map(str, range(vcpus)))]
    for s in slots:
        argv += ["-s", s]
    hv = KvmHypervisor()
    vm = Vm(parse_args([*argv, "kvmguest"]), hv)
    vm.build()
    run = GuestRun(vm=vm, hv=hv)
    try:
        assert vm.memory is not None
        vm.memory.write(LOAD_ADDR, image)
        hv.set_vcpu_regs(0, pm32_regs(LOAD_ADDR))
        vm.ports.register(COM1, 8, run.uart, "test-com1")
        vm.ports.register(DEBUGEXIT, 1, DebugExit(run), "test-debugexit")
        if setup is not None:
            setup(run)
    except BaseException:
        vm._release()
        raise
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        if during is not None:
            nursery.start_soon(during, run)
        with trio.move_on_after(timeout):
            await vm.wait_stopped()
        vm.poweroff()
        await vm.wait_stopped()
        nursery.cancel_scope.cancel()  # a ``during`` task that is still waiting
    run.exit_reason = hv.exit_reason
    return run
