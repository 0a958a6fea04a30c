"""Random guest operations on a vMSI-X-on-MSI capability, its table and PBA (a synthetic
passthrough device with ``N`` vectors at ``SLOT``), and the invariant they must keep:
a vector the guest masked (or the whole function) stays masked on the physical MSI."""

from __future__ import annotations

from hypothesis import strategies as st

SLOT = 5
CAP = 0x50
N = 4

offsets_cfg = st.one_of(st.integers(CAP - 4, CAP + 0x1C), st.just(0x04), st.integers(0, 0xFF))
offsets_bar = st.one_of(st.integers(0, N * 16 + 8), st.integers(0x7F8, 0x810),
                        st.integers(0, 0xFFF))
op = st.one_of(
    st.tuples(st.just("cfg"), offsets_cfg, st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("ctrl"), st.just(CAP + 2), st.just(2),
              st.sampled_from([0, 0x4000, 0x8000, 0xC000, 0xFFFF])),
    st.tuples(st.just("bar"), offsets_bar, st.sampled_from([1, 2, 4, 8]),
              st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("vctrl"), st.integers(0, N - 1), st.just(4), st.integers(0, 1)),
    st.tuples(st.just("read"), offsets_bar, st.sampled_from([1, 2, 4, 8]), st.just(0)),
    st.tuples(st.just("fire"), st.integers(0, N - 1), st.just(0), st.just(0)),
    # what a driver does to get vector k going: enable, program entry k, unmask it
    st.tuples(st.just("linux"), st.integers(0, N - 1), st.just(0), st.integers(0x20, 0xFF)),
)


def check(dev, host, cap_ro) -> None:
    ctrl = dev.cfg.get16(CAP + 2)
    assert ctrl & 0x3FFF == N - 1
    assert bytes(dev.cfg.data[CAP : CAP + 2] + dev.cfg.data[CAP + 4 : CAP + 12]) == cap_ro
    assert dev.cfg.data[CAP + 12 : CAP + 24] == bytes(12)
    phys_mask = host.msi.mask
    for k in range(N):
        _, _, masked = dev.vmsix.entry(k)
        if masked or ctrl & 0x4000 or not ctrl & 0x8000:
            assert phys_mask >> k & 1, f"vector {k} unmasked on the device"
