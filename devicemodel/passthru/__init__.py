"""PCI passthrough: the physical device (host.py: sysfs/VFIO in vfio.py, or the synthetic
SimHostDevice), the ``passthru`` emulation (device.py), virtualized MSI (msi.py), vMSI-X
on MSI (vmsix_on_msi.py); both route messages through the interrupt remapper the
backend supplies (remap.py picks it; the routes and deliveries are ``irq/remap.py``)."""
