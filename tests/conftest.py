"""Fixtures shared by test files of more than one tier (a tier's own are in its conftest.py;
helpers that are not fixtures are in tests/support/)."""

from __future__ import annotations

import pytest

from devicemodel.memory import GuestMemory, MiB
from tests.support import hostile_rings


@pytest.fixture(scope="module")
def mem(request: pytest.FixtureRequest) -> GuestMemory:
    """Guest RAM for a virtio device test module: 128 MiB, or the module's ``GUEST_RAM``."""
    return GuestMemory(getattr(request.module, "GUEST_RAM", 128 * MiB))


@pytest.fixture(scope="module")
def hostile_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1 MiB disk image for the hostile-ring properties (tests/support/hostile_rings.py)."""
    return hostile_rings.image(tmp_path_factory)
