"""The interrupt layer, below pci/: the only place interrupt delivery is written.

* ``services.py``: what delivery needs from below (MSI sink, interrupt lines, eventfds)
  and ``Line`` (a pin with its polarity); ``backend.py`` provides them over a hypervisor.
* ``msix.py``: the MSI-X table and PBA with pluggable delivery (``delivery.py``: inject,
  irqfd route, per-vector eventfds for a table a peer owns; ``remap.py``: a passthrough
  device's physical messages through interrupt remapping).
* ``msi.py``: MSI message delivery (multiple messages, mask and pending bits).
* ``intx.py``: INTx pins and the router that gives them vIOAPIC pins and PIRQ links.

Everything here may be signalled from any thread: each object keeps its state under a lock.
"""
