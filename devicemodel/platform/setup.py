"""The host's LAPIC IDs, as acrn-dm reads them from the MADT (config.py maps vCPUs to
pCPUs with them; the VM's platform tables use them under ACRN).

The platform's assembly (RTC, PM, debug exit, ACPI tables, the guest image) is
``devicemodel.vmm.platform``.
"""

from __future__ import annotations

import struct

HOST_MADT = "/sys/firmware/acpi/tables/APIC"


def host_lapic_ids(path: str = HOST_MADT) -> list[int]:
    """The host's LAPIC IDs in MADT order (pCPU i has the i-th enabled one), as acrn-dm
    reads them; empty when the table cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    ids = []
    off = 44
    while off + 2 <= len(data):
        etype, length = data[off], data[off + 1]
        if length < 2 or off + length > len(data):
            break
        if etype == 0 and length >= 8:
            _, apic_id, flags = struct.unpack_from("<BBI", data, off + 2)
            if flags & 1:
                ids.append(apic_id)
        elif etype == 9 and length >= 16:
            _, x2apic_id, flags, _ = struct.unpack_from("<HIII", data, off + 2)
            if flags & 1:
                ids.append(x2apic_id)
        off += length
    return ids


__all__ = ["HOST_MADT", "host_lapic_ids"]
