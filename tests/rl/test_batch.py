"""collate: per-sequence lists to a right-padded RolloutBatch, with validation."""

from __future__ import annotations

import pytest
import torch
from m2rl.rl.batch import RolloutBatch, collate


def test_collate_pads_right_and_places_advantages_on_loss_tokens():
    batch = collate(
        ids=[[5, 6, 7, 8], [9, 10]],
        loss_masks=[[0, 1, 1, 0], [0, 1]],
        logprobs=[[0.0, -0.5, -0.25, -9.0], [0.0, -1.0]],
        advantages=[1.5, [0.0, -2.0]],
        pad_id=3,
    )
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 3, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]
    assert batch.old_logprobs.tolist() == [[0.0, -0.5, -0.25, 0.0], [0.0, -1.0, 0.0, 0.0]]
    assert batch.advantages.tolist() == [[0.0, 1.5, 1.5, 0.0], [0.0, -2.0, 0.0, 0.0]]
    assert batch.lengths() == [4, 2]


def test_collate_and_validate_reject_bad_input():
    with pytest.raises(ValueError, match="logprobs for 2 tokens"):
        collate([[1, 2]], [[0, 1]], [[0.0]], [1.0])
    with pytest.raises(ValueError, match="advantages"):
        collate([[1, 2]], [[0, 1]], [[0.0, 0.0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        collate([], [], [], [])
    ids = torch.tensor([[1, 2, 3]])
    ones = torch.ones(1, 3)
    with pytest.raises(ValueError, match="right-padded"):
        RolloutBatch(ids, ones, ones, ones, attention_mask=torch.tensor([[1, 0, 1]])).validate()
    with pytest.raises(ValueError, match="padding positions"):
        RolloutBatch(ids, ones, ones, ones, attention_mask=torch.tensor([[1, 1, 0]])).validate()
    with pytest.raises(ValueError, match="integer token ids"):
        RolloutBatch(ids.float(), ones, ones, ones).validate()
