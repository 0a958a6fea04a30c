"""The systemd unit's syscall sandbox, reproduced with libseccomp for tests without systemd.

``systemd/acrn-pydm@.service`` says (``SystemCallFilter=``, ``SystemCallErrorNumber=``,
``SystemCallArchitectures=native``, ``RestrictAddressFamilies=``) what the device model
may call. This module reads those lines from the unit itself, expands systemd's groups
(``@system-service`` ...) with the installed ``systemd-analyze syscall-filter`` (the same
tables systemd compiles into the filter), applies systemd's rules (the first allow-list
line sets the list, ``~`` lines remove from it, a later plain line adds back), and loads the
result with libseccomp through ctypes (``libseccomp.so.2``; no Python binding needed).

    python tests/support/seccomp_filter.py [--unit PATH] [--kill] -- CMD ARGS...

applies the filter to itself and then ``execv``s CMD, so the whole program (Python's own
start-up included) runs sandboxed, as under systemd. ``--kill`` turns "denied" into
SIGSYS instead of the unit's errno, to find out whether anything was denied at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "acrn-pydm@.service"

SCMP_ACT_KILL_PROCESS = 0x8000_0000
SCMP_ACT_ALLOW = 0x7FFF_0000
SCMP_CMP_EQ = 4
NR_SCMP_ERROR = -1


def SCMP_ACT_ERRNO(e: int) -> int:  # noqa: N802 - libseccomp's macro name
    return 0x0005_0000 | (e & 0xFFFF)


@dataclass
class UnitFilter:
    """What the unit's sandbox lines say, with groups expanded."""

    allow: set[str] = field(default_factory=set)
    errno_name: str = "EPERM"
    families: list[str] = field(default_factory=list)
    native_only: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def errno(self) -> int:
        return getattr(errno, self.errno_name)


def have_systemd_analyze() -> bool:
    return shutil.which("systemd-analyze") is not None


@functools.cache
def _group_table() -> dict[str, list[str]]:
    """Every group systemd knows, with its direct members (syscalls and @groups)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, check=True).stdout
    table: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in out.splitlines():
        line = raw.strip()
        if not raw.startswith(" ") and line.startswith("@"):
            current = table.setdefault(line, [])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return table


def expand(token: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """A syscall name or an @group, recursively expanded to syscall names."""
    if not token.startswith("@"):
        return {token}
    table = _group_table()
    if token not in table:
        raise ValueError(f"systemd-analyze knows no syscall group {token}")
    if token in seen:
        return set()
    names: set[str] = set()
    for member in table[token]:
        names |= expand(member, seen | {token})
    return names


def parse_unit(path: Path = UNIT) -> UnitFilter:
    """Apply systemd's SystemCallFilter= semantics to the unit's lines, in order."""
    uf = UnitFilter()
    allow_list: bool | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        key, _, value = line.partition("=")
        if key == "SystemCallFilter":
            uf.lines.append(line)
            deny = value.startswith("~")
            words = value.lstrip("~").split()
            names: set[str] = set()
            for w in words:
                names |= expand(w.split(":")[0])
            if allow_list is None:
                allow_list = not deny
                if allow_list:
                    uf.allow = names | expand("@default")  # systemd always adds @default
                else:
                    raise ValueError("a deny-list-only filter cannot be reproduced here")
            elif deny:
                uf.allow -= names
            else:
                uf.allow |= names
        elif key == "SystemCallErrorNumber":
            uf.errno_name = value.strip()
        elif key == "SystemCallArchitectures":
            uf.native_only = value.strip() == "native"
        elif key == "RestrictAddressFamilies":
            uf.families = value.split()
    if allow_list is None:
        raise ValueError(f"{path}: no SystemCallFilter= line")
    return uf


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def have_libseccomp() -> bool:
    try:
        _lib()
    except OSError:
        return False
    return True


def apply(uf: UnitFilter, *, kill: bool = False) -> list[str]:
    """Load the filter into this process (and its future children). Returns the allowed
    names libseccomp does not know on this architecture (they cannot be called anyway)."""
    lib = _lib()
    deny = SCMP_ACT_KILL_PROCESS if kill else SCMP_ACT_ERRNO(uf.errno)
    ctx = lib.seccomp_init(deny)  # native architecture only, as SystemCallArchitectures=native
    if not ctx:
        raise OSError(ctypes.get_errno(), "seccomp_init")
    unknown = []
    try:
        socket_calls = {"socket", "socketpair"}
        for name in sorted(uf.allow):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == NR_SCMP_ERROR:
                unknown.append(name)
                continue
            if name in socket_calls and uf.families:
                continue  # allowed per address family below
            rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add {name}")
        for name in socket_calls & uf.allow if uf.families else ():
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            for fam in uf.families:
                cmp = _ArgCmp(0, SCMP_CMP_EQ, getattr(socket, fam), 0)
                rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 1, ctypes.byref(cmp))
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add {name} {fam}")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load")
    finally:
        lib.seccomp_release(ctx)
    return unknown


def main(argv: list[str]) -> None:
    unit = UNIT
    kill = False
    while argv and argv[0] != "--":
        opt = argv.pop(0)
        if opt == "--unit":
            unit = Path(argv.pop(0))
        elif opt == "--kill":
            kill = True
        else:
            raise SystemExit(f"unknown option {opt}")
    if not argv or argv[0] != "--" or len(argv) < 2:
        raise SystemExit("usage: seccomp_filter.py [--unit PATH] [--kill] -- CMD ARGS...")
    cmd = argv[1:]
    uf = parse_unit(unit)
    apply(uf, kill=kill)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
