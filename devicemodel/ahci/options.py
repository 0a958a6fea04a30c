"""acrn-dm's AHCI option string: one drive per port, in order::

    -s <slot>,ahci,hd:<image>[,<option>...][,cd:<iso>[,<option>...]]...
    -s <slot>,ahci-hd,<image>[,...]       the first drive's kind is implied (hd)
    -s <slot>,ahci-cd,<iso>[,...]         (cd)

A drive begins at ``hd:`` or ``cd:``; the options after its path are those of acrn-dm's
block back end (``ro``, ``writeback``/``writethru``, ``range=``, ``sectorsize=``,
``discard``, ``aio=threads``; parsed by virtio-blk's ``parse_drive``). A CD-ROM takes
only ``ro`` (it is read-only anyway), ``range=`` and ``aio=threads``; ``cd:`` with no
path is an empty drive whose disc the monitor's ``blkrescan`` puts in later.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..virtio.blk.options import BlkOptions, disk_ident, parse_drive
from .regs import MAX_PORTS

KINDS = ("hd", "cd")
_CD_OPTIONS = ("ro", "range", "aio")


@dataclass(frozen=True)
class DriveOptions:
    """One port's drive."""

    kind: str  # "hd" or "cd"
    blk: BlkOptions  # blk.path is None for an empty CD-ROM drive
    #: acrn-dm's serial for the drive: from its option string (after "hd:"/"cd:")
    serial: str


def default_kind(emul: str) -> str:
    return "cd" if emul == "ahci-cd" else "hd"


def _split(text: str, first_kind: str) -> list[tuple[str, list[str]]]:
    drives: list[tuple[str, list[str]]] = []
    for token in text.split(","):
        kind, colon, rest = token.partition(":")
        if colon and kind in KINDS:
            drives.append((kind, [rest]))
        elif drives:
            drives[-1][1].append(token)
        else:
            drives.append((first_kind, [token]))
    return drives


def parse_ahci_options(text: str, emul: str = "ahci") -> list[DriveOptions]:
    """The drives of ``-s <slot>,<emul>,<text>``, port 0 first (ConfigError naming the
    port and the option)."""
    if not text:
        raise ConfigError(f"{emul}: give at least one drive, e.g. -s 4,{emul},"
                          + ("cd:/path/installer.iso" if emul == "ahci-cd"
                             else "hd:/var/lib/vm/disk.img"))
    drives = _split(text, default_kind(emul))
    if len(drives) > MAX_PORTS:
        raise ConfigError(f"{emul}: {len(drives)} drives; an AHCI controller has at most "
                          f"{MAX_PORTS} ports")
    out = []
    for port, (kind, tokens) in enumerate(drives):
        who = f"{emul}: port {port} ({kind})"
        path = tokens[0] or None
        if path is None and kind == "hd":
            raise ConfigError(f"{who}: hd: needs an image, e.g. hd:/var/lib/vm/disk.img")
        if kind == "cd":
            for tok in tokens[1:]:
                if tok.partition("=")[0] not in _CD_OPTIONS:
                    raise ConfigError(f"{who}: option {tok!r} does not apply to a CD-ROM "
                                      f"(it takes {', '.join(_CD_OPTIONS)})")
            if path is None and len(tokens) > 1:
                raise ConfigError(f"{who}: an empty drive (cd: with no image) takes no "
                                  "options")
        opts = parse_drive(path, tokens[1:], who, text=",".join(tokens))
        if kind == "cd":
            opts = BlkOptions(**{**opts.__dict__, "ro": True})
        out.append(DriveOptions(kind, opts, disk_ident(",".join(tokens)).decode()))
    return out


__all__ = ["DriveOptions", "KINDS", "default_kind", "parse_ahci_options"]
