"""Facts about the host the VM runs on: its CPUs' LAPIC ids and its memory.

At the bottom of the import graph: the VM description (config/) asks these when it maps
``--cpu_affinity`` to pCPUs, the platform asks them for the guest's MADT, and the run-time
checks ask them before a VM takes memory the host does not have.
"""

from __future__ import annotations

import struct

HOST_MADT = "/sys/firmware/acpi/tables/APIC"
MEMINFO = "/proc/meminfo"


def host_lapic_ids(path: str = HOST_MADT) -> list[int]:
    """The host's LAPIC IDs in MADT order (pCPU i has the i-th enabled one), as acrn-dm
    reads them; empty when the table cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)  # a MADT is a few KiB; never read a device unbounded
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


def host_mem_total(path: str = MEMINFO) -> int | None:
    """The host's RAM in bytes (``MemTotal`` of /proc/meminfo); None where it is unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 16).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "MemTotal":
            fields = rest.split()
            if fields and fields[0].isascii() and fields[0].isdigit():
                unit = fields[1].lower() if len(fields) > 1 else ""
                return int(fields[0]) * (1024 if unit == "kb" else 1)
    return None


__all__ = ["HOST_MADT", "MEMINFO", "host_lapic_ids", "host_mem_total"]
