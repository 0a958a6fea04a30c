"""The host end of virtio-net: a Linux tap device.

The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; if no interface of that name
exists the kernel creates it, non-persistent, so it disappears when we close it. No
offloads are enabled: the device offers none, so frames carry plain virtio-net headers.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from ...errors import ConfigError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFMTU = 0x8921


class TapBackend:
    """An open tap queue. ``created`` is True if opening it created the interface."""

    def __init__(self, fd: int, name: str, created: bool, mtu: int) -> None:
        self.fd = fd
        self.name = name
        self.created = created
        self.mtu = mtu

    @classmethod
    def open(cls, name: str) -> TapBackend:
        """Open (creating if absent) tap ``name`` in the calling thread's network namespace."""
        try:
            socket.if_nametoindex(name)
            created = False
        except OSError:
            created = True
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"virtio-net: tap={name}: cannot open /dev/net/tun: "
                              f"{e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            if created:
                fcntl.ioctl(fd, TUNSETPERSIST, 0)  # gone when we close it
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)  # plain frames only: we offer no offloads
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                res = fcntl.ioctl(s, SIOCGIFMTU, struct.pack("16si20x", name.encode(), 0))
                mtu = struct.unpack_from("16si", res)[1]
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"virtio-net: tap={name}: {e.strerror}") from None
        return cls(fd, name, created, mtu)

    def set_vnet_hdr_len(self, n: int) -> None:
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", n))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

