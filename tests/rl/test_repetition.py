"""The M1 early-stop rule: N consecutive tokens each with probability > p."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.rl.repetition import RepetitionDetector, RepetitionStopConfig, repetition_cut_index


def brute_force_cut(probs, window, threshold):
    for end in range(window, len(probs) + 1):
        if all(p > threshold for p in probs[end - window : end]):
            return end
    return None


def test_defaults_are_m1():
    assert RepetitionStopConfig().window == 3000 and RepetitionStopConfig().threshold == 0.99


def test_hand_values():
    probs = [0.999, 0.999, 0.5, 0.995, 0.999, 0.991, 0.2]
    assert repetition_cut_index(probs, window=3, threshold=0.99) == 6  # keep tokens[:6]
    assert repetition_cut_index(probs, window=4, threshold=0.99) is None
    assert repetition_cut_index([0.99] * 10, window=3, threshold=0.99) is None  # strictly greater
    logps = [math.log(p) for p in probs]
    assert repetition_cut_index(logps, window=3, threshold=0.99, logprobs=True) == 6
    assert repetition_cut_index([1.0] * 3000) == 3000
    assert repetition_cut_index([1.0] * 2999 + [0.5] + [1.0] * 10) is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.2, 0.95, 0.991, 1.0]), max_size=40), st.integers(1, 6))
def test_pure_and_streaming_agree_with_brute_force(probs, window):
    expected = brute_force_cut(probs, window, 0.99)
    assert repetition_cut_index(probs, window=window, threshold=0.99) == expected
    detector = RepetitionDetector(RepetitionStopConfig(window=window, threshold=0.99))
    stopped_at = None
    for i, p in enumerate(probs):
        if detector.update(p):
            stopped_at = i + 1
            break
    assert stopped_at == expected


def test_detector_reset_disabled_and_bad_input():
    det = RepetitionDetector(RepetitionStopConfig(window=2, threshold=0.9))
    assert not det.update(0.95) and det.update_logprob(math.log(0.95))
    det.reset()
    assert not det.update(0.95)
    off = RepetitionDetector(RepetitionStopConfig(window=1, enabled=False))
    assert not off.update(1.0)
    with pytest.raises(ValueError, match="probability"):
        det.update(1.5)
    with pytest.raises(ValueError, match="window"):
        RepetitionStopConfig(window=0)
