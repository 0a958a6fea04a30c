"""Integration tests: an unmodified Debian kernel in QEMU (TCG) on our devices, served over
vhost-user (devicemodel/guestkit/qemu.py, trixie.py)."""
