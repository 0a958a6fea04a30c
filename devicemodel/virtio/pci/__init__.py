"""The virtio-pci transport, split by concern:

* ``transport.py``: ``VirtioPci``, the PCI function: BAR plan, capabilities, fast paths;
* ``core.py``: the state the driver programs (status, features, vectors, ISR), activation
  and reset, and the interrupts the device raises;
* ``legacy.py``: the legacy registers (BAR0); ``modern.py``: common configuration, ISR,
  device config and notify regions (BAR4, BAR2); ``pcicfg.py``: the PCI_CFG window;
* ``doorbells.py``: queue notify eventfds; ``options.py``: the transport's ``-s`` tokens;
  ``layout.py``: offsets and BAR indices.
"""

from __future__ import annotations

from .layout import NO_VECTOR
from .options import Mode, TransportOptions, split_transport_options
from .transport import VirtioPci

__all__ = ["Mode", "NO_VECTOR", "TransportOptions", "VirtioPci", "split_transport_options"]
