"""acrn-dm's command line parsed into the VM description (``VmConfig.to_args`` writes it back).

A launch script written for acrn-dm must work unchanged, so the syntax is acrn-dm's
(acrn-facts §4.1-4.2), parsed the way its getopt_long loop does: short options may be
clustered (``-Av``) or carry their value inline (``-m4G``), long options take ``--x=v`` or
``--x v`` and may be abbreviated to a unique prefix, and options may follow the VM name.
Options acrn-dm has that we do not implement are refused by name, never silently ignored;
the ones acrn-dm itself ignores as obsolete are ignored with a warning, as acrn-dm does.
Every error is one line that names the problem and the fix.
"""

from __future__ import annotations

from ..errors import ConfigError
from .logger_setting import parse_logger_setting
from .model import VmConfig
from .rt_options import parse_acpidev_pt, parse_intr_monitor, parse_mmiodev_pt
from .validate import validate
from .values import (
    parse_cpu_affinity,
    parse_hv,
    parse_lpc,
    parse_mem,
    parse_monitor_idle_timeout,
    parse_ovmf,
    parse_shutdown_timeout,
    parse_slot,
    parse_virtio_poll,
)

#: acrn-dm's warning, in our words: --lapic_pt needs --rtvm
LAPIC_PT_ALONE = ("--lapic_pt without --rtvm is ignored: only a real-time VM passes its "
                  "local APIC through (add --rtvm, which implies it)")


class HelpRequested(Exception):  # noqa: N818 - a request, not an error
    """``-h``/``--help`` was on the command line."""


class VersionRequested(Exception):  # noqa: N818
    """``-v``/``--version`` was on the command line."""


# --- the option table (acrn-dm HEAD's getopt string and long_options, plus ours) ----------

#: short option letter → canonical long name; the value says whether it takes an argument
_SHORT: dict[str, tuple[str, bool]] = {
    "A": ("--acpi", False), "h": ("--help", False), "Y": ("--mptgen", False),
    "v": ("--version", False), "E": ("--elf_file", True), "k": ("--kernel", True),
    "r": ("--ramdisk", True), "B": ("--bootargs", True), "s": ("--pci_slot", True),
    "m": ("--memsize", True), "l": ("--lpc", True), "U": ("-U", True),
    "G": ("--gvtargs", True), "i": ("--ioc_node", True),
}
_LONG: dict[str, bool] = {
    "--acpi": False, "--elf_file": True, "--ioc_node": True, "--lpc": True,
    "--pci_slot": True, "--memsize": True, "--mptgen": False, "--kernel": True,
    "--ramdisk": True, "--bootargs": True, "--version": False, "--gvtargs": True,
    "--help": False, "--mac_seed": True, "--vsbl": True, "--ovmf": True, "--iasl": True,
    "--cpu_affinity": True, "--part_info": True, "--enable_trusty": False,
    "--virtio_poll": True, "--debugexit": False, "--intr_monitor": True,
    "--cmd_monitor": True, "--acpidev_pt": True, "--mmiodev_pt": True, "--vtpm2": True,
    "--lapic_pt": False, "--rtvm": False, "--ssram": True, "--logger_setting": True,
    "--pm_notify_channel": True, "--pm_by_vuart": True, "--windows": False,
    "--virtio_msi": False,
    # ours
    "--hv": True, "--shutdown_timeout": True, "--monitor_idle_timeout": True,
}
#: acrn-dm options we do not implement: refused by name (and why, where it is a choice)
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "--enable_trusty": "trusty is out of acrn-pydm's scope",
    "--vtpm2": "the software TPM (vtpm2) is out of acrn-pydm's scope",
    "--ssram": "software SRAM (vSSRAM) is not implemented",
    "-U": "acrn-dm no longer takes a UUID either; remove it",
}
#: options acrn-dm HEAD itself ignores (or that only concern its C build); we warn and go on
OBSOLETE_OPTIONS: dict[str, str] = {
    "--acpi": "-A/--acpi is obsolete and ignored: ACPI tables are always built",
    "--mptgen": "-Y/--mptgen is obsolete and ignored",
    "--gvtargs": "-G/--gvtargs is obsolete and ignored",
    "--ioc_node": "-i/--ioc_node is obsolete and ignored",
    "--vsbl": "--vsbl is obsolete and ignored",
    "--part_info": "--part_info is obsolete and ignored",
    "--pm_by_vuart": "--pm_by_vuart is obsolete and ignored",
    "--mac_seed": "--mac_seed is obsolete and ignored; use virtio-net's mac_seed= option",
    "--iasl": "--iasl ignored: acrn-pydm builds its ACPI tables without iasl",
    "--pm_notify_channel": "--pm_notify_channel is obsolete and ignored",
}
#: --pm_notify_channel values acrn-dm accepts (and then ignores)
PM_NOTIFY_CHANNELS = ("ioc", "power_button", "uart", "uart,allow_trigger_s5")
#: emulation names acrn-dm ignores as obsolete (with a warning)
OBSOLETE_EMULS = frozenset({"pci-gvt", "virtio-hdcp", "npk", "virtio-coreu"})
#: every emulation name acrn-dm HEAD knows (``.class_name`` in devicemodel/hw)
ACRN_EMULS = frozenset({
    "ahci", "ahci-cd", "ahci-hd", "amd_hostbridge", "dummy", "hostbridge", "igd-lpc",
    "ivshmem", "lpc", "passthru", "uart", "vhost-vsock", "virtio-audio", "virtio-blk",
    "virtio-console", "virtio-gpio", "virtio-gpu", "virtio-heci", "virtio-hyper_dmabuf",
    "virtio-i2c", "virtio-input", "virtio-ipu", "virtio-net", "virtio-rnd", "virtio-rpmb",
    "wdt-i6300esb", "xhci",
})
# --- the command line -------------------------------------------------------------------

def _long_name(opt: str) -> str:
    """Resolve a long option as getopt_long does: exact, else a unique prefix."""
    if opt in _LONG:
        return opt
    matches = [name for name in _LONG if name.startswith(opt)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"option {opt} is ambiguous ({', '.join(sorted(matches))}); "
                          "spell it out")
    raise ConfigError(f"unknown option {opt}; see acrn-pydm --help")


def _tokens(argv: list[str]) -> list[tuple[str, str | None] | str]:
    """Split argv into (canonical option, value) pairs and positional strings."""
    out: list[tuple[str, str | None] | str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg.startswith("--"):
            text, eq, inline = arg.partition("=")
            name = _long_name(text)
            if name in UNSUPPORTED_OPTIONS:
                raise ConfigError(f"not supported by acrn-pydm: {name} "
                                  f"({UNSUPPORTED_OPTIONS[name]})")
            if not _LONG[name]:
                if eq:
                    raise ConfigError(f"{name} takes no value; write {name} alone")
                out.append((name, None))
            elif eq:
                out.append((name, inline))
            else:
                if i >= len(argv):
                    raise ConfigError(f"{name} needs a value; see acrn-pydm --help")
                out.append((name, argv[i]))
                i += 1
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                letter = arg[j]
                j += 1
                if letter not in _SHORT:
                    raise ConfigError(f"unknown option -{letter}; see acrn-pydm --help")
                name, takes = _SHORT[letter]
                if name in UNSUPPORTED_OPTIONS:
                    raise ConfigError(f"not supported by acrn-pydm: {name} "
                                      f"({UNSUPPORTED_OPTIONS[name]})")
                if not takes:
                    out.append((name, None))
                    continue
                if j < len(arg):
                    out.append((name, arg[j:]))
                elif i < len(argv):
                    out.append((name, argv[i]))
                    i += 1
                else:
                    raise ConfigError(f"-{letter} needs a value; see acrn-pydm --help")
                break
        else:
            out.append(arg)
    return out


def parse_args(argv: list[str], *, check_files: bool = True) -> VmConfig:
    """Parse an acrn-dm style argument list (no program name) into a VmConfig.

    ``check_files`` makes a missing kernel/ramdisk/ELF/OVMF image an error now (acrn-dm
    checks them while parsing too) rather than half-way through building the VM.
    """
    for arg in argv:  # a real argv cannot hold one; a VM file written from it would refuse it
        if "\0" in arg:
            raise ConfigError(f"argument {arg!r} holds a NUL character, which no acrn-dm "
                              "option can; remove it")
    cfg = VmConfig()
    positional: list[str] = []
    tokens = _tokens(argv)
    # help and version win wherever they appear, as in acrn-dm
    for tok in tokens:
        if isinstance(tok, tuple) and tok[0] == "--help":
            raise HelpRequested()
    for tok in tokens:
        if isinstance(tok, tuple) and tok[0] == "--version":
            raise VersionRequested()
    for tok in tokens:
        if isinstance(tok, str):
            positional.append(tok)
            continue
        name, val = tok
        if name == "--pm_notify_channel" and val not in PM_NOTIFY_CHANNELS:
            raise ConfigError(f"--pm_notify_channel {val}: acrn-dm takes "
                              f"{', '.join(PM_NOTIFY_CHANNELS)} (and ignores it)")
        if name in OBSOLETE_OPTIONS:
            cfg.warnings.append(OBSOLETE_OPTIONS[name])
            continue
        _apply(cfg, name, val or "")
    if cfg.lapic_pt and not cfg.rtvm:
        cfg.warnings.append(LAPIC_PT_ALONE)

    if len(positional) != 1:
        raise ConfigError(
            "the VM name is missing; put it last, e.g. acrn-pydm -m 1G ... vm1"
            if not positional
            else f"expected one VM name, got {len(positional)}: {' '.join(positional)}; "
            "quote arguments that contain spaces"
        )
    cfg.name = positional[0]
    validate(cfg, check_files=check_files)
    return cfg


def _apply(cfg: VmConfig, opt: str, val: str) -> None:
    if opt == "--memsize":
        cfg.memsize = parse_mem(val)
    elif opt == "--pci_slot":
        slot = parse_slot(val)
        if slot.emul in OBSOLETE_EMULS:
            cfg.warnings.append(f"-s {val}: the {slot.emul!r} emulation is obsolete and ignored")
            return
        cfg.slots.append(slot)
    elif opt == "--lpc":
        cfg.lpc.append(parse_lpc(val))
    elif opt in ("--kernel", "--ramdisk", "--elf_file") and not val:
        # as the TOML front end: an empty path would silently boot nothing
        raise ConfigError(f"{opt} needs a path, e.g. {opt} /var/lib/acrn/image")
    elif opt == "--kernel":
        cfg.kernel = val
    elif opt == "--bootargs":
        cfg.bootargs = val
    elif opt == "--ramdisk":
        cfg.ramdisk = val
    elif opt == "--elf_file":
        cfg.elf = val
    elif opt == "--ovmf":
        cfg.ovmf = parse_ovmf(val)
    elif opt == "--cpu_affinity":
        cfg.cpu_affinity = parse_cpu_affinity(val)
    elif opt == "--virtio_poll":
        cfg.virtio_poll = parse_virtio_poll(val)
    elif opt == "--cmd_monitor":
        if not val:
            raise ConfigError("--cmd_monitor needs a socket path, e.g. /run/acrn-pydm/vm1.sock")
        cfg.cmd_monitor = val
    elif opt == "--logger_setting":
        parse_logger_setting(val)
        cfg.logger_setting = val
    elif opt == "--hv":
        cfg.hv = parse_hv(val)
    elif opt == "--shutdown_timeout":
        cfg.shutdown_timeout = parse_shutdown_timeout(val)
    elif opt == "--monitor_idle_timeout":
        cfg.monitor_idle_timeout = parse_monitor_idle_timeout(val)
    elif opt == "--debugexit":
        cfg.debugexit = True
    elif opt == "--virtio_msi":
        cfg.virtio_msi = True
    elif opt == "--windows":
        cfg.windows = True
    elif opt == "--rtvm":
        cfg.rtvm = True
    elif opt == "--lapic_pt":
        cfg.lapic_pt = True
    elif opt == "--intr_monitor":
        cfg.intr_monitor = parse_intr_monitor(val)
    elif opt == "--mmiodev_pt":
        cfg.mmiodev_pt.append(parse_mmiodev_pt(val))
    elif opt == "--acpidev_pt":
        cfg.acpidev_pt.append(parse_acpidev_pt(val))
    else:  # every name in _LONG is handled above or refused/ignored before
        raise ConfigError(f"option {opt} is not handled; see acrn-pydm --help")


__all__ = [
    "ACRN_EMULS", "LAPIC_PT_ALONE", "OBSOLETE_EMULS", "OBSOLETE_OPTIONS", "UNSUPPORTED_OPTIONS",
    "HelpRequested", "VersionRequested", "parse_args",
]
