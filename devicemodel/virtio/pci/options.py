"""The transport's own ``-s`` tokens: which register interfaces, which fast paths."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ...errors import ConfigError


class Mode(enum.Enum):
    """Which register interfaces the function exposes."""

    LEGACY = "legacy"
    MODERN = "modern"
    TRANSITIONAL = "transitional"

    @property
    def has_legacy(self) -> bool:
        return self is not Mode.MODERN

    @property
    def has_modern(self) -> bool:
        return self is not Mode.LEGACY


@dataclass(frozen=True)
class TransportOptions:
    """Transport choices that ride along in a device's ``-s`` options."""

    mode: Mode = Mode.LEGACY
    pio_notify: bool = False
    ioeventfd: bool = True
    irqfd: bool = True


TRANSPORT_TOKENS = ("legacy", "modern", "transitional", "pio_notify", "no_ioeventfd",
                    "no_irqfd")


def split_transport_options(emul: str, text: str,
                            default: Mode = Mode.LEGACY) -> tuple[TransportOptions, str]:
    """Take the transport's tokens out of ``-s`` options; the rest goes to the device.

    ``legacy`` / ``modern`` / ``transitional`` pick the register interfaces (default:
    acrn-dm's choice for the device), ``pio_notify`` adds the modern PIO notify BAR2,
    ``no_ioeventfd`` / ``no_irqfd`` force the trapped notify / direct-inject paths.
    """
    modes: list[Mode] = []
    flags: set[str] = set()
    rest: list[str] = []
    for tok in text.split(",") if text else []:
        if tok in ("legacy", "modern", "transitional"):
            modes.append(Mode(tok))
        elif tok in TRANSPORT_TOKENS:
            flags.add(tok)
        else:
            rest.append(tok)
    if len(set(modes)) > 1:
        raise ConfigError(f"{emul}: {' and '.join(m.value for m in modes)} exclude each "
                          "other; pick one of legacy, modern, transitional")
    mode = modes[0] if modes else default
    if "pio_notify" in flags and not mode.has_modern:
        raise ConfigError(f"{emul}: pio_notify needs the modern interface "
                          "(add modern or transitional)")
    opts = TransportOptions(mode, "pio_notify" in flags, "no_ioeventfd" not in flags,
                            "no_irqfd" not in flags)
    return opts, ",".join(rest)


__all__ = ["Mode", "TRANSPORT_TOKENS", "TransportOptions", "split_transport_options"]
