"""Where a PCI function sits and what emulates it: the small type every front door shares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlotConfig:
    """One ``-s`` option: a PCI function and its emulation."""

    bus: int
    dev: int
    func: int
    emul: str
    options: str = ""
    boot: bool = False

    @property
    def slot_text(self) -> str:
        return f"{self.bus}:{self.dev}:{self.func}"

    @property
    def short_text(self) -> str:
        """acrn-dm's shortest spelling: ``3``, ``3:1`` or ``1:3:0``."""
        if self.bus:
            return self.slot_text
        return f"{self.dev}:{self.func}" if self.func else str(self.dev)

    def to_arg(self) -> str:
        """The ``-s`` value acrn-dm would accept for this function."""
        text = f"{self.short_text},{self.emul}"
        if self.boot:
            text += ",b"
        if self.options or self.boot:
            text += f",{self.options}"
        return text


__all__ = ["SlotConfig"]
