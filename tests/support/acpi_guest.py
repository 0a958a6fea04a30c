"""acrn-pydm whose sim guest has enabled ACPI (SCI_EN set, as firmware or an OS does at
boot) but never answers the power button: a guest that hears it and ignores it.

    python -m tests.support.acpi_guest <acrn-pydm arguments>

The plain sim guest never touches the PM registers, so a stop request destroys it at once
(it could not hear the button); tests of the grace period need this one instead.
"""

from __future__ import annotations

from devicemodel.platform import pm


def enable_acpi_at_power_on() -> None:
    """Every PowerManagement starts (and resets to) SCI_EN set."""
    reset = pm.PowerManagement.reset
    init = pm.PowerManagement.__init__

    def __init__(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, N807
        init(self, *args, **kwargs)
        self.control |= pm.PM1_SCI_EN

    def reset_keeping_acpi(self) -> None:  # noqa: ANN001
        reset(self)
        self.control |= pm.PM1_SCI_EN

    pm.PowerManagement.__init__ = __init__  # type: ignore[method-assign]
    pm.PowerManagement.reset = reset_keeping_acpi  # type: ignore[method-assign]


if __name__ == "__main__":
    enable_acpi_at_power_on()
    from devicemodel.cli import main

    raise SystemExit(main())
