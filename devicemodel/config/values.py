"""The values of acrn-dm's options, parsed the way acrn-dm reads them.

Both front ends use these: the command line hands them the option's text, the TOML file
the key's value spelled as on the command line, so a launch line and a VM file cannot
disagree about what is valid. Every error is one line naming the option, the problem and
the fix; the TOML front end swaps the ``-x value:`` head for its ``file: key = value:``.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..memory import check_memsize, parse_memsize
from ..slot import SlotConfig
from .model import HYPERVISORS, LpcConfig, OvmfConfig


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
        raise ConfigError(f"{opt} {text}: {e}") from None
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


def parse_monitor_idle_timeout(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = -1.0
    if not 0 <= t <= 86400:
        raise ConfigError(f"--monitor_idle_timeout {text}: expected seconds 0..86400 "
                          "(0: no limit), e.g. 30")
    return t


def parse_hv(text: str, opt: str = "--hv") -> str:
    """``--hv``: one of our backends."""
    if text not in HYPERVISORS:
        raise ConfigError(f"{opt} {text}: unknown backend; choose one of {', '.join(HYPERVISORS)}")
    return text


__all__ = [
    "parse_cpu_affinity", "parse_hv", "parse_lpc", "parse_mem", "parse_monitor_idle_timeout",
    "parse_ovmf",
    "parse_shutdown_timeout", "parse_slot", "parse_slot_address", "parse_virtio_poll",
]
