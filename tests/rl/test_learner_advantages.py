"""What the trainer hands the learner: advantages per group, `rollout.advantage: episode | turn`, failed
episodes left out of the statistics and the curriculum.

Oracle for `episode` mode: the trainer's computation before groups were explicit, copied verbatim below
(rewards viewed as [tasks, G], matched back by `i % group_size`); the new code must give the same batch
bit for bit. The episodes are ScoredTrajectory records with hand-made trajectories (no env, no model).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.agent.trajectory import Trajectory
from m2rl.rewards import Episode
from m2rl.rl.advantages import dynamic_sampling_keep, group_advantages, group_baselines
from m2rl.rl.curriculum import DifficultyCurriculum
from m2rl.rl.learner import Learner, LearnerConfig
from m2rl.rl.rollout import ScoredTrajectory, failed_episode
from m2rl.rl.trainer import episodes_to_batch, learner_advantages, record_attempts
from rl_test_doubles import TinyCausalLM

PAD = 0


def scored(task: int, turn_rewards: list[float], rng: random.Random, group: int | None = None) -> ScoredTrajectory:
    """An episode of len(turn_rewards) turns: prompt, then per turn sampled ids and (between turns) env ids."""
    t = Trajectory()
    t.append_prompt([rng.randrange(1, 13) for _ in range(3)])
    for k, reward in enumerate(turn_rewards):
        ids = [rng.randrange(1, 13) for _ in range(rng.randrange(1, 4))]
        t.append_sampled(ids, [-rng.random() for _ in ids], 0)
        t.rewards.append(reward)
        if k < len(turn_rewards) - 1:
            t.append_env([rng.randrange(1, 13) for _ in range(2)])
    return ScoredTrajectory(f"t/{task}", task if group is None else group, t, Episode(steps=()), "terminated")


def old_batch(episodes: list[ScoredTrajectory], group_size: int, scale_by_std: bool, dynamic_sampling: bool):
    """The trainer's advantage code before this change, verbatim (train_step, commit 0ef7b81)."""
    n_tasks = len(episodes) // group_size
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32).view(n_tasks, group_size)
    keep = dynamic_sampling_keep(rewards) if dynamic_sampling else torch.ones(n_tasks, dtype=torch.bool)
    advantages = group_advantages(rewards, scale_by_std=scale_by_std)
    kept = [(e, float(advantages[e.group, i % group_size])) for i, e in enumerate(episodes) if bool(keep[e.group])]
    return episodes_to_batch([e for e, _ in kept], [a for _, a in kept], pad_id=PAD) if kept else None, kept


def new_batch(episodes: list[ScoredTrajectory], mode: str, scale_by_std: bool = True, dynamic_sampling: bool = True):
    kept = learner_advantages(episodes, mode, scale_by_std, dynamic_sampling)
    return episodes_to_batch([e for e, _ in kept], [a for _, a in kept], pad_id=PAD) if kept else None, kept


# Rewards like the main job's: a 0/1 outcome on the last turn plus small dense terms, so groups have ties,
# all-equal groups (dropped by dynamic sampling) and distinct values.
TURN_REWARD = st.sampled_from([0.0, 0.05, -0.05, 0.1, 1.0, 1.05])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8), st.integers(1, 5), st.booleans(), st.booleans(), st.integers(0, 2**16),
    st.lists(st.lists(TURN_REWARD, min_size=1, max_size=3), min_size=40, max_size=40),
)
def test_episode_mode_is_the_old_computation_bit_for_bit(group_size, n_tasks, scale_by_std, dynamic_sampling,
                                                          seed, turn_rewards):
    rng = random.Random(seed)
    episodes = [scored(task, turn_rewards[(task * group_size + i) % 40], rng)
                for task in range(n_tasks) for i in range(group_size)]
    old, old_kept = old_batch(episodes, group_size, scale_by_std, dynamic_sampling)
    new, new_kept = new_batch(episodes, "episode", scale_by_std, dynamic_sampling)
    assert [e for e, _ in new_kept] == [e for e, _ in old_kept]
    assert [a for _, a in new_kept] == [a for _, a in old_kept]  # floats compared exactly
    if old is None:
        assert new is None
        return
    for name in ("input_ids", "loss_mask", "old_logprobs", "advantages", "attention_mask"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name


def dense_episodes() -> list[ScoredTrajectory]:
    """Two groups whose episodes earn dense rewards on different turns but end with similar returns."""
    rng = random.Random(0)
    rewards = [
        [[0.05, 0.05, 1.0], [0.0, 0.0, 1.1], [0.05, 0.0, 0.0], [0.0, 0.05, 0.0]],
        [[-0.05, 1.0], [0.1, 0.0], [0.0, 1.05], [0.05, 0.05]],
    ]
    return [scored(task, r, rng) for task, group in enumerate(rewards) for r in group]


def test_turn_mode_gives_each_turn_its_return_to_go():
    episodes = dense_episodes()
    _, kept = new_batch(episodes, "turn")
    baselines = group_baselines([e.reward for e in episodes], [e.group for e in episodes])
    episode, advantages = kept[0]
    baseline = baselines[episode.group]
    spans = episode.trajectory.sampled_spans()
    returns_to_go = [0.05 + 0.05 + 1.0, 0.05 + 1.0, 1.0]
    for span, ret in zip(spans, returns_to_go):
        expected = (ret - baseline.mean) / baseline.scale
        assert advantages[span.start:span.end] == pytest.approx([expected] * (span.end - span.start), abs=1e-6)
    sampled = {i for s in spans for i in range(s.start, s.end)}
    assert all(a == 0.0 for i, a in enumerate(advantages) if i not in sampled)  # prompt and env tokens


def test_the_two_modes_give_different_advantages_and_updates():
    episodes = dense_episodes()
    by_mode = {mode: new_batch(episodes, mode)[0] for mode in ("episode", "turn")}
    assert torch.equal(by_mode["episode"].input_ids, by_mode["turn"].input_ids)
    assert not torch.allclose(by_mode["episode"].advantages, by_mode["turn"].advantages)
    torch.manual_seed(0)
    base = TinyCausalLM()
    weights = {}
    for mode, batch in by_mode.items():
        model = copy.deepcopy(base)
        Learner(model, LearnerConfig(lr=1e-2, shuffle=False)).update(batch)
        weights[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.allclose(weights["episode"], weights["turn"])


def test_with_outcome_only_rewards_the_modes_agree():
    rng = random.Random(1)
    episodes = [scored(task, [0.0] * (k % 3) + [float((task + k) % 2)], rng) for task in range(3) for k in range(4)]
    (episode_batch, _), (turn_batch, _) = new_batch(episodes, "episode"), new_batch(episodes, "turn")
    torch.testing.assert_close(turn_batch.advantages, episode_batch.advantages)


def test_groups_are_the_episodes_own_not_their_position():
    """Before: advantages were matched to episodes by `i % group_size`, so a batch whose episodes were not
    laid out task by task, G at a time, got other episodes' advantages."""
    rng = random.Random(2)
    episodes = [scored(0, [1.0], rng), scored(1, [0.0], rng), scored(0, [0.0], rng), scored(1, [1.0], rng)]
    _, kept = new_batch(episodes, "episode")
    advantages = {id(e): a for e, a in kept}
    assert advantages[id(episodes[0])] > 0 > advantages[id(episodes[2])]  # task 0: 1.0 beat 0.0
    assert advantages[id(episodes[3])] > 0 > advantages[id(episodes[1])]  # task 1: 1.0 beat 0.0


def test_a_failed_episode_is_in_no_group_statistics():
    """Before: a crashed episode's reward 0 entered its group's mean and std and kept an all-solved group
    alive under dynamic sampling, training the others on a crash."""
    rng = random.Random(3)
    solved = [scored(0, [1.0], rng) for _ in range(3)]
    crashed = failed_episode("t/0", 0, "SandboxError: reset failed", eos_id=PAD)
    _, kept = new_batch([*solved, crashed], "episode")
    assert kept == []  # the three that ran all solved it: no signal, the group is dropped
    mixed = [scored(1, [1.0], rng), scored(1, [0.0], rng), failed_episode("t/1", 1, "boom", eos_id=PAD)]
    _, kept = new_batch(mixed, "episode")
    assert [e for e, _ in kept] == mixed[:2]
    expected = group_advantages(torch.tensor([[1.0, 0.0]]))[0].tolist()
    assert [a for _, a in kept] == pytest.approx(expected)


def test_the_curriculum_counts_no_crash_as_an_attempt():
    rng = random.Random(4)
    curriculum = DifficultyCurriculum(["t/0"])
    record_attempts(curriculum, [scored(0, [1.0], rng), failed_episode("t/0", 0, "boom", eos_id=PAD)])
    assert curriculum.raw_attempts["t/0"] == 1 and curriculum.successes["t/0"] == 0.0  # not resolved: no steps
