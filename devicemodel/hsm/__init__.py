"""The hypervisor boundary: the uapi ABI and the backends (acrn, kvm, sim)."""

from __future__ import annotations

import os

from .base import Hypervisor


def acrn_present() -> bool:
    from .abi import HSM_NODES  # here: the front ends import hsm without construct

    return any(os.path.exists(p) for p in HSM_NODES)


def default_backend() -> str:
    """acrn where the HSM exists, else kvm where /dev/kvm answers, else sim."""
    if acrn_present():
        return "acrn"
    from .kvm import kvm_usable

    if kvm_usable() is None:
        return "kvm"
    return "sim"


def open_hypervisor(name: str | None, vcpus: int | None = None) -> Hypervisor:
    name = name or default_backend()
    if name == "acrn":
        from .acrn import AcrnHypervisor

        return AcrnHypervisor()
    if name == "kvm":
        from .kvm import KvmHypervisor

        return KvmHypervisor()
    if name == "sim":
        from .sim import SimHypervisor

        return SimHypervisor(vcpus)
    raise ValueError(f"unknown hypervisor backend {name!r}")
