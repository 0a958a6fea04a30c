"""The fast long mode's engine: it runs the inputs it says, saves a failing one once, and
the saved file reproduces the failure (``python -m tests.fuzz repro`` does the same)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from . import _engine


@given(x=st.integers(0, 255), y=st.integers(0, 255))
def planted(fixture_value, x, y):
    assert fixture_value == "bound"
    if x == 7:
        raise ValueError("planted bug")


def test_engine_counts_saves_and_reproduces(tmp_path, monkeypatch):
    monkeypatch.setenv("ACRN_PYDM_FUZZ_ENGINE", "random")
    monkeypatch.setenv("ACRN_PYDM_FUZZ_EXAMPLES", "3000")
    monkeypatch.setenv("ACRN_PYDM_FUZZ_CRASHES", str(tmp_path))
    monkeypatch.setenv("ACRN_PYDM_FUZZ_COUNTS", str(tmp_path / "counts.txt"))
    name = "tests/fuzz/test_engine.py::planted"
    target = _engine.fuzz_target(planted, {"fixture_value": "bound"})
    with pytest.raises(AssertionError, match="1 distinct failures"):
        _engine.run(name, target)
    stats = _engine.STATS.pop(name)
    assert stats.inputs == 3000 and len(stats.failures) == 1 and stats.flaky == 0
    (saved,) = tmp_path.glob("test_engine--planted-crash-*.bin")
    assert "inputs=3000" in (tmp_path / "counts.txt").read_text()
    assert not list(tmp_path.glob("*.current"))  # removed after a clean end
    with pytest.raises(ValueError, match="planted bug"):
        target(_engine.read_input(str(saved)))


@given(x=st.integers().filter(lambda v: False))
def never_decodes(x):
    raise AssertionError("random bytes decoded to an input: pick a stricter strategy")


def test_a_target_random_bytes_cannot_feed_is_handed_back(tmp_path, monkeypatch):
    """A target whose strategies reject random bytes is not reported as fuzzed with 0
    inputs: the engine says so, and the caller falls back to hypothesis' own engine."""
    monkeypatch.setenv("ACRN_PYDM_FUZZ_ENGINE", "random")
    monkeypatch.setenv("ACRN_PYDM_FUZZ_EXAMPLES", "100")
    monkeypatch.setenv("ACRN_PYDM_FUZZ_CRASHES", str(tmp_path))
    monkeypatch.setenv("ACRN_PYDM_FUZZ_COUNTS", str(tmp_path / "counts.txt"))
    name = "tests/fuzz/test_engine.py::never_decodes"
    with pytest.raises(_engine.Unfeedable, match="none of 2000 random inputs"):
        _engine.run(name, _engine.fuzz_target(never_decodes, {}))
    stats = _engine.STATS.pop(name)
    assert stats.inputs == 0 and stats.fed == _engine.UNFEEDABLE_AFTER
