"""AHCI: a SATA controller with ATA disks and ATAPI CD-ROM drives (``-s N,ahci,...``,
``ahci-hd``, ``ahci-cd``), judged by Linux's ahci driver.

- ``options.py``: acrn-dm's option string (drives in port order, their block options).
- ``hba.py``: ``Ahci``, the PCI function: ABAR (BAR5) global registers, MSI and INTx.
- ``port.py``: a port's registers, its command list, the FISes and interrupts that end
  commands, error recovery and resets.
- ``command.py``: fetching a command (header, FIS, PRD table) from guest memory, checked.
- ``fis.py``: the FISes a drive sends back.
- ``drive.py``: what a port asks of a drive (``Done``), and the log of commands seen.
- ``ata.py`` / ``identify.py``: the disk (ATA8-ACS) and its IDENTIFY data.
- ``atapi.py`` / ``mmc.py``: the CD-ROM (PACKET commands, SPC/MMC data).

Image I/O goes through virtio-blk's engine (``devicemodel.virtio.blk.io``), shared, not
copied: the same ``DiskImage`` and ``ThreadIo`` on the controller's thread pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..virtio.blk.io import DiskImage, Runner, ThreadIo
from .ata import AtaDisk
from .atapi import AtapiCd
from .drive import Drive
from .hba import Ahci, ThreadPool
from .options import DriveOptions, parse_ahci_options

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig


def open_drive(opts: DriveOptions, run: Runner, who: str) -> Drive:
    """Open one drive's image (ConfigError naming ``who`` if it cannot serve); its
    blocking calls go to ``run``."""
    blk = opts.blk
    image = None
    if blk.path is not None:
        image = DiskImage.open(blk.path, ro=blk.ro, sector_size=blk.sectorsize,
                               range_start=blk.range_start, range_size=blk.range_size,
                               who=who)
    if opts.kind == "cd":
        return AtapiCd(image, run, opts.serial, who=who)
    assert image is not None
    disk = AtaDisk(image, ThreadIo(image, run), opts.serial, writeback=blk.writeback,
                   who=who)
    disk.physical = blk.physical_sectorsize
    return disk


def check_options(slot: SlotConfig, options: str) -> object:
    """The validator's check (registry.check_options): the drives ``create`` would open,
    parsed without opening them."""
    return parse_ahci_options(options, slot.emul)


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> Ahci:
    """``-s <slot>,ahci|ahci-hd|ahci-cd,<drives>``."""
    pool = ThreadPool()
    drives: list[Drive | None] = []
    try:
        for port, opts in enumerate(parse_ahci_options(options, slot.emul)):
            drives.append(open_drive(opts, pool.run, f"{slot.emul}: port {port} ({opts.kind})"))
        return Ahci(ctx, slot, drives, pool)
    except BaseException:
        for d in drives:
            if d is not None:
                d.close()
        raise


__all__ = ["Ahci", "AtaDisk", "AtapiCd", "DriveOptions", "ThreadPool", "check_options", "create",
           "open_drive", "parse_ahci_options"]
