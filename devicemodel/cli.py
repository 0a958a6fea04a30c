"""``acrn-pydm``: acrn-dm's command line, plus subcommands of our own.

    acrn-pydm [acrn-dm options] <vm name>         run a VM (as acrn-dm would)
    acrn-pydm run [--hv X] <vm.toml>              run the VM a TOML file describes
    acrn-pydm config --from-args <acrn-dm opts>   print the TOML equivalent of a command line
    acrn-pydm config --to-args <vm.toml>          print the acrn-dm command line of a file
    acrn-pydm config --check <vm.toml>            validate a file
    acrn-pydm lspci [acrn-dm options] <name>      print the VM's PCI functions as lspci -xxxx

User errors print one line, ``acrn-pydm: error: ...``, and exit 2; systemd's unit treats
2 as "do not restart" (RestartPreventExitStatus=2).
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys

import trio

from . import __version__
from .config import (
    ConfigError,
    HelpRequested,
    VersionRequested,
    VmConfig,
    format_memsize,
    parse_args,
    parse_hv,
)
from .hsm.base import HypervisorError

log = logging.getLogger("devicemodel")

USAGE = """\
usage: acrn-pydm [options] <vm name>
       acrn-pydm run [--hv acrn|kvm|sim] <vm.toml>
       acrn-pydm config --from-args [options] <vm name> | --to-args <vm.toml> | --check <vm.toml>
       acrn-pydm lspci [options] <vm name>
       acrn-pydm vhost-user <device spec> --socket-path PATH | --fd N | --print-capabilities
       acrn-pydm vfio-user <device spec> --socket-path PATH | --fd N

acrn-dm compatible options:
  -m, --memsize <size>{K|M|G}    guest memory, 128M..254G in 2M steps (default 256M)
  -s, --pci_slot <slot>,<emul>[,<options>]
                                 PCI function, e.g. 0:0,hostbridge or 3,virtio-blk,disk.img
  -l, --lpc com1,stdio           LPC device (com1..com4[,backend], com5,<backend>,<port>,<irq>)
  -k, --kernel <bzImage>   -B, --bootargs <cmdline>   -r, --ramdisk <initrd>
  -E, --elf_file <elf>     --ovmf [w,]<path> | [w,]code=<path>,vars=<path>
  --cpu_affinity <id,...>        the CPUs (LAPIC ids, as acrn-dm); their count = vCPUs
  --debugexit                    guest write to port 0xF4 powers the VM off
  --virtio_poll <ns>  --virtio_msi  --windows
  --rtvm [--lapic_pt]            a real-time VM (LAPIC passthrough, polled I/O completion)
  --intr_monitor <thr/s>,<period s>,<delay ms>,<duration ms>   interrupt storm monitor
  --mmiodev_pt <base>,<size>     host MMIO range to the guest (hex)
  --acpidev_pt MSFT0101[,<uid>]  the host's TPM 2.0 to the guest
  --cmd_monitor <socket>         JSON command monitor (docs/vm-toml.md)
  --logger_setting console,level=N;disk,level=N;kmsg,level=N   (1 error .. 5 debug)
  -h, --help   -v, --version
  ignored as in acrn-dm (obsolete): -A -Y -G -i --vsbl --part_info --mac_seed --pm_by_vuart
  --pm_notify_channel --iasl (no iasl needed); refused: --enable_trusty --vtpm2 --ssram -U
devices (-s): hostbridge lpc igd-lpc virtio-blk virtio-net virtio-console virtio-rnd
  passthru ivshmem,{hv|dm}:/<name>,<MiB>[,<id>] uart,vuart_idx:<K> dummy
our own:
  --hv acrn|kvm|sim              hypervisor backend (default: acrn with /dev/acrn_hsm,
                                 else kvm where /dev/kvm works, else sim)
  --shutdown_timeout <s>         on SIGTERM, seconds the guest gets to power off (default 60)
  --monitor_idle_timeout <s>     close a --cmd_monitor client idle this long (default 30)
environment: ACRN_PYDM_RUNTIME_DIR (instance locks; default /run/acrn-pydm),
  ACRN_PYDM_LOG_DIR (disk logger; default /var/log/acrn-dm), NOTIFY_SOCKET, WATCHDOG_USEC
"""


def _error(msg: str, status: int = 2) -> int:
    """One line naming the problem; exit 2 for what the user must fix (the unit does
    not restart on it), 1 for a VM that failed while running (the unit restarts it).
    Under systemd the line is at error priority (``journalctl -p err``) and becomes the
    unit's status, so ``systemctl status`` does not keep showing the last step."""
    from .logsetup import journal_stream_is
    from .sdnotify import Notifier

    prefix = "<3>" if journal_stream_is(sys.stderr) else ""
    print(f"{prefix}acrn-pydm: error: {msg}", file=sys.stderr)
    notifier = Notifier()
    notifier.status(f"failed: {msg}")
    notifier.close()
    return status


class VmFailed(Exception):
    """The VM stopped because it could not go on (e.g. a vCPU triple-faulted)."""


async def run_vm(cfg: VmConfig) -> None:
    """Run one VM until it powers off, or SIGTERM/SIGINT/SIGHUP stop it (acrn-dm: SIGINT and
    SIGHUP power off; SIGTERM is systemd's stop). Tells systemd about each step."""
    from .hsm import open_hypervisor
    from .sdnotify import Notifier, watchdog, watchdog_interval
    from .vm import new_vm
    from .vmm.lifecycle import Lifecycle

    notifier = Notifier()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            notifier.status(f"building VM {cfg.name}")
            hv = open_hypervisor(cfg.hv, cfg.vcpus)
            vm = new_vm(cfg, hv)
            vm.build()
            lifecycle = Lifecycle(vm, notifier)
            vm.lifecycle = lifecycle
            async with trio.open_nursery() as nursery:
                await nursery.start(vm.run)
                nursery.start_soon(lifecycle.run)
                interval = watchdog_interval()
                if interval is not None and notifier.enabled:
                    nursery.start_soon(watchdog, notifier, interval)

                async def watch_signals() -> None:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        lifecycle.request_poweroff(f"signal {name}")

                nursery.start_soon(watch_signals)
                notifier.ready(f"VM {cfg.name} running: {vm.vcpu_num} vCPU(s), "
                               f"{format_memsize(cfg.memsize)} RAM, hypervisor {hv.name}")
                await vm.wait_stopped()
                fault = getattr(hv, "exit_reason", None)
                if lifecycle.shutdown_requested is None and fault is None:
                    notifier.stopping(f"VM {cfg.name} powered off by the guest")
                nursery.cancel_scope.cancel()
            if fault is not None:  # the VM could not go on: a failure, not a power-off
                notifier.status(f"VM {cfg.name} failed: {fault}")
                raise VmFailed(f"VM {cfg.name} stopped: {fault}")
            notifier.status(f"VM {cfg.name} stopped")
    finally:
        notifier.close()


def _launch(cfg: VmConfig, *, source: str | None = None) -> int:
    """Everything around run_vm for a description that passed vmcheck.check_vm: the host
    checks, logging, the instance lock, error mapping. ``source``: the VM file, if any."""
    from .instance_lock import InstanceLock
    from .logsetup import setup_logging
    from .vmcheck import check_host

    try:
        check_host(cfg, source=source)  # refused before anything is logged: one line
        problems = setup_logging(cfg.logger_setting, vm_name=cfg.name)
        for msg in [*cfg.warnings, *problems]:
            log.warning("%s", msg)
        lock = InstanceLock(cfg.name)
        lock.acquire()
    except ConfigError as e:
        return _error(str(e))
    try:
        trio.run(run_vm, cfg)
    except VmFailed as e:
        return _error(str(e), 1)
    except (ConfigError, HypervisorError, OSError, BaseExceptionGroup) as e:
        leaf = _user_error(e)
        if leaf is None:
            raise
        if isinstance(leaf, OSError) and leaf.strerror:
            return _error(f"{str(leaf.filename) + ': ' if leaf.filename else ''}{leaf.strerror}")
        return _error(str(leaf))
    finally:
        lock.release()
    return 0


_USER_ERRORS = (ConfigError, HypervisorError, OSError)


def _user_error(exc: BaseException) -> BaseException | None:
    """The error to show the user, looking inside trio's exception groups; None if any
    part of it is a bug (then the traceback is worth more than a one-liner)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_user_error(e) for e in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
        return None
    return exc if isinstance(exc, _USER_ERRORS) else None


RUN_USAGE = "usage: acrn-pydm run [--hv acrn|kvm|sim] <vm.toml>\n"
CONFIG_USAGE = ("usage: acrn-pydm config --from-args [acrn-dm options] <vm name>\n"
                "       acrn-pydm config --to-args <vm.toml>\n"
                "       acrn-pydm config --check <vm.toml>\n")


def _parse(args: list[str], *, check_files: bool = True) -> VmConfig | int:
    """acrn-dm's command line → a VmConfig that passed the shared checks, or the exit
    status after printing help, the version or the one-line error."""
    from .vmcheck import check_vm

    try:
        cfg = parse_args(args, check_files=check_files)
        check_vm(cfg)
    except HelpRequested:
        print(USAGE, end="")
        return 0
    except VersionRequested:
        print(f"acrn-pydm {__version__}")
        return 0
    except ConfigError as e:
        return _error(str(e))
    return cfg


def _wants_help(args: list[str]) -> bool:
    """-h/--help among a subcommand's own options (before any ``--``)."""
    for arg in args:
        if arg == "--":
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def _run_args(args: list[str]) -> tuple[str | None, str]:
    """``run``'s own options, in any order: [--hv X | --hv=X] <vm.toml> (``--`` ends them)."""
    hv: str | None = None
    files: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            files += rest
            break
        if arg == "--hv":
            if not rest:
                raise ConfigError("run --hv needs a value: acrn, kvm or sim")
            hv = parse_hv(rest.pop(0))
        elif arg.startswith("--hv="):
            hv = parse_hv(arg.partition("=")[2])
        elif arg.startswith("-") and arg != "-":
            raise ConfigError(f"run: unknown option {arg}; usage: acrn-pydm run "
                              "[--hv acrn|kvm|sim] <vm.toml>")
        else:
            files.append(arg)
    if len(files) != 1:
        raise ConfigError("usage: acrn-pydm run [--hv acrn|kvm|sim] <vm.toml>; "
                          "give exactly one VM file")
    return hv, files[0]


def _cmd_run(args: list[str]) -> int:
    from .config.toml import load
    from .vmcheck import check_vm

    if _wants_help(args):
        print(RUN_USAGE, end="")
        return 0
    try:
        hv, path = _run_args(args)
        cfg = load(path)
        check_vm(cfg, source=path)
        if hv is not None:
            cfg.hv = hv
    except ConfigError as e:
        return _error(str(e))
    return _launch(cfg, source=path)


def _cmd_config(args: list[str]) -> int:
    from .config.toml import dumps, load
    from .vmcheck import check_vm

    if not args:
        return _error("usage: acrn-pydm config --from-args <options> <name> | "
                      "--to-args <vm.toml> | --check <vm.toml>")
    mode, rest = args[0], args[1:]
    if mode in ("-h", "--help"):
        print(CONFIG_USAGE, end="")
        return 0
    if mode == "--from-args":
        parsed = _parse(rest, check_files=False)
        if isinstance(parsed, int):
            return parsed
        for msg in parsed.warnings:
            print(f"acrn-pydm: warning: {msg}", file=sys.stderr)
        sys.stdout.write(dumps(parsed))
        return 0
    if mode in ("--to-args", "--check"):
        if _wants_help(rest):
            print(CONFIG_USAGE, end="")
            return 0
        if rest[:1] == ["--"]:
            rest = rest[1:]
        if len(rest) != 1:
            return _error(f"{mode} takes one VM file, e.g. acrn-pydm config {mode} vm1.toml")
        try:
            cfg = load(rest[0], check_files=mode == "--check")
            check_vm(cfg, source=rest[0])
        except ConfigError as e:
            return _error(str(e))
        if mode == "--check":
            print(f"{rest[0]}: VM {cfg.name} OK")
        else:
            print(shlex.join(["acrn-pydm", *cfg.to_args()]))
        return 0
    return _error(f"config {mode}: unknown mode; use --from-args, --to-args or --check")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return _error("no VM given; usage: acrn-pydm [options] <vm name>, or a subcommand "
                      "(run, config, lspci, vhost-user); acrn-pydm --help lists them")
    if args[0] == "lspci":
        from .lspci import main as lspci_main

        return lspci_main(args[1:])
    if args[0] == "vhost-user":
        from .vhost_user.cli import main as vhost_user_main

        return vhost_user_main(args[1:])
    if args[0] == "vfio-user":
        from .vfio_user.cli import main as vfio_user_main

        return vfio_user_main(args[1:])
    if args[0] == "run":
        return _cmd_run(args[1:])
    if args[0] == "config":
        return _cmd_config(args[1:])
    parsed = _parse(args)
    if isinstance(parsed, int):
        return parsed
    return _launch(parsed)
