"""virtio-rnd, the entropy device (virtio 1.2 §5.4).

- ``options.py``: the option string (``RndOptions``, ``parse_rnd_options``).
- ``device.py``: ``VirtioRnd`` and ``create``.
"""

from __future__ import annotations

from .device import MAX_PER_REQUEST, QUEUE_SIZE, VirtioRnd, create, parse_options
from .options import RndOptions, parse_rnd_options

__all__ = ["MAX_PER_REQUEST", "QUEUE_SIZE", "RndOptions", "VirtioRnd", "create", "parse_options",
           "parse_rnd_options"]
