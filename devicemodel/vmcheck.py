"""The one validator every front door shares: what ``run`` refuses, ``config --from-args``,
``config --check`` and ``lspci`` refuse too, in the same words.

Two stages (docs/vm-toml.md lists them):

- ``check_vm``: the description against the devices, without touching the host: every
  ``-s`` emulation is one we have, and each device's options parse (through the same
  pure option parsers the device factories call, so nothing is opened). ``run`` (both
  forms), ``config --from-args``, ``config --check`` and ``lspci`` all run it.
- ``check_host``: what needs this host and is checked by ``run`` only: the guest's memory
  fits in the host's. Opening images, taps, sockets, passthrough devices and the instance
  lock stays with ``run`` too, where the device or lock is really taken.

The description's own checks (VM name, slots used twice, options that exclude each other,
boot images that exist) are config/validate.py's, run while parsing.

Each device's option parser is found through the registry (``registry.check_options``),
the same table the factories come from. The validator sits below the front ends.
"""

from __future__ import annotations

from .config import ACRN_EMULS, VmConfig
from .errors import ConfigError
from .hostinfo import host_mem_total
from .memory import GiB, MiB
from .passthru.host import SimHostDevice
from .passthru.igd import RTVM_REFUSAL, is_intel_graphics
from .platform.lpc import com_resources
from .platform.uart_backend import parse_backend
from .registry import check_options, known
from .slot import SlotConfig

#: devices acrn-dm has that this project leaves out on purpose (issue 16): refused by name
OUT_OF_SCOPE: dict[str, str] = {
    "ahci": "SATA disks are another issue's", "ahci-hd": "SATA disks are another issue's",
    "ahci-cd": "SATA disks are another issue's", "virtio-gpu": "graphics",
    "xhci": "USB", "virtio-audio": "audio", "virtio-ipu": "camera",
    "virtio-hyper_dmabuf": "graphics buffer sharing",
}


def check_vm(cfg: VmConfig, *, source: str | None = None) -> None:
    """Refuse, in one line, a description ``run`` would refuse before touching the host.

    ``source`` is the VM file a description came from; its messages then start with it
    and name the ``pci_slot`` entry, as the TOML front end's own messages do.
    """
    names = known()
    for index, slot in enumerate(cfg.slots):
        try:
            parsed = _check_slot(slot, names)
            if cfg.rtvm and isinstance(parsed, SimHostDevice) and is_intel_graphics(parsed):
                raise ConfigError(f"passthru {parsed.name}: {RTVM_REFUSAL}")
        except ConfigError as e:
            raise _placed(e, slot, index, source) from None
    try:
        _check_lpc(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _check_slot(slot: SlotConfig, names: list[str]) -> object:
    if slot.emul not in names:
        if slot.emul in OUT_OF_SCOPE:
            raise ConfigError(f"not supported by acrn-pydm: -s {slot.emul} "
                              f"({OUT_OF_SCOPE[slot.emul]}: out of its scope)")
        if slot.emul in ACRN_EMULS:
            raise ConfigError(f"not supported by acrn-pydm: -s {slot.emul}")
        raise ConfigError(f"-s {slot.to_arg()}: unknown emulation {slot.emul!r}; "
                          f"known: {', '.join(sorted(names))}")
    return check_options(slot)


def _placed(e: ConfigError, slot: SlotConfig, index: int, source: str | None) -> ConfigError:
    """The device's message, with where the device is when it does not say so itself."""
    msg = str(e)
    if source:
        return ConfigError(f"{source}: pci_slot[{index}]: {msg}")
    if msg.startswith(("-s ", "not supported by acrn-pydm: -s ")):
        return e
    return ConfigError(f"-s {slot.short_text},{slot.emul}: {msg}")


def _check_lpc(cfg: VmConfig) -> None:
    """What the LPC bridge (platform/lpc.py) refuses when it is built."""
    bridges = [s for s in cfg.slots if s.emul == "lpc"]
    if not bridges:
        return  # -l without a bridge is ignored with a warning, as in acrn-dm
    first = bridges[0]
    if first.bus != 0:
        raise ConfigError(f"-s {first.slot_text},lpc: the LPC bridge must be on bus 0")
    if len(bridges) > 1:
        raise ConfigError(f"-s {bridges[1].slot_text},lpc: only one LPC bridge is allowed "
                          f"(one is at {first.slot_text})")
    for entry in cfg.lpc:
        com_resources(entry)
        check_uart_backend(entry.backend)


def check_uart_backend(spec: str) -> None:
    """The ``-l`` backend syntax, as platform/uart_backend.py's ``open_backend`` reads it
    (one parser, ``parse_backend``), without opening it."""
    parse_backend(spec)


def check_host(cfg: VmConfig, *, source: str | None = None,
               mem_total: int | None = None) -> None:
    """``run``'s checks against this host: the guest's RAM must fit in the host's.

    kvm and sim back guest RAM with a sparse memfd, so a size above the host's MemTotal
    starts and then dies (or takes the host down) once the guest touches it: refused here.
    On acrn, acrn-dm itself has no such check at ``-m`` (vm_parse_memsize only wants
    >= 128M); its vm_setup_memory -> hugetlb_setup_memory counts the huge pages the guest
    needs, tries to reserve the missing ones through nr_hugepages and fails the start when
    the kernel cannot give them. A Service VM can never reserve more than its MemTotal, so
    refusing above it here refuses what acrn-dm refuses in every case; smaller sizes the
    host is short of at that moment fail as acrn-dm's do, when the memory is mapped.
    """
    total = host_mem_total() if mem_total is None else mem_total
    if total is not None and cfg.memsize > total:
        what = f'{source}: memsize = "{_size(cfg.memsize)}"' if source else \
            f"-m {_size(cfg.memsize)}"
        raise ConfigError(f"{what}: more than the host's {_size(total)} of RAM (MemTotal); "
                          f"give the VM at most {total // MiB // 2 * 2}M")


def _size(size: int) -> str:
    if size % GiB == 0:
        return f"{size // GiB}G"
    if size % MiB == 0:
        return f"{size // MiB}M"
    return f"{size / GiB:.1f} GiB"


__all__ = ["OUT_OF_SCOPE", "check_host", "check_uart_backend", "check_vm"]
