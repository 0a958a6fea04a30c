"""``acrn-pydm``: acrn-dm's command line, plus subcommands of our own.

    acrn-pydm [acrn-dm options] <vm name>     run a VM (as acrn-dm would)
    acrn-pydm lspci [acrn-dm options] <name>  print the VM's PCI functions as lspci -xxxx

User errors print one line, ``acrn-pydm: error: ...``, and exit 2.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from . import __version__
from .config import ConfigError, VmConfig, parse_args
from .hsm.base import HypervisorError

log = logging.getLogger("devicemodel")

USAGE = """\
usage: acrn-pydm [options] <vm name>
       acrn-pydm lspci [options] <vm name>

acrn-dm compatible options:
  -m, --memsize <size>{K|M|G}    guest memory (default 256M)
  -s, --pci_slot <slot>,<emul>[,<options>]
                                 PCI function, e.g. 0:0,hostbridge or 3,virtio-blk,disk.img
  -l, --lpc com1,stdio           LPC device
  -k, --kernel <bzImage>   -B, --bootargs <cmdline>   -r, --ramdisk <initrd>
  -E, --elf_file <elf>     --ovmf [w,]<path> | [w,]code=<path>,vars=<path>
  --cpu_affinity <cpu,...>       pCPUs; their count is the vCPU count
  --debugexit                    guest write to port 0xF4 powers the VM off
  --virtio_poll <ns>  --virtio_msi  --cmd_monitor <socket>  --logger_setting <spec>
our own:
  --hv acrn|kvm|sim              hypervisor backend (default: acrn if /dev/acrn_hsm exists,
                                 else sim)
"""


def _error(msg: str) -> int:
    print(f"acrn-pydm: error: {msg}", file=sys.stderr)
    return 2


def _setup_logging(cfg: VmConfig | None) -> None:
    level = logging.INFO
    if cfg is not None and cfg.logger_setting:
        from .logsetup import level_from_setting

        level = level_from_setting(cfg.logger_setting)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="acrn-pydm[%(name)s] %(levelname)s: %(message)s"
    )


async def run_vm(cfg: VmConfig) -> None:
    """Run one VM until it powers off or we get SIGTERM/SIGINT/SIGHUP."""
    from .hsm import open_hypervisor
    from .vm import Vm

    hv = open_hypervisor(cfg.hv, cfg.vcpus)
    vm = Vm(cfg, hv)
    vm.build()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(vm.run)

            async def watch_signals() -> None:
                async for signum in signals:
                    log.info("signal %s: powering off", signal.Signals(signum).name)
                    vm.poweroff()
                    return

            nursery.start_soon(watch_signals)
            await vm.wait_stopped()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-v", "--version"):
        print(f"acrn-pydm {__version__}")
        return 0
    if args[0] == "lspci":
        from .lspci import main as lspci_main

        return lspci_main(args[1:])
    try:
        cfg = parse_args(args)
    except ConfigError as e:
        return _error(str(e))
    _setup_logging(cfg)
    try:
        trio.run(run_vm, cfg)
    except ConfigError as e:
        return _error(str(e))
    except HypervisorError as e:
        return _error(str(e))
    except OSError as e:
        return _error(f"{e.filename or ''}: {e.strerror}" if e.strerror else str(e))
    return 0
