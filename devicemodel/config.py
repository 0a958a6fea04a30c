"""The VM description, and acrn-dm's command line parsed into it.

A launch script written for acrn-dm must work unchanged, so the syntax is acrn-dm's
(acrn-facts §4.1-4.2). Options acrn-dm has that we do not implement are refused by name,
never silently ignored. Every error is one line that names the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .memory import MiB, check_memsize, parse_memsize

DEFAULT_MEMSIZE = 256 * MiB
HYPERVISORS = ("acrn", "kvm", "sim")


class ConfigError(ValueError):
    """A user error in the VM description: the message is the whole story."""


@dataclass(frozen=True)
class SlotConfig:
    """One ``-s`` option: a PCI function and its emulation."""

    bus: int
    dev: int
    func: int
    emul: str
    options: str = ""
    boot: bool = False

    @property
    def slot_text(self) -> str:
        return f"{self.bus}:{self.dev}:{self.func}"


@dataclass(frozen=True)
class LpcConfig:
    """One ``-l`` option: an LPC device such as ``com1,stdio``."""

    device: str
    backend: str = ""
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class OvmfConfig:
    code: str
    vars: str | None = None
    writeback: bool = False


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

    @property
    def vcpus(self) -> int:
        return len(self.cpu_affinity) or 1

    @property
    def cpu_affinity_mask(self) -> int:
        mask = 0
        for cpu in self.cpu_affinity:
            mask |= 1 << cpu
        return mask

    def slot(self, bus: int, dev: int, func: int) -> SlotConfig | None:
        for s in self.slots:
            if (s.bus, s.dev, s.func) == (bus, dev, func):
                return s
        return None


# acrn-dm options we refuse by name; the value says whether the option takes an argument.
UNSUPPORTED_OPTIONS: dict[str, bool] = {
    "--enable_trusty": False,
    "--intr_monitor": True,
    "--acpidev_pt": True,
    "--mmiodev_pt": True,
    "--vtpm2": True,
    "--lapic_pt": False,
    "--rtvm": False,
    "--ssram": False,
    "--iasl": True,
    "--vsbl": True,
    "--part_info": True,
    "--pm_notify_channel": True,
    "--pm_by_vuart": True,
    "-Y": False,
    "-G": True,
    "-i": True,
    "-U": True,
}
OBSOLETE_EMULS = {"pci-gvt", "virtio-hdcp", "npk", "virtio-coreu"}

_LONG_WITH_ARG = {
    "--memsize": "-m",
    "--pci_slot": "-s",
    "--lpc": "-l",
    "--kernel": "-k",
    "--bootargs": "-B",
    "--ramdisk": "-r",
    "--elf_file": "-E",
}
_SHORT_WITH_ARG = {"-m", "-s", "-l", "-k", "-B", "-r", "-E"}
_LONG_WITH_ARG_OWN = {
    "--ovmf", "--cpu_affinity", "--virtio_poll", "--cmd_monitor", "--logger_setting", "--hv",
    "--mac_seed",
}
_FLAGS = {"--debugexit", "--virtio_msi", "--windows", "-A", "--acpi"}


def parse_slot(text: str) -> SlotConfig:
    """``<bus>:<slot>:<func>,<emul>[,<cfg>]`` or ``<slot>[:<func>],<emul>[,<cfg>]`` (decimal)."""
    where, sep, rest = text.partition(",")
    if not sep or not rest:
        raise ConfigError(f"-s {text}: expected <slot>[:<func>],<emulation>[,<options>]")
    parts = where.split(":")
    try:
        nums = [int(p, 10) for p in parts]
    except ValueError:
        raise ConfigError(
            f"-s {text}: slot {where!r} must be decimal numbers, e.g. 3 or 0:3:0"
        ) from None
    if len(nums) == 1:
        bus, dev, func = 0, nums[0], 0
    elif len(nums) == 2:
        bus, dev, func = 0, nums[0], nums[1]
    elif len(nums) == 3:
        bus, dev, func = nums
    else:
        raise ConfigError(f"-s {text}: slot {where!r} has too many parts")
    if not 0 <= bus <= 255 or not 0 <= dev <= 31 or not 0 <= func <= 7:
        raise ConfigError(f"-s {text}: bus 0..255, slot 0..31, function 0..7")
    emul, _, options = rest.partition(",")
    boot = False
    if options == "b" or options.startswith("b,"):
        boot = True
        options = options[2:]
    if not emul:
        raise ConfigError(f"-s {text}: missing the emulation name after the slot")
    return SlotConfig(bus, dev, func, emul, options, boot)


def parse_lpc(text: str) -> LpcConfig:
    parts = text.split(",")
    device = parts[0].lower()
    if device in ("com1", "com2", "com3", "com4"):
        return LpcConfig(device, parts[1] if len(parts) > 1 else "", tuple(parts[2:]))
    if device == "com5":
        if len(parts) != 4:
            raise ConfigError(f"-l {text}: expected com5,<backend>,<port>,<irq>")
        return LpcConfig(device, parts[1], tuple(parts[2:]))
    raise ConfigError(f"-l {text}: unknown LPC device {parts[0]!r}; use com1..com5")


def parse_ovmf(text: str) -> OvmfConfig:
    writeback = False
    parts = text.split(",")
    if parts[0] == "w":
        writeback = True
        parts = parts[1:]
    if len(parts) == 1 and "=" not in parts[0]:
        return OvmfConfig(parts[0], None, writeback)
    kv = {}
    for p in parts:
        k, eq, v = p.partition("=")
        if not eq or k not in ("code", "vars"):
            raise ConfigError(f"--ovmf {text}: expected [w,]<path> or [w,]code=<path>,vars=<path>")
        kv[k] = v
    if "code" not in kv:
        raise ConfigError(f"--ovmf {text}: code=<path> is required")
    return OvmfConfig(kv["code"], kv.get("vars"), writeback)


def parse_cpu_affinity(text: str) -> list[int]:
    try:
        cpus = [int(x, 10) for x in text.split(",") if x != ""]
    except ValueError:
        raise ConfigError(
            f"--cpu_affinity {text}: expected comma-separated CPU ids, e.g. 0,1"
        ) from None
    if not cpus or any(c < 0 or c > 63 for c in cpus) or len(set(cpus)) != len(cpus):
        raise ConfigError(f"--cpu_affinity {text}: expected distinct CPU ids 0..63")
    if len(cpus) > 16:
        raise ConfigError(f"--cpu_affinity {text}: at most 16 vCPUs")
    return cpus


def parse_args(argv: list[str]) -> VmConfig:
    """Parse an acrn-dm style argument list (no program name) into a VmConfig."""
    cfg = VmConfig()
    positional: list[str] = []
    i = 0

    def value(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise ConfigError(f"{opt} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        opt, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if opt in UNSUPPORTED_OPTIONS:
            raise ConfigError(f"not supported by acrn-pydm: {opt}")
        if opt in _LONG_WITH_ARG:
            opt = _LONG_WITH_ARG[opt]
        if opt in _SHORT_WITH_ARG or opt in _LONG_WITH_ARG_OWN:
            val = inline if eq else value(opt)
            _apply(cfg, opt, val)
        elif arg.startswith("-") and len(arg) > 2 and arg[1] != "-" and arg[:2] in _SHORT_WITH_ARG:
            _apply(cfg, arg[:2], arg[2:])  # -m256M style
        elif opt in _FLAGS:
            if opt == "--debugexit":
                cfg.debugexit = True
            elif opt == "--virtio_msi":
                cfg.virtio_msi = True
            elif opt == "--windows":
                cfg.windows = True
            # -A/--acpi: obsolete in acrn-dm, ACPI is always on
        elif arg.startswith("-") and arg != "-":
            raise ConfigError(f"unknown option {arg}; see acrn-pydm --help")
        else:
            positional.append(arg)
        i += 1

    if len(positional) != 1:
        raise ConfigError(
            "expected exactly one VM name as the last argument"
            if not positional
            else f"expected one VM name, got {' '.join(positional)}"
        )
    cfg.name = positional[0]
    validate(cfg)
    return cfg


def _apply(cfg: VmConfig, opt: str, val: str) -> None:
    if opt == "-m":
        try:
            size = parse_memsize(val)
            check_memsize(size)
        except ValueError as e:
            raise ConfigError(f"-m {val}: {e}") from None
        cfg.memsize = size
    elif opt == "-s":
        slot = parse_slot(val)
        if slot.emul in OBSOLETE_EMULS:
            return
        cfg.slots.append(slot)
    elif opt == "-l":
        cfg.lpc.append(parse_lpc(val))
    elif opt == "-k":
        cfg.kernel = val
    elif opt == "-B":
        cfg.bootargs = val
    elif opt == "-r":
        cfg.ramdisk = val
    elif opt == "-E":
        cfg.elf = val
    elif opt == "--ovmf":
        cfg.ovmf = parse_ovmf(val)
    elif opt == "--cpu_affinity":
        cfg.cpu_affinity = parse_cpu_affinity(val)
    elif opt == "--virtio_poll":
        try:
            ns = int(val, 10)
        except ValueError:
            raise ConfigError(f"--virtio_poll {val}: expected nanoseconds") from None
        if not 1_000 <= ns <= 10_000_000:
            raise ConfigError(f"--virtio_poll {val}: the interval must be 1000..10000000 ns")
        cfg.virtio_poll = ns
    elif opt == "--cmd_monitor":
        cfg.cmd_monitor = val
    elif opt == "--logger_setting":
        cfg.logger_setting = val
    elif opt == "--hv":
        if val not in HYPERVISORS:
            raise ConfigError(f"--hv {val}: choose one of {', '.join(HYPERVISORS)}")
        cfg.hv = val
    elif opt == "--mac_seed":
        pass  # obsolete in acrn-dm: the seed now goes in virtio-net's mac_seed= option


def validate(cfg: VmConfig) -> None:
    name_bytes = cfg.name.encode()
    if not name_bytes or len(name_bytes) >= 16:
        raise ConfigError(f"VM name {cfg.name!r} must be 1 to 15 characters")
    if any(c in cfg.name for c in "/\0") or cfg.name.startswith("-"):
        raise ConfigError(f"VM name {cfg.name!r} may not contain '/' or start with '-'")
    seen: dict[tuple[int, int, int], str] = {}
    for s in cfg.slots:
        key = (s.bus, s.dev, s.func)
        if key in seen:
            raise ConfigError(f"-s {s.slot_text}: slot already used by {seen[key]}")
        seen[key] = s.emul
    if cfg.kernel and cfg.elf:
        raise ConfigError("-k and -E exclude each other: give a kernel or an ELF image")
