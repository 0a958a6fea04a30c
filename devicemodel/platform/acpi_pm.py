"""The guest's processor power objects, from what the hypervisor reports (PM_GET_CPU_STATE),
as acrn-dm's acpi_pm.c writes them into the DSDT:

- a processor device ``\\_SB.PRnn`` (``ACPI0007``) per vCPU;
- ``_PSS`` (P-states) when the hypervisor reports some, then ``_PPC`` (0: all of them
  usable) and ``_PCT`` (FFixedHW: the OS uses the performance MSRs); the other vCPUs
  return vCPU 0's ``_PPC``/``_PCT``;
- ``_CPC`` (continuous performance control over the HWP MSRs) when the hypervisor reports
  zero P-states, which is how it says the CPU manages its own frequency;
- ``_CST`` (C-states, counted from C1) when it reports some.

A backend that cannot answer (no PM data at all) gets the processor devices alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..hsm import abi
from . import aml

#: Generic Register descriptor address spaces
SPACE_SYSTEM_MEMORY = 0x00
SPACE_FFIXED_HW = 0x7F

#: (cmd, size) -> the answer's bytes; raises when the hypervisor cannot answer
StateQuery = Callable[[int, int], bytes]


@dataclass(frozen=True)
class CpuPowerStates:
    """What the hypervisor reported for one vCPU. ``px`` is None when it could not say."""

    px: list[dict[str, int]] | None
    cx: list[dict[str, int]]


def query_states(query: StateQuery, vmid: int, vcpu: int) -> CpuPowerStates:
    """acrn-dm's get_vcpu_px_cnt/data and get_vcpu_cx_cnt/data for one vCPU."""

    def count(kind: int) -> int | None:
        try:
            return int.from_bytes(query(abi.pm_cmd(vmid, vcpu, kind), 8)[:8], "little") & 0xFF
        except Exception:  # noqa: BLE001 - any failure means "no data", as in acrn-dm
            return None

    def data(kind: int, state: int, con) -> dict[str, int] | None:
        try:
            raw = query(abi.pm_cmd(vmid, vcpu, kind, state), con.sizeof())
            return dict(con.parse(raw))
        except Exception:  # noqa: BLE001
            return None

    px: list[dict[str, int]] | None = None
    n = count(abi.PMCMD_GET_PX_CNT)
    if n is not None:
        entries = [data(abi.PMCMD_GET_PX_DATA, i, abi.acrn_pstate_data) for i in range(n)]
        px = [e for e in entries if e is not None] if None not in entries else None
    cx: list[dict[str, int]] = []
    n = count(abi.PMCMD_GET_CX_CNT) or 0
    entries = [data(abi.PMCMD_GET_CX_DATA, i, abi.acrn_cstate_data) for i in range(1, n + 1)]
    if None not in entries:  # acrn-dm writes no _CST when one entry fails
        cx = [e for e in entries if e is not None]
    return CpuPowerStates(px, cx)


def register(space: int, width: int, offset: int, address: int, access: int = 0) -> bytes:
    """A Generic Register descriptor (ACPI 6.5 §6.4.3.7), for ``Register(...)``."""
    return bytes([0x82, 0x0C, 0x00, space, width, offset, access]) + address.to_bytes(8, "little")


def _reg_template(space: int, width: int, offset: int, address: int, access: int = 0) -> bytes:
    return aml.resource_template(register(space, width, offset, address, access))


def _pss(px: list[dict[str, int]]) -> bytes:
    rows = [aml.package([aml.integer(p[k] & 0xFFFF_FFFF) for k in (
        "core_frequency", "power", "transition_latency", "bus_master_latency", "control",
        "status")]) for p in px]
    return aml.method("_PSS", 0, aml.ret(aml.package(rows)))


def _cst(cx: list[dict[str, int]]) -> bytes:
    rows = [aml.integer(len(cx))]
    for c in cx:
        reg = c["cx_reg"]
        rows.append(aml.package([
            _reg_template(reg["space_id"], reg["bit_width"], reg["bit_offset"], reg["address"],
                          reg["access_size"]),
            aml.integer(c["type"] & 0xFFFF), aml.integer(c["latency"] & 0xFFFF),
            aml.integer(c["power"] & 0xFFFF)]))
    return aml.method("_CST", 0, aml.ret(aml.package(rows)))


def _pct() -> bytes:
    ffh = _reg_template(SPACE_FFIXED_HW, 0, 0, 0)
    return aml.method("_PCT", 0, aml.ret(aml.package([ffh, ffh])))


#: _CPC over the HWP MSRs (IA32_HWP_CAPABILITIES 0x771, IA32_HWP_REQUEST 0x774, ...), in
#: the order ACPI 6.5 §8.4.6.1 lists the fields; None is a zero SystemMemory register
_CPC_FIELDS: list[tuple[int, int, int] | int | None] = [
    (8, 0, 0x771), (8, 8, 0xCE), (8, 16, 0x771), (8, 24, 0x771), (8, 8, 0x771),
    (8, 16, 0x774), (8, 0, 0x774), (8, 8, 0x774), None, None, None,
    (64, 0, 0xE7), (64, 0, 0xE8), (2, 1, 0x777), (1, 0, 0x770), 1,
    (10, 32, 0x774), (8, 24, 0x774), 0, 0, 0,
]


def _cpc() -> bytes:
    items = [aml.integer(23), aml.integer(3)]
    for f in _CPC_FIELDS:
        if f is None:
            items.append(_reg_template(SPACE_SYSTEM_MEMORY, 0, 0, 0))
        elif isinstance(f, int):
            items.append(aml.integer(f))
        else:
            items.append(_reg_template(SPACE_FFIXED_HW, f[0], f[1], f[2], 4))
    return aml.method("_CPC", 0, aml.ret(aml.package(items)))


def processor_objects(cpus: list[CpuPowerStates]) -> bytes:
    """The DSDT terms for every vCPU (to go at the DSDT's root)."""
    devices = [aml.device(f"PR{i:02d}", aml.name("_HID", aml.string("ACPI0007")),
                          aml.name("_UID", aml.integer(i))) for i in range(len(cpus))]
    out = [aml.scope("_SB", *devices)]
    for i, cpu in enumerate(cpus):
        terms: list[bytes] = []
        if cpu.px:
            terms.append(_pss(cpu.px))
        if cpu.cx:
            terms.append(_cst(cpu.cx))
        if cpu.px:
            if i == 0:
                terms += [aml.name("_PPC", aml.integer(0)), _pct()]
            else:
                terms += [aml.method("_PPC", 0, aml.ret(aml.name_string("^^PR00._PPC"))),
                          aml.method("_PCT", 0, aml.ret(aml.name_string("^^PR00._PCT")))]
        if cpu.px == []:
            terms.append(_cpc() if i == 0 else
                         aml.method("_CPC", 0, aml.ret(aml.name_string("^^PR00._CPC"))))
        if terms:
            out.append(aml.scope(f"_SB.PR{i:02d}", *terms))
    return b"".join(out)


__all__ = ["CpuPowerStates", "StateQuery", "processor_objects", "query_states", "register"]
