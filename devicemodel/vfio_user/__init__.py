"""vfio-user: any of our PCI functions served whole to QEMU's ``vfio-user-pci``.

``protocol`` (wire format), ``connection`` (framing with fds), ``dma`` (the client's
memory), ``irqs`` (the client's eventfds), ``routing`` (the standalone context's interrupt
services: INTx line, passthrough remapping), ``device`` (our PciDevice as regions and
IRQs: the one module that knows the PCI API), ``session`` (one client's commands),
``server`` (the process lifetime), ``cli`` (``acrn-pydm vfio-user``).
"""
