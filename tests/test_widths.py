"""The width rule k = max(int(n(1-r)), 1): method.md section 2, exactly."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldship.compress.widths import check_ratio, check_round_to, kept_width, ratio_for_width, width_rule
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


# /proc/cpuinfo excerpts of three machines (flags trimmed to those that matter and a few around them).
AVX512_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
AVX2_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
NEON_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp
"""


@pytest.mark.parametrize("cpuinfo, multiple, why", [(AVX512_CPUINFO, 16, "AVX-512"), (AVX2_CPUINFO, 8, "AVX2"),
                                                    (NEON_CPUINFO, 8, "NEON"), ("", 8, "no AVX-512")])
def test_auto_picks_this_cpus_onnxruntime_block(cpuinfo, multiple, why):
    rule = width_rule("auto", cpuinfo=cpuinfo)
    assert rule.round_to == multiple and why in rule.rule and rule.requested == "auto"


def test_auto_picks_8_for_tensorrt_whatever_the_cpu():
    rule = width_rule("auto", target="tensorrt", cpuinfo=AVX512_CPUINFO)
    assert rule.round_to == 8 and "TensorRT" in rule.rule


def test_the_default_is_auto_only_where_a_budget_tensorrt_or_a_gpu_is_involved():
    assert width_rule(None, cpuinfo=AVX512_CPUINFO).round_to == 1  # a plain ratio keeps the papers' widths
    assert width_rule(None, budget=True, cpuinfo=AVX512_CPUINFO).round_to == 16
    assert width_rule(None, budget=True, cpuinfo=AVX2_CPUINFO).round_to == 8
    assert width_rule(None, target="tensorrt", cpuinfo=AVX512_CPUINFO).round_to == 8
    rule = width_rule(None, gpu_backends=True, cpuinfo=AVX2_CPUINFO)
    assert rule.round_to == 8 and "default with a GPU backend" in rule.rule
    # An explicit number wins everywhere, 1 included.
    assert width_rule(1, budget=True, target="tensorrt", cpuinfo=AVX512_CPUINFO).round_to == 1
    assert width_rule(32, cpuinfo=AVX2_CPUINFO).as_dict() == {"round_to": 32, "rule": "as given", "requested": 32}


def test_groups_no_wider_than_the_multiple_stay_whole():
    # Any width under 16 would be padded back to 16 by ONNX Runtime on AVX-512: keep 16 whole.
    assert kept_width(16, 0.5, 16) == 16 and kept_width(12, 0.5, 16) == 12 and kept_width(8, 0.9, 8) == 8
    assert kept_width(32, 0.5, 16) == 16 and kept_width(64, 0.5, 16) == 32
    assert kept_width(32, 0.9, 16) == 16  # int(3.2) = 3, rounded up to one block
    assert kept_width(40, 0.3, 16) == 16  # int(28) rounded down to 16
    # A group the ratio leaves whole is not narrowed to a multiple: 24 stays 24 under 16.
    assert kept_width(24, 0.0, 16) == 24 and kept_width(24, ratio_for_width(24, 24), 16) == 24


def test_round_to_auto_is_accepted_and_nonsense_refused():
    check_round_to("auto")
    with pytest.raises(BadInput, match="round_to must be a whole number >= 1"):
        check_round_to("fast")
