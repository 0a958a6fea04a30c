"""virtio-net's options, in acrn-dm's syntax (acrn-facts §4.2)::

    virtio-net,tap=<name>[,vhost][,mac=XX:XX:XX:XX:XX:XX|mac_seed=<string>]

The older form ``virtio-net,<name>`` (``tap0``, ``tap_WaaG``: a first option without ``=``
that contains "tap" or starts with "vmnet", acrn-dm's rule before 3.0) names the tap
the same way; ``create`` warns about it.

Without ``mac=``, the MAC is acrn-dm's: 00:16:3e followed by the first three bytes of
MD5("<slot>-<func>[-<mac_seed>]"). ``vhost`` is accepted and, as acrn-dm does when
vhost-net is unavailable, falls back to the user-space data path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import ConfigError

IFNAMSIZ = 16


@dataclass(frozen=True)
class NetOptions:
    tap: str
    mac: bytes
    vhost: bool = False
    #: given in the pre-3.0 form ``virtio-net,<tap name>``
    legacy_form: bool = False


def derive_mac(slot: int, func: int, seed: str | None) -> bytes:
    """acrn-dm's default MAC: 00:16:3e + MD5("<slot>-<func>[-<seed>]")[0:3]."""
    text = f"{slot}-{func}-{seed}" if seed is not None else f"{slot}-{func}"
    digest = hashlib.md5(text.encode(), usedforsecurity=False).digest()
    return bytes([0x00, 0x16, 0x3E]) + digest[:3]


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts) if len(parts) == 6 and all(
            1 <= len(p) <= 2 for p in parts) else b""
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise ConfigError(f"virtio-net: mac={text}: expected six hex bytes like 00:16:3e:01:02:03")
    if mac[0] & 1:
        raise ConfigError(f"virtio-net: mac={text}: a multicast address cannot be a NIC's MAC")
    if mac == bytes(6):
        raise ConfigError(f"virtio-net: mac={text}: the zero address is not a valid MAC")
    return mac


def parse_net_options(text: str, slot: int = 0, func: int = 0) -> NetOptions:
    tap: str | None = None
    mac: bytes | None = None
    seed: str | None = None
    vhost = legacy = False
    tokens = text.split(",")
    first = tokens[0]
    if "=" not in first and first != "vhost" and ("tap" in first or first.startswith("vmnet")):
        tokens[0], legacy = f"tap={first}", True  # acrn-dm before 3.0: the device name
    for tok in tokens:
        key, eq, val = tok.partition("=")
        if key == "tap" and eq:
            if not val or len(val.encode()) >= IFNAMSIZ or "/" in val or " " in val:
                raise ConfigError(f"virtio-net: {tok}: a tap name is 1..15 characters")
            tap = val
        elif key == "mac" and eq:
            mac = parse_mac(val)
        elif key == "mac_seed" and eq:
            seed = val
        elif tok == "vhost":
            vhost = True
        elif tok:
            raise ConfigError(f"virtio-net: unknown option {tok!r}; "
                              "use tap=<name>[,vhost][,mac=<mac>|mac_seed=<str>]")
    if tap is None:
        raise ConfigError("virtio-net: tap=<name> is required, e.g. -s 4,virtio-net,tap=tap0")
    return NetOptions(tap, mac if mac is not None else derive_mac(slot, func, seed), vhost,
                      legacy)

