"""PCI passthrough: the physical device (host.py: sysfs/VFIO in vfio.py, or the synthetic
SimHostDevice), the ``passthru`` emulation (device.py), virtualized MSI (msi.py), vMSI-X
on MSI (vmsix_on_msi.py) and the interrupt remapping both rely on (remap.py)."""
