"""virtio-console (virtio 1.2 §5.3) with acrn-dm's port backends and the multiport
control queue.

- ``options.py``: acrn-dm's option string (``PortSpec``, ``ConsoleOptions``,
  ``parse_console_options``).
- ``ports.py``: each port's host end (on ``devicemodel.chardev``, shared with the UART)
  and its driver-side state.
- ``device.py``: ``VirtioConsole`` (data and control queues) and ``create``.
"""

from __future__ import annotations

from .device import (
    CONFIG_SIZE,
    QUEUE_SIZE,
    VIRTIO_CONSOLE_CONSOLE_PORT,
    VIRTIO_CONSOLE_DEVICE_ADD,
    VIRTIO_CONSOLE_DEVICE_READY,
    VIRTIO_CONSOLE_DEVICE_REMOVE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    VIRTIO_CONSOLE_PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN,
    VIRTIO_CONSOLE_PORT_READY,
    VIRTIO_CONSOLE_RESIZE,
    VirtioConsole,
    create,
    parse_options,
)
from .options import BACKENDS, MAX_PORTS, ConsoleOptions, PortSpec, parse_console_options
from .ports import Port, PortBackend, open_port

__all__ = [
    "BACKENDS", "CONFIG_SIZE", "MAX_PORTS", "QUEUE_SIZE", "VIRTIO_CONSOLE_CONSOLE_PORT",
    "VIRTIO_CONSOLE_DEVICE_ADD", "VIRTIO_CONSOLE_DEVICE_READY",
    "VIRTIO_CONSOLE_DEVICE_REMOVE", "VIRTIO_CONSOLE_F_MULTIPORT", "VIRTIO_CONSOLE_F_SIZE",
    "VIRTIO_CONSOLE_PORT_NAME", "VIRTIO_CONSOLE_PORT_OPEN", "VIRTIO_CONSOLE_PORT_READY",
    "VIRTIO_CONSOLE_RESIZE", "ConsoleOptions", "Port", "PortBackend", "PortSpec",
    "VirtioConsole", "create", "parse_options", "open_port", "parse_console_options",
]
