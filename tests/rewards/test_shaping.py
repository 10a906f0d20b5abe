"""Potential-based shaping (Ng et al. 1999) on tabular MDPs solved by value iteration:
it leaves the optimal policy unchanged, while naive dense bonuses can change it."""

import numpy as np
import pytest
from m2rl.rewards.shaping import potential_shaping, shape_transition_rewards, value_iteration


def greedy_policy(q_SA, terminal_S):
    return [int(np.argmax(q)) for s, q in enumerate(q_SA) if not terminal_S[s]]


def tool_agent_mdp():
    """States 0..3 = steps of progress on a task; 3 = solved (terminal). Action 0 works on the task
    (s -> s+1), action 1 makes an easy valid tool call that achieves nothing (s -> s). Solving pays 1."""
    n_states, goal = 4, 3
    P = np.zeros((n_states, 2, n_states))
    R = np.zeros((n_states, 2, n_states))
    for s in range(n_states):
        P[s, 0, min(s + 1, goal)] = 1.0
        P[s, 1, s] = 1.0
    R[goal - 1, 0, goal] = 1.0
    terminal = np.array([False, False, False, True])
    return P, R, terminal


def test_naive_dense_bonus_changes_the_optimal_policy():
    P, R, terminal = tool_agent_mdp()
    gamma = 0.9
    q, _ = value_iteration(P, R, gamma, terminal)
    assert greedy_policy(q, terminal) == [0, 0, 0]  # outcome-only: go solve the task

    naive = R.copy()
    naive[:, 1, :] += 0.2  # "+reward per valid tool call", paid on the looping action
    q_naive, _ = value_iteration(P, naive, gamma, terminal)
    assert greedy_policy(q_naive, terminal) == [
        1,
        1,
        1,
    ]  # farming the bonus beats solving (0.2 / 0.1 = 2 > 1)


def test_potential_shaping_keeps_the_optimal_policy_on_the_same_mdp():
    P, R, terminal = tool_agent_mdp()
    gamma = 0.9
    phi = np.array([0.0, 0.2, 0.4, 5.0])  # even a large potential on the terminal state is ignored
    shaped = shape_transition_rewards(R, phi, gamma, terminal)
    q_shaped, _ = value_iteration(P, shaped, gamma, terminal)
    assert greedy_policy(q_shaped, terminal) == [0, 0, 0]


@pytest.mark.parametrize("seed", range(20))
def test_potential_shaping_shifts_q_by_minus_phi_on_random_mdps(seed):
    rng = np.random.default_rng(seed)
    n_states, n_actions = 7, 3
    gamma = float(rng.choice([0.8, 0.95]))
    P = rng.dirichlet(np.full(n_states, 0.5), size=(n_states, n_actions))
    R = rng.normal(size=(n_states, n_actions, n_states))
    terminal = np.zeros(n_states, dtype=bool)
    terminal[rng.choice(n_states, size=2, replace=False)] = True
    phi = rng.normal(scale=3.0, size=n_states)

    q, _ = value_iteration(P, R, gamma, terminal)
    q_shaped, _ = value_iteration(P, shape_transition_rewards(R, phi, gamma, terminal), gamma, terminal)
    live = ~terminal
    phi_live = np.where(terminal, 0.0, phi)
    # Ng et al., Theorem 1: Q'(s, a) = Q(s, a) - Phi(s), hence the same argmax everywhere.
    np.testing.assert_allclose(q_shaped[live], (q - phi_live[:, None])[live], atol=1e-7)
    assert greedy_policy(q_shaped, terminal) == greedy_policy(q, terminal)


def test_potential_shaping_sequence():
    assert potential_shaping([0.0, 1.0, 3.0, 0.0], gamma=1.0) == [1.0, 2.0, -3.0]
    assert potential_shaping([1.0, 2.0, 0.0], gamma=0.5) == [0.0, -2.0]
    with pytest.raises(ValueError, match="gamma"):
        potential_shaping([0.0, 1.0], gamma=0.0)
