"""Potential-based reward shaping (Ng, Harada & Russell, 1999).

Adding F(s, a, s') = gamma * Phi(s') - Phi(s) to the reward leaves the optimal policy of every MDP
unchanged, for any potential Phi over states, provided Phi(terminal) = 0 in episodic tasks: along
any trajectory the shaping terms telescope to -Phi(s_0), a constant no policy can influence.
Naive dense bonuses lack that guarantee (an agent can loop on a bonus forever).

For an LLM agent the state is the whole transcript, so any function of the episode so far is a
valid potential; rewards/compute.py uses the weighted cumulative dense components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def potential_shaping(potentials: Sequence[float], gamma: float) -> list[float]:
    """potentials = [Phi(s_0), ..., Phi(s_T)] over the T+1 states of a T-step episode ->
    [F_0, ..., F_{T-1}] with F_t = gamma * Phi(s_{t+1}) - Phi(s_t).
    Pass Phi(s_T) = 0 when s_T is terminal, as the invariance theorem requires."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"potential_shaping: gamma must be in (0, 1], got {gamma}")
    return [gamma * potentials[t + 1] - potentials[t] for t in range(len(potentials) - 1)]


def shape_transition_rewards(
    rewards_SAS: np.ndarray, potential_S: np.ndarray, gamma: float, terminal_S: np.ndarray | None = None
) -> np.ndarray:
    """Tabular form: R'(s, a, s') = R(s, a, s') + gamma * Phi(s') - Phi(s), with Phi = 0 on terminal
    states. rewards_SAS: [S, A, S]; potential_S: [S]; terminal_S: [S] bool."""
    phi = np.asarray(potential_S, dtype=np.float64).copy()
    if terminal_S is not None:
        phi[np.asarray(terminal_S, dtype=bool)] = 0.0
    return rewards_SAS + gamma * phi[None, None, :] - phi[:, None, None]


def value_iteration(
    transitions_SAS: np.ndarray,
    rewards_SAS: np.ndarray,
    gamma: float,
    terminal_S: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iters: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal Q[S, A] and V[S] of a tabular MDP. transitions_SAS[s, a, s'] = P(s' | s, a);
    terminal states are absorbing with value 0."""
    n_states = transitions_SAS.shape[0]
    term = np.zeros(n_states, dtype=bool) if terminal_S is None else np.asarray(terminal_S, dtype=bool)
    expected_r_SA = (transitions_SAS * rewards_SAS).sum(axis=2)
    v_S = np.zeros(n_states)
    for _ in range(max_iters):
        q_SA = expected_r_SA + gamma * transitions_SAS @ np.where(term, 0.0, v_S)
        new_v = np.where(term, 0.0, q_SA.max(axis=1))
        if np.max(np.abs(new_v - v_S)) < tol:
            v_S = new_v
            break
        v_S = new_v
    q_SA = expected_r_SA + gamma * transitions_SAS @ np.where(term, 0.0, v_S)
    return q_SA, v_S
