"""Helpers the tests share (no tests here; fixtures are in the conftest.py files).

``served`` a served request page on the sim hypervisor; ``fds`` open-descriptor leak checks;
``paths`` the repository root; ``pci_guest`` Linux's PCI enumeration through the sim vCPU;
``virtio_pci_driver`` Linux's virtio-pci driver through it; ``blk_rig`` virtio-blk on the
mock transport; ``hostile_rings`` hypothesis-generated hostile rings and their properties;
``vhost`` the vhost-user back end served to the Python front end; ``acrn_fake`` a recording
fake of the ACRN ioctl layer; ``images`` synthetic ELF/multiboot/bzImage images; ``lspci``
``acrn-pydm lspci`` decoded by the real lspci; ``launch`` acrn-dm's typical launch line;
``kvm_boot`` booting a guest program through acrn-dm's command line on KVM;
``import_graph`` the package's import graph and its cycles, read from the source with ast;
``ioreq_slots`` random request slots; ``vmsix_ops`` guest operations on a vMSI-X
capability; ``seccomp_filter`` the systemd unit's syscall filter; ``adversarial`` and
``adversarial_kvm`` the adversarial guest suites (``python -m tests.support.adversarial``,
``python -m tests.support.adversarial_kvm``).
"""
