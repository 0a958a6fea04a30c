"""The VM description, and acrn-dm's command line parsed into it.

A launch script written for acrn-dm must work unchanged, so the syntax is acrn-dm's
(acrn-facts §4.1-4.2), parsed the way its getopt_long loop does: short options may be
clustered (``-Av``) or carry their value inline (``-m4G``), long options take ``--x=v`` or
``--x v`` and may be abbreviated to a unique prefix, and options may follow the VM name.
Options acrn-dm has that we do not implement are refused by name, never silently ignored;
the ones acrn-dm itself ignores as obsolete are ignored with a warning, as acrn-dm does.
Every error is one line that names the problem and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import ConfigError
from .memory import GiB, KiB, MiB, check_memsize, parse_memsize
from .slot import SlotConfig

DEFAULT_MEMSIZE = 256 * MiB
HYPERVISORS = ("acrn", "kvm", "sim")
VM_NAME_MAX = 15  # acrn-dm: MAX_VM_NAME_LEN 16 including the NUL
DEFAULT_SHUTDOWN_TIMEOUT = 60.0


class HelpRequested(Exception):  # noqa: N818 - a request, not an error
    """``-h``/``--help`` was on the command line."""


class VersionRequested(Exception):  # noqa: N818
    """``-v``/``--version`` was on the command line."""


@dataclass(frozen=True)
class LpcConfig:
    """One ``-l`` option: an LPC device such as ``com1,stdio``.

    ``backend`` is everything after the first comma for COM1-COM4 (acrn-dm hands it to the
    UART backend whole); COM5 has ``<backend>,<port>,<irq>`` and ``extra`` = (port, irq).
    """

    device: str
    backend: str = ""
    extra: tuple[str, ...] = ()

    def to_arg(self) -> str:
        return ",".join([self.device, *([self.backend] if self.backend or self.extra else []),
                         *self.extra])


@dataclass(frozen=True)
class OvmfConfig:
    code: str
    vars: str | None = None
    writeback: bool = False

    def to_arg(self) -> str:
        prefix = "w," if self.writeback else ""
        if self.vars is None:
            return f"{prefix}{self.code}"
        return f"{prefix}code={self.code},vars={self.vars}"


@dataclass
class VmConfig:
    name: str = ""
    memsize: int = DEFAULT_MEMSIZE
    cpu_affinity: list[int] = field(default_factory=list)
    slots: list[SlotConfig] = field(default_factory=list)
    lpc: list[LpcConfig] = field(default_factory=list)
    kernel: str | None = None
    bootargs: str | None = None
    ramdisk: str | None = None
    elf: str | None = None
    ovmf: OvmfConfig | None = None
    debugexit: bool = False
    virtio_poll: int | None = None
    virtio_msi: bool = False
    windows: bool = False
    cmd_monitor: str | None = None
    logger_setting: str | None = None
    hv: str | None = None
    #: seconds a guest gets to power off after SIGTERM/``poweroff`` before it is destroyed
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    #: what the parser ignored on purpose (obsolete acrn-dm options); logged at start
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def vcpus(self) -> int:
        return len(self.cpu_affinity) or 1

    @property
    def pcpus(self) -> list[int]:
        """The physical CPU indexes behind ``cpu_affinity``.

        acrn-dm HEAD takes LAPIC ids (what ACRN's launch scripts pass) and maps each to the
        pCPU whose LAPIC it is: the n-th enabled LAPIC of the host MADT is pCPU n. Where the
        MADT cannot be read or does not list an id, the ids are taken as pCPU indexes.
        """
        host = host_lapic_ids()
        if host and all(i in host for i in self.cpu_affinity):
            return [host.index(i) for i in self.cpu_affinity]
        return list(self.cpu_affinity)

    @property
    def cpu_affinity_mask(self) -> int:
        """CREATE_VM's pCPU bitmap."""
        mask = 0
        for cpu in self.pcpus:
            if cpu > 63:
                raise ConfigError(f"--cpu_affinity {','.join(map(str, self.cpu_affinity))}: "
                                  f"pCPU {cpu} is beyond the 64 ACRN supports; pick other CPUs")
            mask |= 1 << cpu
        return mask

    def slot(self, bus: int, dev: int, func: int) -> SlotConfig | None:
        for s in self.slots:
            if (s.bus, s.dev, s.func) == (bus, dev, func):
                return s
        return None

    def to_args(self) -> list[str]:
        """An acrn-dm command line (without the program name) that parses back to self."""
        out: list[str] = []
        if self.hv:
            out += ["--hv", self.hv]
        out += ["-m", format_memsize(self.memsize)]
        if self.cpu_affinity:
            out += ["--cpu_affinity", ",".join(map(str, self.cpu_affinity))]
        for flag, on in (("--windows", self.windows), ("--debugexit", self.debugexit),
                         ("--virtio_msi", self.virtio_msi)):
            if on:
                out.append(flag)
        if self.ovmf:
            out += ["--ovmf", self.ovmf.to_arg()]
        for opt, val in (("-k", self.kernel), ("-r", self.ramdisk), ("-B", self.bootargs),
                         ("-E", self.elf), ("--cmd_monitor", self.cmd_monitor),
                         ("--logger_setting", self.logger_setting)):
            if val is not None:
                out += [opt, val]
        if self.virtio_poll is not None:
            out += ["--virtio_poll", str(self.virtio_poll)]
        if self.shutdown_timeout != DEFAULT_SHUTDOWN_TIMEOUT:
            out += ["--shutdown_timeout", f"{self.shutdown_timeout:g}"]
        for lpc in self.lpc:
            out += ["-l", lpc.to_arg()]
        for s in self.slots:
            out += ["-s", s.to_arg()]
        out.append(self.name)
        return out


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
    "--hv": True, "--shutdown_timeout": True,
}
#: acrn-dm options we do not implement: refused by name
UNSUPPORTED_OPTIONS = frozenset({
    "--enable_trusty", "--intr_monitor", "--acpidev_pt", "--mmiodev_pt", "--vtpm2",
    "--lapic_pt", "--rtvm", "--ssram", "--pm_notify_channel", "-U",
})
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
}
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
LPC_DEVICES = ("com1", "com2", "com3", "com4", "com5")


# --- value parsers ---------------------------------------------------------------------

def format_memsize(size: int) -> str:
    """The shortest acrn-dm spelling of a byte count (``4G``, ``4096M`` is ``4G``)."""
    for unit, mult in (("G", GiB), ("M", MiB), ("K", KiB)):
        if size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{size}B"


def parse_mem(text: str, opt: str = "-m") -> int:
    try:
        size = parse_memsize(text)
    except ValueError:
        raise ConfigError(
            f"{opt} {text}: not a memory size; write a number with a K, M or G suffix, "
            "e.g. -m 2048M"
        ) from None
    try:
        check_memsize(size)
    except ValueError as e:
        raise ConfigError(f"{opt} {text}: {e}; give at least 128M in 2M steps") from None
    return size


def _bdf_numbers(where: str) -> list[int] | None:
    """acrn-dm's parse_bdf: up to three decimal fields separated by ':', '/' or '.'."""
    parts = where.replace("/", ":").replace(".", ":").split(":")
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return [int(p, 10) for p in parts]


def parse_slot_address(where: str, opt: str) -> tuple[int, int, int]:
    nums = _bdf_numbers(where)
    if nums is None or not 1 <= len(nums) <= 3:
        raise ConfigError(
            f"{opt}: slot {where!r} is not <slot>[:<func>] or <bus>:<slot>:<func> in decimal; "
            "write e.g. 3 or 0:3:0"
        )
    if len(nums) == 1:
        bus, dev, func = 0, nums[0], 0
    elif len(nums) == 2:
        bus, dev, func = 0, nums[0], nums[1]
    else:
        bus, dev, func = nums
    if not 0 <= bus <= 255 or not 0 <= dev <= 31 or not 0 <= func <= 7:
        raise ConfigError(
            f"{opt}: slot {where!r} is out of range; use bus 0..255, slot 0..31, function 0..7"
        )
    return bus, dev, func


def parse_slot(text: str) -> SlotConfig:
    """``<bus>:<slot>:<func>,<emul>[,b][,<cfg>]`` or ``<slot>[:<func>],<emul>[,<cfg>]``."""
    where, sep, rest = text.partition(",")
    if not sep:
        raise ConfigError(
            f"-s {text}: missing the emulation; write <slot>[:<func>],<emulation>[,<options>], "
            "e.g. -s 3,virtio-blk,disk.img"
        )
    bus, dev, func = parse_slot_address(where, f"-s {text}")
    emul, _, options = rest.partition(",")
    boot = False
    if options.startswith("b,"):  # acrn-dm: "b," right after the emulation (VSBL boot disk)
        boot = True
        options = options[2:]
    if not emul:
        raise ConfigError(
            f"-s {text}: missing the emulation name after the slot, e.g. -s {where},virtio-blk,..."
        )
    return SlotConfig(bus, dev, func, emul, options, boot)


def parse_lpc(text: str) -> LpcConfig:
    parts = text.split(",")
    device = parts[0].lower()
    if device in ("com1", "com2", "com3", "com4"):
        _, _, backend = text.partition(",")
        return LpcConfig(device, backend)
    if device == "com5":
        if len(parts) != 4 or not parts[1]:
            raise ConfigError(f"-l {text}: write com5,<backend>,<port>,<irq>, e.g. "
                              "-l com5,stdio,0x2f8,3")
        for what, v in (("port", parts[2]), ("irq", parts[3])):
            try:
                int(v, 0)
            except ValueError:
                raise ConfigError(f"-l {text}: {what} {v!r} is not a number; write e.g. "
                                  "-l com5,stdio,0x2f8,3") from None
        return LpcConfig(device, parts[1], (parts[2], parts[3]))
    raise ConfigError(f"-l {text}: unknown LPC device {parts[0]!r}; use com1..com4 "
                      "(e.g. -l com1,stdio) or com5,<backend>,<port>,<irq>")


def parse_ovmf(text: str) -> OvmfConfig:
    writeback = False
    parts = text.split(",")
    if parts[0] == "w":
        writeback = True
        parts = parts[1:]
    if len(parts) == 1 and "=" not in parts[0] and parts[0]:
        return OvmfConfig(parts[0], None, writeback)
    kv: dict[str, str] = {}
    for p in parts:
        k, eq, v = p.partition("=")
        if not eq or k not in ("code", "vars") or not v or k in kv:
            raise ConfigError(
                f"--ovmf {text}: write [w,]<path> or [w,]code=<path>,vars=<path>"
            )
        kv[k] = v
    if "code" not in kv or "vars" not in kv:
        raise ConfigError(f"--ovmf {text}: give both code=<path> and vars=<path>, "
                          "or a single OVMF.fd path")
    return OvmfConfig(kv["code"], kv["vars"], writeback)


def host_lapic_ids() -> list[int]:
    """The host's enabled LAPIC ids in MADT order (empty where the MADT is unreadable)."""
    from .platform.setup import host_lapic_ids as read_madt  # lazy: platform sits above us

    return read_madt()


def parse_cpu_affinity(text: str) -> list[int]:
    """acrn-dm's ``--cpu_affinity``: the LAPIC ids of the VM's CPUs, e.g. ``0,2``."""
    fields = text.split(",")
    if not all(f.isascii() and f.isdigit() for f in fields):
        raise ConfigError(
            f"--cpu_affinity {text}: expected comma-separated CPU (LAPIC) ids, e.g. 1,2"
        )
    cpus = [int(x, 10) for x in fields]
    if any(c > 255 for c in cpus):
        raise ConfigError(f"--cpu_affinity {text}: LAPIC ids must be 0..255")
    if len(set(cpus)) != len(cpus):
        raise ConfigError(f"--cpu_affinity {text}: a CPU is listed twice; list each once")
    if len(cpus) > 16:
        raise ConfigError(f"--cpu_affinity {text}: at most 16 vCPUs; list at most 16 CPUs")
    return cpus


def parse_virtio_poll(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"--virtio_poll {text}: expected an interval in nanoseconds, "
                          "e.g. --virtio_poll 1000000")
    ns = int(text, 10)
    if not 1_000 <= ns <= 10_000_000:
        raise ConfigError(f"--virtio_poll {text}: the interval must be 1000..10000000 ns "
                          "(100000..1000000 suggested)")
    return ns


def parse_shutdown_timeout(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = -1.0
    if not 0 <= t <= 3600:
        raise ConfigError(f"--shutdown_timeout {text}: expected seconds 0..3600, e.g. 60")
    return t


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
                raise ConfigError(f"not supported by acrn-pydm: {name}")
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
                    raise ConfigError(f"not supported by acrn-pydm: {name}")
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
        if name in OBSOLETE_OPTIONS:
            cfg.warnings.append(OBSOLETE_OPTIONS[name])
            continue
        _apply(cfg, name, val or "")

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
        from .logsetup import parse_logger_setting

        parse_logger_setting(val)
        cfg.logger_setting = val
    elif opt == "--hv":
        if val not in HYPERVISORS:
            raise ConfigError(
                f"--hv {val}: unknown backend; choose one of {', '.join(HYPERVISORS)}"
            )
        cfg.hv = val
    elif opt == "--shutdown_timeout":
        cfg.shutdown_timeout = parse_shutdown_timeout(val)
    elif opt == "--debugexit":
        cfg.debugexit = True
    elif opt == "--virtio_msi":
        cfg.virtio_msi = True
    elif opt == "--windows":
        cfg.windows = True
    else:  # every name in _LONG is handled above or refused/ignored before
        raise ConfigError(f"option {opt} is not handled; see acrn-pydm --help")


def _check_file(opt: str, path: str, what: str) -> None:
    if not os.path.isfile(path):
        problem = "does not exist" if not os.path.exists(path) else "is not a regular file"
        raise ConfigError(f"{opt} {path}: the file {problem}; give the path of {what}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{opt} {path}: the file is not readable; fix its permissions")


def validate(cfg: VmConfig, *, check_files: bool = True) -> None:
    """Checks that span options (or that the TOML front end needs too)."""
    name_bytes = cfg.name.encode()
    if not name_bytes or len(name_bytes) > VM_NAME_MAX:
        raise ConfigError(f"VM name {cfg.name!r} must be 1 to {VM_NAME_MAX} bytes; "
                          "choose a shorter name")
    if any(c in cfg.name for c in "/\0") or cfg.name.startswith(("-", ".")) or \
            not cfg.name.isprintable() or " " in cfg.name:
        raise ConfigError(f"VM name {cfg.name!r} may not contain '/', spaces or control "
                          "characters, nor start with '-' or '.'; use e.g. vm1")
    seen: dict[tuple[int, int, int], str] = {}
    for s in cfg.slots:
        key = (s.bus, s.dev, s.func)
        if key in seen:
            raise ConfigError(f"-s {s.to_arg()}: slot {s.slot_text} is already used by "
                              f"{seen[key]}; give each device its own slot")
        seen[key] = s.emul
    if sum(1 for x in (cfg.kernel, cfg.elf) if x) > 1:
        raise ConfigError("-k and -E exclude each other: give a kernel or an ELF image")
    if cfg.ramdisk and not cfg.kernel:
        raise ConfigError(f"-r {cfg.ramdisk}: a ramdisk needs a kernel; add -k <bzImage>")
    if cfg.bootargs is not None and len(cfg.bootargs.encode()) > 2047:
        raise ConfigError("-B: the kernel command line is longer than 2047 bytes; shorten it")
    devices = [lp.device for lp in cfg.lpc]
    for d in set(devices):
        if devices.count(d) > 1:
            raise ConfigError(f"-l {d}: given twice; configure each COM port once")
    if check_files:
        for opt, path, what in (("-k", cfg.kernel, "a bzImage"),
                                ("-r", cfg.ramdisk, "an initrd"),
                                ("-E", cfg.elf, "an ELF image")):
            if path:
                _check_file(opt, path, what)
        if cfg.ovmf:
            _check_file("--ovmf", cfg.ovmf.code, "an OVMF image (OVMF.fd or OVMF_CODE.fd)")
            if cfg.ovmf.vars:
                _check_file("--ovmf", cfg.ovmf.vars, "an OVMF_VARS.fd image")


def check_emulations(cfg: VmConfig, known: list[str]) -> None:
    """Refuse acrn-dm emulations we lack by name; anything else is a typo."""
    for s in cfg.slots:
        if s.emul in known:
            continue
        if s.emul in ACRN_EMULS:
            raise ConfigError(f"not supported by acrn-pydm: -s {s.emul}")
        raise ConfigError(f"-s {s.to_arg()}: unknown emulation {s.emul!r}; "
                          f"known: {', '.join(sorted(known))}")
