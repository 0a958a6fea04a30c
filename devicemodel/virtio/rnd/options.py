"""virtio-rnd's options. acrn-dm's ``virtio-rnd`` takes none; we add an optional rate
limit with QEMU's names, ``virtio-rnd[,max-bytes=<n>][,period=<ms>]`` (default:
unlimited; period 1000 ms), so one guest cannot drain the host's entropy pool or CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError


@dataclass(frozen=True)
class RndOptions:
    max_bytes: int | None = None
    period_ms: int = 1000


def parse_rnd_options(text: str) -> RndOptions:
    max_bytes: int | None = None
    period = 1000
    for tok in filter(None, text.split(",")):
        key, eq, val = tok.partition("=")
        if key in ("max-bytes", "period") and eq:
            try:
                n = int(val, 10)
            except ValueError:
                raise ConfigError(f"virtio-rnd: {tok}: expected a decimal number") from None
            if n <= 0:
                raise ConfigError(f"virtio-rnd: {tok}: must be positive")
            if key == "max-bytes":
                max_bytes = n
            else:
                period = n
        else:
            raise ConfigError(f"virtio-rnd: unknown option {tok!r}; "
                              "use max-bytes=<n>,period=<ms>")
    return RndOptions(max_bytes, period)
