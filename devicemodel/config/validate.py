"""Checks of a whole VM description that no single option can make: the VM name, slots
used twice, options that exclude or need each other, and that the boot images exist.

Both front ends end with ``validate``, so a launch line and a VM file are held to the same
rules. It needs no device and opens nothing; the device-level checks (emulation names,
device options) that ``run``, ``config --from-args`` and ``config --check`` share are in
devicemodel/vmcheck.py, above the devices.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .model import VM_NAME_MAX, VmConfig
from .rt_options import MAX_MMIO_DEVS

#: the longest kernel command line a bzImage takes (boot protocol 2.06+ cmdline_size)
BOOTARGS_MAX = 2047


def byte_length(text: str) -> int:
    """Length in bytes as the kernel gets it: argv's undecodable bytes come back as they
    were (surrogateescape); any other lone surrogate counts as its 3-byte encoding."""
    try:
        return len(text.encode(errors="surrogateescape"))
    except UnicodeEncodeError:
        return len(text.encode(errors="surrogatepass"))


def _check_file(opt: str, path: str, what: str) -> None:
    if not os.path.isfile(path):
        problem = "does not exist" if not os.path.exists(path) else "is not a regular file"
        raise ConfigError(f"{opt} {path}: the file {problem}; give the path of {what}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{opt} {path}: the file is not readable; fix its permissions")


def validate(cfg: VmConfig, *, check_files: bool = True) -> None:
    """Checks that span options (or that the TOML front end needs too)."""
    if not cfg.name or byte_length(cfg.name) > VM_NAME_MAX:
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
    if cfg.bootargs is not None and byte_length(cfg.bootargs) > BOOTARGS_MAX:
        raise ConfigError(f"-B: the kernel command line is longer than {BOOTARGS_MAX} bytes; "
                          "shorten it")
    if len(cfg.mmiodev_pt) + len(cfg.acpidev_pt) > MAX_MMIO_DEVS:
        raise ConfigError(f"--mmiodev_pt/--acpidev_pt: at most {MAX_MMIO_DEVS} platform "
                          "devices per VM (acrn-dm's limit); pass fewer through")
    bases = [d.base for d in cfg.mmiodev_pt]
    if len(set(bases)) != len(bases):
        raise ConfigError("--mmiodev_pt: the same range is given twice; give it once")
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


__all__ = ["BOOTARGS_MAX", "byte_length", "validate"]
