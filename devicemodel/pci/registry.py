"""``-s`` emulation names → device factories. Device modules register themselves here;
vm.py imports them (the list is in ``devicemodel.devices``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..context import VmContext
    from ..slot import SlotConfig

Factory = Callable[["VmContext", "SlotConfig"], Any]
_FACTORIES: dict[str, Factory] = {}


def register(*names: str) -> Callable[[Factory], Factory]:
    def deco(factory: Factory) -> Factory:
        for name in names:
            if name in _FACTORIES:
                raise RuntimeError(f"emulation {name!r} registered twice")
            _FACTORIES[name] = factory
        return factory

    return deco


def factory_for(name: str) -> Factory:
    try:
        return _FACTORIES[name]
    except KeyError:
        known = ", ".join(sorted(_FACTORIES))
        raise ConfigError(f"-s: unknown emulation {name!r}; known: {known}") from None


def known() -> list[str]:
    return sorted(_FACTORIES)
