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

It sits above the devices (it imports their option parsers) and below the front ends.
"""

from __future__ import annotations

from collections.abc import Callable

from .ahci.options import parse_ahci_options
from .config import ACRN_EMULS, VmConfig
from .errors import ConfigError
from .hostinfo import host_mem_total
from .memory import GiB, MiB
from .passthru.device import PassthruOptions
from .passthru.host import parse_sim_spec
from .pci.dummy import parse_options as parse_dummy_options
from .platform.lpc import com_resources
from .registry import known
from .slot import SlotConfig
from .virtio.blk import parse_blk_options
from .virtio.console import parse_console_options
from .virtio.net import parse_net_options
from .virtio.pci import split_transport_options
from .virtio.rnd import parse_rnd_options

OptionCheck = Callable[[SlotConfig], object]


def _virtio(parse: Callable[[str, SlotConfig], object]) -> OptionCheck:
    """The transport's tokens come out first, as virtio/pci_devices.py does it."""

    def check(slot: SlotConfig) -> object:
        _, rest = split_transport_options(slot.emul, slot.options)
        return parse(rest, slot)

    return check


def _passthru(slot: SlotConfig) -> object:
    opts = PassthruOptions(slot.options, slot.slot_text)
    if opts.phys_bdf is None:  # the synthetic device is pure data: build it to check it
        return parse_sim_spec(opts.device, 0xFE00 | slot.dev << 3 | slot.func)
    return opts


# TODO(devicemodel/registry.py): the registry H1 is building maps each -s name to its
# option parser; read the parsers from there and drop this table. Until then it lists the
# pure parser behind each factory (virtio/pci_devices.py, passthru/device.py, pci/dummy.py).
DEVICE_OPTIONS: dict[str, OptionCheck] = {
    "virtio-blk": _virtio(lambda text, slot: parse_blk_options(text)),
    "virtio-net": _virtio(lambda text, slot: parse_net_options(text, slot.dev, slot.func)),
    "virtio-console": _virtio(lambda text, slot: parse_console_options(text)),
    "virtio-rnd": _virtio(lambda text, slot: parse_rnd_options(text)),
    "passthru": _passthru,
    "dummy": lambda slot: parse_dummy_options(slot.options),
    **{emul: (lambda slot: parse_ahci_options(slot.options, slot.emul))
       for emul in ("ahci", "ahci-hd", "ahci-cd")},
}


def check_vm(cfg: VmConfig, *, source: str | None = None) -> None:
    """Refuse, in one line, a description ``run`` would refuse before touching the host.

    ``source`` is the VM file a description came from; its messages then start with it
    and name the ``pci_slot`` entry, as the TOML front end's own messages do.
    """
    names = known()
    for index, slot in enumerate(cfg.slots):
        try:
            _check_slot(slot, names)
        except ConfigError as e:
            raise _placed(e, slot, index, source) from None
    try:
        _check_lpc(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _check_slot(slot: SlotConfig, names: list[str]) -> None:
    if slot.emul not in names:
        if slot.emul in ACRN_EMULS:
            raise ConfigError(f"not supported by acrn-pydm: -s {slot.emul}")
        raise ConfigError(f"-s {slot.to_arg()}: unknown emulation {slot.emul!r}; "
                          f"known: {', '.join(sorted(names))}")
    check = DEVICE_OPTIONS.get(slot.emul)
    if check is not None:
        check(slot)


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
    """The syntax platform/uart_backend.py's ``open_backend`` accepts, without opening it.

    TODO(chardev/): when the host ends move there (H4), let it expose this parse and call
    it here; tests/unit/test_vmcheck.py holds the two to the same words meanwhile.
    """
    if spec in ("", "stdio", "pty") or spec.startswith("/"):
        return
    kind, sep, rest = spec.partition(":")
    if sep and kind == "file":
        if not rest:
            raise ConfigError("-l file:<path>: the path is missing")
        return
    if sep and kind == "socket":
        if not rest:
            raise ConfigError("-l socket:<path>: the path is missing")
        return
    if sep and kind == "tcp":
        try:
            port = int(rest, 10)
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise ConfigError(f"-l tcp:{rest}: expected a TCP port number 1..65535")
        return
    raise ConfigError(
        f"-l backend {spec!r}: use stdio, pty, file:<path>, socket:<path>, tcp:<port> "
        "or a tty path"
    )


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


__all__ = ["DEVICE_OPTIONS", "check_host", "check_uart_backend", "check_vm"]
