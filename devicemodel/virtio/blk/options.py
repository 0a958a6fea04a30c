"""virtio-blk's options, in acrn-dm's syntax (acrn-facts §4.2)::

    virtio-blk,[iothread[=N],][mq=N,]<path>|nodisk[,writeback|writethru|ro
               |discard[=max_sectors:max_seg:align]|sectorsize=<s>[/<ps>]
               |range=<start_lba>/<size>|aio=threads]

``range`` counts in logical sectors (``sectorsize``), as acrn-dm does. ``nocache``,
``no_bst_block`` and ``aio=io_uring`` are acrn-dm options we refuse by name. The default
is writethrough (fdatasync after every write); ``writeback`` only if asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ...errors import ConfigError
from .io import SECTOR


@dataclass(frozen=True)
class BlkOptions:
    """A parsed ``virtio-blk`` option string."""

    path: str | None  # None: nodisk
    ro: bool = False
    writeback: bool = False
    sectorsize: int = SECTOR
    physical_sectorsize: int = SECTOR
    range_start: int | None = None  # in logical sectors
    range_size: int | None = None
    discard: bool = False
    max_discard_sectors: int | None = None
    max_discard_seg: int = 1
    discard_alignment: int = 0
    mq: int = 1
    iothread: int = 0  # accepted for compatibility; trio tasks serve every queue
    text: str = ""  # the whole option string: the disk id is derived from it


def _int(opt: str, value: str, who: str = "virtio-blk") -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise ConfigError(f"{who}: {opt}: {value!r} is not a decimal number") from None
    if n < 0:
        raise ConfigError(f"{who}: {opt}: must not be negative")
    return n


def parse_blk_options(text: str) -> BlkOptions:
    """Parse acrn-dm's virtio-blk options; a wrong option is named in the ConfigError."""
    tokens = text.split(",") if text else []
    kw: dict[str, object] = {}
    i = 0
    while i < len(tokens) and (tokens[i].startswith("iothread") or tokens[i].startswith("mq=")):
        tok = tokens[i]
        key, eq, val = tok.partition("=")
        if key == "iothread":
            kw["iothread"] = _int(tok, val) if eq else 1
        elif key == "mq":
            n = _int(tok, val)
            if not 1 <= n <= 64:
                raise ConfigError(f"virtio-blk: {tok}: mq must be 1..64")
            kw["mq"] = n
        else:
            raise ConfigError(f"virtio-blk: unknown option {tok!r}")
        i += 1
    if i >= len(tokens) or not tokens[i]:
        raise ConfigError("virtio-blk: expected an image path or nodisk, e.g. "
                          "-s 3,virtio-blk,/var/lib/vm/disk.img")
    path = None if tokens[i] == "nodisk" else tokens[i]
    opts = parse_drive(path, tokens[i + 1 :], "virtio-blk", text=text, **kw)
    if opts.path is None and (opts.range_start is not None or opts.discard):
        raise ConfigError("virtio-blk: nodisk takes no range= or discard option")
    return opts


def parse_drive(path: str | None, tokens: list[str], who: str, *, text: str = "",
                **kw: object) -> BlkOptions:
    """The options acrn-dm's block back end (block_if.c) takes after an image path, for
    every device that opens one (virtio-blk, an AHCI drive); ``who`` starts the messages."""
    kw["path"], kw["text"] = path, text
    for tok in tokens:
        key, eq, val = tok.partition("=")
        if tok == "writeback":
            kw["writeback"] = True
        elif tok == "writethru":
            kw["writeback"] = False
        elif tok == "ro":
            kw["ro"] = True
        elif key == "discard":
            kw["discard"] = True
            if eq:
                parts = val.split(":")
                if len(parts) != 3:
                    raise ConfigError(f"{who}: {tok}: expected discard="
                                      "<max_sectors>:<max_seg>:<align>")
                kw["max_discard_sectors"] = _int(tok, parts[0], who)
                kw["max_discard_seg"] = max(1, _int(tok, parts[1], who))
                kw["discard_alignment"] = _int(tok, parts[2], who)
        elif key == "sectorsize" and eq:
            s, _, ps = val.partition("/")
            ss = _int(tok, s, who)
            pss = _int(tok, ps, who) if ps else ss
            if ss < SECTOR or ss & (ss - 1) or pss & (pss - 1) or pss < ss or ss > 4096:
                raise ConfigError(f"{who}: {tok}: sector sizes must be powers of two, "
                                  "512 <= sectorsize <= 4096 and <= the physical size")
            kw["sectorsize"], kw["physical_sectorsize"] = ss, pss
        elif key == "range" and eq:
            start, slash, size = val.partition("/")
            if not slash:
                raise ConfigError(f"{who}: {tok}: expected range=<start_lba>/<size>")
            kw["range_start"], kw["range_size"] = _int(tok, start, who), _int(tok, size, who)
        elif key == "aio" and val == "threads":
            pass
        elif tok in ("nocache", "no_bst_block") or key == "aio":
            raise ConfigError(f"{who}: option {tok!r} is not supported by acrn-pydm")
        else:
            raise ConfigError(f"{who}: unknown option {tok!r}")
    return BlkOptions(**kw)  # type: ignore[arg-type]


def disk_ident(text: str) -> bytes:
    """acrn-dm's serial: "ACRN--" and six bytes of the MD5 of the option string."""
    d = hashlib.md5(text.encode(), usedforsecurity=False).digest()
    return "ACRN--{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}".format(*d[:6]).encode()

