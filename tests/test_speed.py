"""The speed figures every summary prints: the per-round speedup and its interval, the share of the
possible gain realised, and the words for a gain, a slowdown and no measurable difference. Every
expected value is computed by hand in the comment beside it."""
import pytest

from foldship.validators.gates import evaluate_gates
from foldship.validators.speed import Speedup, change_text, realised_share, speed_sentence, speed_summary


@pytest.mark.parametrize("speedup, mac_ratio, share", [
    (1.5, 0.5, 0.5),  # possible 2x: a gain of 1; 0.5 of it realised
    (2.0, 0.25, 1 / 3),  # possible 4x: a gain of 3; 1 of it
    (1.2, 0.8, 0.8),  # possible 1.25x: a gain of 0.25; 0.2 of it
    (1.02, 0.69, 0.02 / (1 / 0.69 - 1)),  # the demo: 0.02 of a possible 0.449
    (0.96, 0.69, -0.04 / (1 / 0.69 - 1)),  # a slowdown realises a negative share
])
def test_realised_share_by_hand(speedup, mac_ratio, share):
    assert realised_share(speedup, mac_ratio) == pytest.approx(share)


def test_no_mac_reduction_has_no_share():
    assert realised_share(1.1, None) is None and realised_share(1.1, 1.0) is None and realised_share(1.1, 1.2) is None


def test_per_round_ratios_give_the_median_and_an_order_statistic_interval():
    # Ratios 10/5, 12/6, 11/5.5, 10/5, 13/6.5 and 12/4: 2, 2, 2, 2, 2, 3.
    speed = Speedup.from_blocks([10, 12, 11, 10, 13, 12], [5, 6, 5.5, 5, 6.5, 4])
    assert (speed.value, speed.low, speed.high, speed.blocks) == pytest.approx((2.0, 2.0, 3.0, 6))
    assert speed.confidence == pytest.approx(1 - 2 ** -5)  # all six on one side of the median: 2 / 2^6
    assert speed.verdict == "faster" and speed.judged == 2.0


def test_an_interval_holding_one_is_no_measurable_difference():
    # Ratios 10/9.5 = 1.053, 10/10.5 = 0.952, 10/10 = 1: median 1.0, interval 0.95..1.05.
    speed = Speedup.from_blocks([10, 10, 10], [9.5, 10.5, 10])
    assert speed.verdict == "no measurable difference" and speed.confidence == 0.75
    assert change_text(speed) == "no measurable difference (0.95-1.05)"
    assert speed_sentence(speed, 64, 0.69) == ("no measurable difference (0.95-1.05) at batch 64 for 0.69x MACs: "
                                               "none of the possible 1.45x shows up")
    # Even a point estimate above 1 is no number while the interval holds 1.0: 1.1, 0.98, 1.05 -> median 1.05.
    assert Speedup.from_blocks([11, 9.8, 10.5], [10, 10, 10]).verdict == "no measurable difference"


def test_a_gain_reads_as_a_gain_with_its_share():
    speed = Speedup(1.5, 1.4, 1.6, 6, 1 - 2 ** -5)
    assert speed_sentence(speed, 64, 0.5) == "1.50x faster (1.40-1.60) at batch 64 for 0.50x MACs: 50 % of the possible gain"
    # 1.02x at 0.69x MACs: 0.02 / 0.449 = 4.5 %, printed 4 %.
    assert speed_sentence(Speedup(1.02, 1.01, 1.04, 6, 0.97), 64, 0.69).endswith(": 4 % of the possible gain")


def test_a_slowdown_reads_as_a_slowdown():
    # 1 / 0.96 = 1.042: 1.04x slower; the interval as slowdowns too: 1 / 0.98 = 1.020 to 1 / 0.93 = 1.075.
    speed = Speedup(0.96, 0.93, 0.98, 6, 0.97)
    assert speed.verdict == "slower" and change_text(speed) == "1.04x slower (1.02-1.08)"
    assert speed_sentence(speed, 64, 0.69) == ("1.04x slower (1.02-1.08) at batch 64 for 0.69x MACs: "
                                               "none of the possible 1.45x shows up")
    summary = speed_summary(speed, "onnxruntime-cpu", 64, 0.69)
    assert summary["verdict"] == "slower" and summary["realised_share"] == pytest.approx(-0.04 / (1 / 0.69 - 1), abs=1e-4)
    assert summary["possible_speedup"] == pytest.approx(1 / 0.69, abs=1e-4) and summary["batch"] == 64


def test_too_few_blocks_give_no_interval_and_say_so_by_omission():
    speed = Speedup.from_blocks([10, 12], [5, 8])  # ratios 2 and 1.5: median 1.75
    assert (speed.value, speed.low, speed.high, speed.confidence) == (1.75, None, None, None)
    assert speed.judged == 1.75 and change_text(speed) == "1.75x faster"
    with pytest.raises(ValueError, match="same number of blocks"):
        Speedup.from_blocks([1, 2, 3], [1, 2])


def test_min_speedup_judges_the_intervals_lower_end():
    # Point 1.3 but the rounds reach down to 1.05: a 1.1 gate must fail, a 1.0 gate pass.
    speed = Speedup(1.3, 1.05, 1.4, 6, 0.97)
    failing, passing = (evaluate_gates({"speedup": speed.judged}, {"min_speedup": limit})[0] for limit in (1.1, 1.0))
    assert (failing.passed, failing.value, passing.passed) == (False, 1.05, True)


def test_a_report_entry_reads_back_as_the_same_speedup():
    speed = Speedup(1.25, 1.125, 1.5, 3, 0.75)  # values exact in the report's 4 decimals
    entry = speed_summary(speed, "onnxruntime-cpu", 16, 0.5)
    assert Speedup.from_dict(entry) == speed and entry["verdict"] == "faster" and entry["realised_share"] == 0.25


def test_the_sentence_reads_as_text_re_rendered_from_the_stored_entry():
    """An interval end of 1.05504 prints 1.06, but the report stores 1.055 (4 decimals), which prints
    1.05: the sentence must be worded from what is stored, as sweep tables re-render it."""
    entry = speed_summary(Speedup(1.0871, 1.05504, 1.0912, 6, 0.97), "onnxruntime-cpu", 16, 0.7)
    assert entry["low"] == 1.055
    assert entry["sentence"].startswith(f"{change_text(Speedup.from_dict(entry))} at batch 16")
    assert "(1.05-1.09)" in entry["sentence"]
