"""Guests to run acrn-pydm's devices against, for tests, benchmarks and the demo.

* ``qemu``: an unmodified Debian kernel (downloaded into a cache, never installed) with a
  busybox initramfs, booted in QEMU (TCG) on ``acrn-pydm vhost-user`` back ends; the
  guest's verdicts come back over the serial console.
* ``trixie``: a QEMU new enough for a vhost-user console (Debian 13 + backports in a
  cached chroot, built with debootstrap on first use).
* ``systemd_guest``: a Debian 13 root with systemd as PID 1 (a cached disk image built with
  debootstrap) booted in QEMU (TCG), for checks of the systemd units under a real systemd.
* ``kvm_programs``: the small freestanding guest programs in ``programs/``, built with
  gcc and run on the KVM backend inside a real Vm.
* ``virtio_guest``: a virtio-pci driver played through the sim hypervisor's vCPU.
* ``hostile``: workloads of a guest that tries to make the device model grow.
"""
