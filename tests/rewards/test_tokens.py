"""per_token_rewards: each turn's reward lands on its last sampled token."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from m2rl.rewards.tokens import per_token_rewards


def test_reward_on_last_token_of_each_turn():
    # prompt [0,3), turn 0 sampled [3,6), env reply [6,8), turn 1 sampled [8,10)
    out = per_token_rewards([0.5, -1.0], [(3, 6), (8, 10)], num_tokens=11)
    assert out == [0, 0, 0, 0, 0, 0.5, 0, 0, 0, -1.0, 0]


def test_span_objects_with_start_end_are_accepted():
    from dataclasses import dataclass

    @dataclass
    class Span:
        kind: str
        start: int
        end: int
        turn: int

    assert per_token_rewards([1.0], [Span("sampled", 1, 3, 0)], 4) == [0, 0, 1.0, 0]


def test_loss_mask_moves_reward_to_last_sampled_token():
    mask = [0, 0, 1, 1, 0, 0]  # the span's last two positions are env tokens
    assert per_token_rewards([2.0], [(2, 6)], 6, loss_mask=mask) == [0, 0, 0, 2.0, 0, 0]


@pytest.mark.parametrize(
    "rewards, spans, n, mask, needle",
    [
        ([1.0], [], 4, None, "1 turn rewards for 0 turn spans"),
        ([1.0], [(2, 2)], 4, None, "empty or outside"),
        ([1.0], [(2, 9)], 4, None, "empty or outside"),
        ([1.0, 1.0], [(0, 3), (2, 4)], 4, None, "overlaps"),
        ([1.0], [(0, 2)], 4, [1, 1], "loss_mask has 2 entries"),
        ([1.0], [(0, 2)], 4, [0, 0, 1, 1], "no sampled token"),
        ([1.0], [(0,)], 4, None, "not a"),
    ],
)
def test_bad_inputs_are_clear_errors(rewards, spans, n, mask, needle):
    with pytest.raises(ValueError, match=needle):
        per_token_rewards(rewards, spans, n, loss_mask=mask)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6), st.floats(-2, 2)), max_size=6))
def test_total_is_preserved_and_only_span_ends_are_nonzero(turns):
    spans, rewards, pos = [], [], 0
    for gap, length, r in turns:
        spans.append((pos + gap, pos + gap + length))
        rewards.append(r)
        pos += gap + length
    out = per_token_rewards(rewards, spans, pos + 1)
    assert len(out) == pos + 1
    assert sum(out) == pytest.approx(sum(rewards))
    ends = {e - 1 for _, e in spans}
    assert all(v == 0 for i, v in enumerate(out) if i not in ends)
