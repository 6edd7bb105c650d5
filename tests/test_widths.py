"""The width rule k = max(int(n(1-r)), 1): method.md section 2, exactly."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldship.compress.widths import check_ratio, check_round_to, kept_width, ratio_for_width
from foldship.errors import BadInput

PAPER_TABLE = {
    16: {0.1: 14, 0.3: 11, 0.5: 8, 0.7: 4, 0.9: 1},
    32: {0.1: 28, 0.3: 22, 0.5: 16, 0.7: 9, 0.9: 3},
    64: {0.1: 57, 0.3: 44, 0.5: 32, 0.7: 19, 0.9: 6},
    128: {0.1: 115, 0.3: 89, 0.5: 64, 0.7: 38, 0.9: 12},
    256: {0.1: 230, 0.3: 179, 0.5: 128, 0.7: 76, 0.9: 25},
    512: {0.1: 460, 0.3: 358, 0.5: 256, 0.7: 153, 0.9: 51},
    1024: {0.1: 921, 0.3: 716, 0.5: 512, 0.7: 307, 0.9: 102},
    3072: {0.1: 2764, 0.3: 2150, 0.5: 1536},
}


@pytest.mark.parametrize("n", sorted(PAPER_TABLE))
def test_width_map_matches_paper(n):
    assert {r: kept_width(n, r) for r in PAPER_TABLE[n]} == PAPER_TABLE[n]


def test_float_traps():
    assert kept_width(64, 0.3) == 44  # 64 * 0.7 = 44.8, floored
    assert kept_width(64, 0.9) == 6  # 1 - 0.9 = 0.0999...
    assert kept_width(3, 0.9) == 1  # never zero


@given(n=st.integers(1, 4096), r=st.floats(0.001, 0.999), m=st.sampled_from([1, 2, 8, 16]))
def test_width_bounds(n, r, m):
    k = kept_width(n, r, m)
    assert 1 <= k <= n
    if m > 1 and n > m:
        assert k % m == 0


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), "abc"])
def test_nonsense_ratio_refused(bad):
    with pytest.raises(BadInput, match="ratio"):
        check_ratio(bad)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_nonsense_round_to_refused(bad):
    with pytest.raises(BadInput, match="round_to must be a whole number >= 1"):
        check_round_to(bad)
    check_round_to(None), check_round_to(1), check_round_to(16)  # None: the caller's default


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 5000), data=st.data())
def test_ratio_for_width_gives_exactly_that_width(n, data):
    width = data.draw(st.integers(1, n))
    ratio = ratio_for_width(n, width)
    assert kept_width(n, ratio) == width if width < n else ratio == 0.0
