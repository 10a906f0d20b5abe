"""Advantages, dynamic sampling, dense turn returns and the overlong penalty against hand values and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.rl.advantages import (
    OverlongPenaltyConfig,
    broadcast_to_tokens,
    dynamic_sampling_keep,
    group_advantages,
    group_baselines,
    overlong_penalty,
    turn_returns_to_tokens,
    turn_rewards_to_go,
)


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 5.0]], dtype=torch.float64)
    adv = group_advantages(rewards, eps=0.0)
    std0 = np.std([1, 0, 0, 1], ddof=1)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / std0)
    centred = group_advantages(rewards, scale_by_std=False)
    torch.testing.assert_close(centred[1], torch.tensor([-0.75, -0.75, -0.75, 2.25], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10), min_size=3, max_size=3), min_size=1, max_size=5), st.booleans())
def test_group_advantages_match_numpy(rows, unbiased):
    rewards = np.array(rows)
    expected = (rewards - rewards.mean(1, keepdims=True)) / (
        rewards.std(1, ddof=int(unbiased), keepdims=True) + 1e-6
    )
    got = group_advantages(torch.tensor(rewards), unbiased=unbiased).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_equal_rewards_give_zero_advantage_and_single_sample_groups():
    assert torch.all(group_advantages(torch.ones(2, 4)) == 0)
    assert torch.all(group_advantages(torch.tensor([[3.0], [1.0]])) == 0)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.ones(4))


def test_ragged_groups_match_tensor_version():
    rewards = [1.0, 0.0, 3.0, 1.0, 1.0, 0.0, 2.0, 5.0]
    ids = ["a", "a", "b", "a", "b", "c", "c", "d"]
    baselines = group_baselines(rewards, ids)
    got = [float(baselines[g].advantages(torch.tensor([r]))[0]) for r, g in zip(rewards, ids)]
    a = group_advantages(torch.tensor([[1.0, 0.0, 1.0]]))[0].tolist()
    b = group_advantages(torch.tensor([[3.0, 1.0]]))[0].tolist()
    c = group_advantages(torch.tensor([[0.0, 2.0]]))[0].tolist()
    assert got == [a[0], a[1], b[0], a[2], b[1], c[0], c[1], 0.0]  # float32 both ways: exactly equal
    assert [baselines[g].has_signal for g in "abcd"] == [True, True, True, False]
    with pytest.raises(ValueError, match="group ids"):
        group_baselines([1.0], ["a", "b"])


def test_uncounted_members_are_in_no_baseline():
    baselines = group_baselines([1.0, 0.0, 0.0, 5.0], ["a", "a", "a", "b"], counted=[True, True, False, False])
    assert set(baselines) == {"a"}  # b has no counted member
    assert baselines["a"].mean == 0.5 and baselines["a"].has_signal
    unscaled = group_baselines([1.0, 0.0], ["a", "a"], scale_by_std=False)["a"]
    assert unscaled.advantages(torch.tensor([1.0, 0.0])).tolist() == [0.5, -0.5]


def test_dynamic_sampling_drops_all_equal_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.50001]])
    assert dynamic_sampling_keep(rewards).tolist() == [False, True, False, True]


def test_reward_to_go_and_token_broadcast():
    assert turn_rewards_to_go([1.0, 0.0, 2.0], gamma=0.5) == pytest.approx([1.5, 1.0, 2.0])
    assert turn_rewards_to_go([1.0, 0.0, 2.0]) == pytest.approx([3.0, 2.0, 2.0])
    # tokens: prompt 0-2, turn0 3-4, env 5-6, turn1 7-9
    out = turn_returns_to_tokens([1.0, 2.0], [(3, 5), (7, 10)], 11, gamma=0.9)
    expected = [0, 0, 0, 2.8, 2.8, 0, 0, 2.0, 2.0, 2.0, 0]
    assert out.tolist() == pytest.approx(expected)
    mask = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0])
    masked = turn_returns_to_tokens([1.0, 2.0], [(3, 5), (7, 10)], 11, gamma=0.9, loss_mask=mask)
    assert masked.tolist() == pytest.approx([0, 0, 0, 2.8, 2.8, 0, 0, 2.0, 0, 2.0, 0])
    with pytest.raises(ValueError, match="outside"):
        turn_returns_to_tokens([1.0], [(3, 20)], 11)
    with pytest.raises(ValueError, match="overlaps"):
        turn_returns_to_tokens([1.0, 1.0], [(3, 6), (5, 8)], 11)
    with pytest.raises(ValueError, match="gamma"):
        turn_rewards_to_go([1.0], gamma=1.5)


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert out.tolist() == [[0.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]


def test_overlong_penalty_dapo_formula():
    cfg = OverlongPenaltyConfig(max_length=20, cache_length=4)
    # no penalty up to 16, linear (16 - L)/4 on (16, 20], -1 beyond
    assert [overlong_penalty(n, cfg) for n in (0, 16, 17, 18, 20, 21, 100)] == pytest.approx(
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    )
    assert overlong_penalty(19, OverlongPenaltyConfig(20, 4, penalty=0.5)) == pytest.approx(-0.375)
    assert overlong_penalty(100, OverlongPenaltyConfig(20, 4, enabled=False)) == 0.0
    with pytest.raises(ValueError, match="cache_length"):
        OverlongPenaltyConfig(max_length=10, cache_length=11)
