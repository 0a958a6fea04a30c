"""The adversarial guest suite on KVM (tests/support/adversarial_kvm.py): a guest program breaks
the virtio driver "MUST"s against virtio-blk (legacy, modern), virtio-rnd and
virtio-console; every case must end PASS or REJECT, the other devices keep working, and
the host logs no handler error. ``pytest -s`` prints the verdict table."""

from __future__ import annotations

import pytest

from devicemodel.guestkit.kvm_programs import kvm_skip_reason
from tests.support.adversarial import FAIL, PASS, REJECT, WEDGED, table
from tests.support.adversarial_kvm import EXPECTED, parse, run_kvm_suite

SKIP = kvm_skip_reason()
needs_kvm = pytest.mark.skipif(SKIP is not None, reason=f"no usable KVM: {SKIP}")


@needs_kvm
async def test_every_hostile_case_ends_pass_or_reject_on_kvm(tmp_path) -> None:
    suite = await run_kvm_suite(tmp_path, timeout=45.0)
    print()
    if suite.results:
        print(table(suite.results))
    print(f"guest ran {suite.seconds:.1f} s")
    assert not suite.problems, "\n".join(suite.problems) + "\n" + suite.serial[-2000:]
    assert len(suite.results) == len(EXPECTED)
    assert {r.verdict for r in suite.results} == {PASS, REJECT}
    # a malformed ring is never completed as if it were fine: refused on every device
    rings = [r for r in suite.results if r.case.startswith(
        ("head index", "descriptor chain loops", "buffer address outside", "indirect table of"))]
    assert len(rings) == 16 and all(r.verdict == REJECT for r in rings)


def _line(dev: str, name: str, verdict: str, code: str = "") -> str:
    return f"case {dev}/{name} {verdict}{' 0x' + code if code else ''}\n"


def test_the_parser_finds_missing_unexpected_and_bad_cases() -> None:
    """Without KVM too: what the host makes of the guest's lines."""
    good = "".join(_line(dev, name, PASS) for dev, name in EXPECTED)
    results, problems = parse(good)
    assert problems == [] and len(results) == len(EXPECTED)

    (d0, n0), (d1, n1) = EXPECTED[0], EXPECTED[1]
    bad = good.replace(_line(d0, n0, PASS), _line(d0, n0, WEDGED, "92"))
    bad = bad.replace(_line(d1, n1, PASS), _line(d1, n1, FAIL, "40"))
    bad = bad.replace(_line(*EXPECTED[-1], PASS), "")
    bad += _line("rnd-modern", "blk_beyond_disk", PASS)
    _, problems = parse(bad)
    text = "\n".join(problems)
    assert "WEDGED rnd-modern stopped working (request not completed)" in text
    assert "FAIL a malformed chain was completed" in text
    assert f"case {EXPECTED[-1][0]}/{EXPECTED[-1][1]} missing" in text
    assert "unexpected case rnd-modern/blk_beyond_disk" in text
    assert len(problems) == 4
