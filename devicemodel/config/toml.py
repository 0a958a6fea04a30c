"""TOML VM files: the same VmConfig as acrn-dm's command line, for people who start fresh.

Every key is the long acrn-dm option without its dashes (``memsize``, ``cpu_affinity``,
``elf_file``, ``[[pci_slot]]``, ``[[lpc]]``, ``[ovmf]``...), and each value goes through the
command line's own parser, so a TOML file and a launch line cannot disagree about what is
valid. The schema is written down in docs/vm-toml.md. Errors name the file, the key, the
value and the fix, in one line.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..slot import SlotConfig
from .acrn_args import LAPIC_PT_ALONE, OBSOLETE_EMULS
from .logger_setting import LOGGERS, parse_logger_setting
from .model import (
    DEFAULT_MONITOR_IDLE_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    LPC_DEVICES,
    LpcConfig,
    OvmfConfig,
    VmConfig,
    format_memsize,
)
from .rt_options import parse_acpidev_pt, parse_intr_monitor, parse_mmiodev_pt
from .validate import validate
from .values import (
    parse_cpu_affinity,
    parse_hv,
    parse_lpc,
    parse_mem,
    parse_monitor_idle_timeout,
    parse_shutdown_timeout,
    parse_slot_address,
    parse_virtio_poll,
)

_STR_KEYS = {"kernel": "kernel", "ramdisk": "ramdisk", "bootargs": "bootargs",
             "elf_file": "elf", "cmd_monitor": "cmd_monitor"}
_BOOL_KEYS = {"windows": "windows", "debugexit": "debugexit", "virtio_msi": "virtio_msi",
              "rtvm": "rtvm", "lapic_pt": "lapic_pt"}
#: acrn-dm's own option text, one string (or a list of them), parsed by the same parser
_ARG_KEYS = {"intr_monitor": ("--intr_monitor", parse_intr_monitor, False),
             "mmiodev_pt": ("--mmiodev_pt", parse_mmiodev_pt, True),
             "acpidev_pt": ("--acpidev_pt", parse_acpidev_pt, True)}
TOP_KEYS = ("name", "hv", "memsize", "cpu_affinity", *_STR_KEYS, *_BOOL_KEYS, *_ARG_KEYS,
            "virtio_poll",
            "logger_setting", "logger", "shutdown_timeout", "monitor_idle_timeout", "ovmf",
            "lpc", "pci_slot")
_SLOT_KEYS = ("slot", "emul", "options", "boot")
_LPC_KEYS = ("device", "backend", "port", "irq")
_OVMF_KEYS = ("code", "vars", "writeback")
_EXAMPLES = {
    "name": 'name = "vm1"', "hv": 'hv = "acrn"', "memsize": 'memsize = "2048M"',
    "cpu_affinity": "cpu_affinity = [1, 2]", "virtio_poll": "virtio_poll = 1000000",
    "logger_setting": 'logger_setting = "console,level=4"',
    "shutdown_timeout": "shutdown_timeout = 60",
    "monitor_idle_timeout": "monitor_idle_timeout = 30",
}


@dataclass
class _Ctx:
    """Where we are, so every message can say ``file: key = value: problem; fix``."""

    source: str

    def error(self, key: str, value: Any, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key} = {shown(value)}: {problem}")


def _strip_prefix(msg: str, opt: str, val: str) -> str:
    """Drop the ``-x value:`` head of a command-line message; the TOML key replaces it."""
    for head in (f"{opt} {val}: ", f"{opt}: ", f"{opt} {val!r}: "):
        if msg.startswith(head):
            return msg[len(head):]
    return msg


def _want(ctx: _Ctx, key: str, value: Any, typ: type | tuple[type, ...], what: str) -> None:
    # bool is an int in Python; TOML keeps them apart, so do we
    if not isinstance(value, typ) or (isinstance(value, bool) and bool not in (
            typ if isinstance(typ, tuple) else (typ,))):
        example = _EXAMPLES.get(key.split(".")[-1].split("[")[0], "")
        fix = f"e.g. {example}" if example else f"write {what}"
        raise ctx.error(key, value, f"expected {what}; {fix}")


def _unknown_keys(ctx: _Ctx, where: str, table: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{ctx.source}: {where}{_key(str(key))} = {shown(table[key])}: "
                              f"unknown key; valid keys here are {', '.join(allowed)}")


def from_dict(data: dict[str, Any], *, source: str = "<toml>", default_name: str = "",
              check_files: bool = True) -> VmConfig:
    """A parsed TOML document → a validated VmConfig."""
    ctx = _Ctx(source)
    for key, value in data.items():
        if _too_deep(value, MAX_DEPTH):
            raise ConfigError(f"{source}: {_key(str(key))}: tables or arrays nested more than "
                              f"{MAX_DEPTH} levels deep; a VM file nests at most a few levels: "
                              "remove the extra nesting")
        if _has_nul(value):  # a command line cannot carry one, and paths cannot hold one
            raise ConfigError(f"{source}: {_key(str(key))}: a string holds a NUL character "
                              "(\\u0000), which no acrn-dm option can; remove it")
    _unknown_keys(ctx, "", data, TOP_KEYS)
    cfg = VmConfig()
    name = data.get("name", default_name)
    _want(ctx, "name", name, str, "a string")
    cfg.name = name
    if "hv" in data:
        hv = data["hv"]
        _want(ctx, "hv", hv, str, "a string")
        try:
            cfg.hv = parse_hv(hv)
        except ConfigError as e:
            raise ctx.error("hv", hv, _strip_prefix(str(e), "--hv", hv)) from None
    if "memsize" in data:
        mem = data["memsize"]
        _want(ctx, "memsize", mem, str, 'a size with a K, M or G suffix')
        try:
            cfg.memsize = parse_mem(mem)
        except ConfigError as e:
            raise ctx.error("memsize", mem, _strip_prefix(str(e), "-m", mem)) from None
    if "cpu_affinity" in data:
        cpus = data["cpu_affinity"]
        if not isinstance(cpus, list) or not cpus or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus):
            raise ctx.error("cpu_affinity", cpus, "expected a list of CPU (LAPIC) ids; "
                            "e.g. cpu_affinity = [1, 2]")
        text = ",".join(map(str, cpus))
        try:
            cfg.cpu_affinity = parse_cpu_affinity(text)
        except ConfigError as e:
            raise ctx.error("cpu_affinity", cpus,
                            _strip_prefix(str(e), "--cpu_affinity", text)) from None
    for key, attr in _STR_KEYS.items():
        if key in data:
            _want(ctx, key, data[key], str, "a string")
            if not data[key] and key != "bootargs":
                raise ctx.error(key, data[key], "empty; give a path or remove the key")
            setattr(cfg, attr, data[key])
    for key, attr in _BOOL_KEYS.items():
        if key in data:
            _want(ctx, key, data[key], bool, "true or false")
            setattr(cfg, attr, data[key])
    _acrn_arg_keys(ctx, data, cfg)
    if "virtio_poll" in data:
        ns = data["virtio_poll"]
        _want(ctx, "virtio_poll", ns, int, "an interval in nanoseconds")
        try:
            cfg.virtio_poll = parse_virtio_poll(str(ns))
        except ConfigError as e:
            raise ctx.error("virtio_poll", ns,
                            _strip_prefix(str(e), "--virtio_poll", str(ns))) from None
    if "shutdown_timeout" in data:
        t = data["shutdown_timeout"]
        _want(ctx, "shutdown_timeout", t, (int, float), "seconds")
        try:
            if not math.isfinite(t):
                raise ConfigError("")
            cfg.shutdown_timeout = parse_shutdown_timeout(str(t))
        except ConfigError:
            raise ctx.error("shutdown_timeout", t,
                            "expected seconds 0..3600; e.g. shutdown_timeout = 60") from None
    if "monitor_idle_timeout" in data:
        t = data["monitor_idle_timeout"]
        _want(ctx, "monitor_idle_timeout", t, (int, float), "seconds")
        try:
            if not math.isfinite(t):
                raise ConfigError("")
            cfg.monitor_idle_timeout = parse_monitor_idle_timeout(str(t))
        except ConfigError:
            raise ctx.error("monitor_idle_timeout", t, "expected seconds 0..86400 (0: no "
                            "limit); e.g. monitor_idle_timeout = 30") from None
    _logger(ctx, data, cfg)
    if "ovmf" in data:
        cfg.ovmf = _ovmf(ctx, data["ovmf"])
    if "lpc" in data:
        cfg.lpc = _lpcs(ctx, data["lpc"])
    if "pci_slot" in data:
        cfg.slots = _slots(ctx, data["pci_slot"])
    try:
        validate(cfg, check_files=check_files)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _acrn_arg_keys(ctx: _Ctx, data: dict[str, Any], cfg: VmConfig) -> None:
    for key, (opt, parse, many) in _ARG_KEYS.items():
        if key not in data:
            continue
        value = data[key]
        texts = value if many and isinstance(value, list) else [value]
        if not all(isinstance(t, str) for t in texts) or (not many and len(texts) != 1):
            raise ctx.error(key, value, f"expected {'a list of strings' if many else 'a string'}"
                            f" as {opt} takes them")
        parsed = []
        for text in texts:
            try:
                parsed.append(parse(text))
            except ConfigError as e:
                raise ctx.error(key, text, _strip_prefix(str(e), opt, text)) from None
        setattr(cfg, key, parsed if many else parsed[0])
    if cfg.lapic_pt and not cfg.rtvm:
        cfg.warnings.append(LAPIC_PT_ALONE)


def _logger(ctx: _Ctx, data: dict[str, Any], cfg: VmConfig) -> None:
    if "logger_setting" in data and "logger" in data:
        raise ctx.error("logger", data["logger"],
                        "logger and logger_setting both given; keep one of them")
    if "logger_setting" in data:
        text = data["logger_setting"]
        _want(ctx, "logger_setting", text, str, "a string")
        try:
            parse_logger_setting(text)
        except ConfigError as e:
            raise ctx.error("logger_setting", text,
                            _strip_prefix(str(e), "--logger_setting", text)) from None
        cfg.logger_setting = text
    elif "logger" in data:
        table = data["logger"]
        if not isinstance(table, dict):
            raise ctx.error("logger", table, "expected a table; e.g. logger = { console = 4 }")
        _unknown_keys(ctx, "logger.", table, LOGGERS)
        parts = []
        for name, level in table.items():
            if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 5:
                raise ctx.error(f"logger.{name}", level,
                                "expected a level 0..5 (1 error .. 5 debug); e.g. console = 4")
            parts.append(f"{name},level={level}")
        if parts:
            cfg.logger_setting = ";".join(parts)


def _ovmf(ctx: _Ctx, table: Any) -> OvmfConfig:
    if isinstance(table, str):
        table = {"code": table}
    if not isinstance(table, dict):
        raise ctx.error("ovmf", table, 'expected a table; e.g. ovmf = { code = "OVMF.fd" }')
    _unknown_keys(ctx, "ovmf.", table, _OVMF_KEYS)
    if "code" not in table:
        raise ctx.error("ovmf", table, 'code is missing; e.g. ovmf = { code = "OVMF.fd" }')
    for key in ("code", "vars"):
        if key in table:
            _want(ctx, f"ovmf.{key}", table[key], str, "a path string")
            if not table[key]:
                raise ctx.error(f"ovmf.{key}", table[key], "empty; give a path")
    wb = table.get("writeback", False)
    _want(ctx, "ovmf.writeback", wb, bool, "true or false")
    return OvmfConfig(table["code"], table.get("vars"), wb)


def _tables(ctx: _Ctx, key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ctx.error(key, value, f"expected an array of tables; write each as [[{key}]]")
    return value


def _lpcs(ctx: _Ctx, value: Any) -> list[LpcConfig]:
    out = []
    for i, t in enumerate(_tables(ctx, "lpc", value)):
        where = f"lpc[{i}]"
        _unknown_keys(ctx, f"{where}.", t, _LPC_KEYS)
        device = t.get("device")
        if not isinstance(device, str) or device.lower() not in LPC_DEVICES:
            raise ctx.error(f"{where}.device", device,
                            'expected com1..com5; e.g. device = "com1"')
        backend = t.get("backend", "")
        _want(ctx, f"{where}.backend", backend, str, 'a string, e.g. backend = "stdio"')
        parts = [device, backend]
        if device.lower() == "com5":
            for k in ("port", "irq"):
                v = t.get(k)
                if not isinstance(v, int | str) or isinstance(v, bool):
                    raise ctx.error(f"{where}.{k}", v,
                                    "com5 needs port and irq; e.g. port = 0x2f8, irq = 3")
                parts.append(str(v))
        else:
            for k in ("port", "irq"):
                if k in t:
                    raise ctx.error(f"{where}.{k}", t[k],
                                    f"only com5 takes {k}; remove it for {device}")
        text = ",".join(parts) if backend or len(parts) > 2 else device
        try:
            out.append(parse_lpc(text))
        except ConfigError as e:
            raise ctx.error(where, t, _strip_prefix(str(e), "-l", text)) from None
    return out


def _slots(ctx: _Ctx, value: Any) -> list[SlotConfig]:
    out = []
    for i, t in enumerate(_tables(ctx, "pci_slot", value)):
        where = f"pci_slot[{i}]"
        _unknown_keys(ctx, f"{where}.", t, _SLOT_KEYS)
        if "slot" not in t:
            raise ctx.error(where, t, 'slot is missing; e.g. slot = "3" or slot = "0:3:0"')
        slot = t["slot"]
        if isinstance(slot, int) and not isinstance(slot, bool):
            slot = str(slot)
        if not isinstance(slot, str):
            raise ctx.error(f"{where}.slot", t["slot"],
                            'expected "<slot>[:<func>]" or "<bus>:<slot>:<func>"; e.g. slot = "3"')
        try:
            bus, dev, func = parse_slot_address(slot, "slot")
        except ConfigError as e:
            raise ctx.error(f"{where}.slot", t["slot"],
                            _strip_prefix(str(e), "slot", slot)) from None
        emul = t.get("emul")
        if not isinstance(emul, str) or not emul or "," in emul:
            raise ctx.error(f"{where}.emul", emul,
                            'expected an emulation name; e.g. emul = "virtio-blk"')
        if emul in OBSOLETE_EMULS:
            raise ctx.error(f"{where}.emul", emul, "obsolete in acrn-dm; remove this slot")
        options = t.get("options", "")
        if isinstance(options, list) and all(isinstance(o, str) for o in options):
            options = ",".join(options)
        if not isinstance(options, str):
            raise ctx.error(f"{where}.options", options,
                            'expected the acrn-dm option string; e.g. options = "disk.img,ro"')
        boot = t.get("boot", False)
        _want(ctx, f"{where}.boot", boot, bool, "true or false")
        out.append(SlotConfig(bus, dev, func, emul, options, boot))
    return out


#: a VM file is a few KiB; anything near this is not one (and is never read whole)
MAX_FILE_SIZE = 1 << 20
#: tomllib's cost grows with the square of a dotted key's depth (40,000 levels: 20 s); a VM
#: file's keys have at most a few parts, so a line with more dots than this is refused first
MAX_DOTS_PER_LINE = 128
#: tables and arrays in a VM file nest two levels ([[pci_slot]], options lists)
MAX_DEPTH = 16


def read_vm_file(path: str) -> str:
    """The text of a VM file, refusing what is not one before reading it.

    Opened non-blocking, so a FIFO without a writer cannot hang us; then it must be a
    regular file of at most MAX_FILE_SIZE bytes (so /dev/zero is refused, not read).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such VM file; give the path of a .toml VM file") from None
    except OSError as e:
        try:  # a socket cannot be opened at all (ENXIO): say what it is instead
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode) from None
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError:  # a NUL byte in the path
        raise ConfigError(f"{path}: not a usable path; give the path of a .toml VM file") \
            from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if st.st_size > MAX_FILE_SIZE:
            raise ConfigError(f"{path}: {st.st_size} bytes is not a VM file (at most "
                              f"{MAX_FILE_SIZE >> 20} MiB); give the path of a .toml VM file")
        chunks = []
        left = MAX_FILE_SIZE + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # it grew while we read
            raise ConfigError(f"{path}: larger than {MAX_FILE_SIZE >> 20} MiB, not a VM file; "
                              "give the path of a .toml VM file")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: byte {e.start} is not UTF-8; save the file "
                          "as UTF-8") from None


def _not_regular(path: str, mode: int) -> ConfigError:
    return ConfigError(f"{path}: {_file_kind(mode)}, not a regular file; give the path of a "
                       ".toml VM file")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def parse_text(text: str, source: str) -> dict[str, Any]:
    """TOML text → its table, with one-line errors for what tomllib cannot take in stride."""
    if len(text) > MAX_FILE_SIZE:
        raise ConfigError(f"{source}: {len(text)} characters is not a VM file (at most "
                          f"{MAX_FILE_SIZE >> 20} MiB)")
    for number, line in enumerate(text.splitlines(), 1):
        if line.count(".") > MAX_DOTS_PER_LINE:
            raise ConfigError(f"{source}: line {number} has {line.count('.')} dots; a VM file's "
                              f"keys have a few parts (at most {MAX_DOTS_PER_LINE} dots on a "
                              "line); shorten it")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}; fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{source}: arrays or tables nested hundreds of levels deep; a VM "
                          f"file nests at most a few levels: remove the extra nesting") from None


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/tables deeper than ``limit`` (without recursion)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = list(v.values())
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\0" in v:
                return True
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def load(path: str, *, check_files: bool = True) -> VmConfig:
    """Read and validate a VM file; the VM name defaults to the file's stem."""
    data = parse_text(read_vm_file(path), path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return from_dict(data, source=path, default_name=stem, check_files=check_files)


def loads(text: str, *, source: str = "<toml>", check_files: bool = True) -> VmConfig:
    return from_dict(parse_text(text, source), source=source, check_files=check_files)


# --- writing ----------------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    """A TOML spelling of a value (for output and for error messages)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    return toml_string(str(v))


def shown(v: Any, limit: int = 100) -> str:
    """A value as an error message quotes it: its TOML spelling, cut at ``limit``."""
    text = toml_value(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(k: str) -> str:
    if k and all(c.isalnum() or c in "-_" for c in k) and k.isascii():
        return k
    return toml_string(k)


def dumps(cfg: VmConfig) -> str:
    """The TOML VM file for ``cfg``; ``loads(dumps(cfg)) == cfg``."""
    lines = ["# acrn-pydm VM file (schema: docs/vm-toml.md)", f"name = {toml_string(cfg.name)}"]
    if cfg.hv:
        lines.append(f"hv = {toml_string(cfg.hv)}")
    lines.append(f"memsize = {toml_string(format_memsize(cfg.memsize))}")
    if cfg.cpu_affinity:
        lines.append(f"cpu_affinity = {toml_value(cfg.cpu_affinity)}")
    for key, attr in _BOOL_KEYS.items():
        if getattr(cfg, attr):
            lines.append(f"{key} = true")
    for key, attr in _STR_KEYS.items():
        val = getattr(cfg, attr)
        if val is not None:
            lines.append(f"{key} = {toml_string(val)}")
    if cfg.virtio_poll is not None:
        lines.append(f"virtio_poll = {cfg.virtio_poll}")
    if cfg.intr_monitor is not None:
        lines.append(f"intr_monitor = {toml_string(cfg.intr_monitor.to_arg())}")
    for key in ("mmiodev_pt", "acpidev_pt"):
        if getattr(cfg, key):
            lines.append(f"{key} = {toml_value([d.to_arg() for d in getattr(cfg, key)])}")
    if cfg.logger_setting is not None:
        lines.append(f"logger_setting = {toml_string(cfg.logger_setting)}")
    if cfg.shutdown_timeout != DEFAULT_SHUTDOWN_TIMEOUT:
        lines.append(f"shutdown_timeout = {toml_value(float(cfg.shutdown_timeout))}")
    if cfg.monitor_idle_timeout != DEFAULT_MONITOR_IDLE_TIMEOUT:
        lines.append(f"monitor_idle_timeout = {toml_value(float(cfg.monitor_idle_timeout))}")
    if cfg.ovmf:
        lines += ["", "[ovmf]", f"code = {toml_string(cfg.ovmf.code)}"]
        if cfg.ovmf.vars is not None:
            lines.append(f"vars = {toml_string(cfg.ovmf.vars)}")
        if cfg.ovmf.writeback:
            lines.append("writeback = true")
    for lpc in cfg.lpc:
        lines += ["", "[[lpc]]", f"device = {toml_string(lpc.device)}"]
        if lpc.backend:
            lines.append(f"backend = {toml_string(lpc.backend)}")
        if lpc.extra:
            lines += [f"port = {toml_string(lpc.extra[0])}", f"irq = {toml_string(lpc.extra[1])}"]
    for s in cfg.slots:
        lines += ["", "[[pci_slot]]", f"slot = {toml_string(s.short_text)}",
                  f"emul = {toml_string(s.emul)}"]
        if s.options:
            lines.append(f"options = {toml_string(s.options)}")
        if s.boot:
            lines.append("boot = true")
    return "\n".join(lines) + "\n"
