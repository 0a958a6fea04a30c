"""Virtio: the split virtqueue, the transport-independent device interface, the devices.

``device.py`` documents the contract a transport (virtio-pci in ``pci/``, vhost-user)
drives; ``devicemodel.registry`` names every device and the module that builds it.
"""
