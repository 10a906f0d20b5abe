"""m2rl.rewards: the per-step info contract (`StepInfo`, `Episode`), reward components as pure functions of
an episode's steps, a `RewardSpec` from configuration, and anti-hacking detectors. Turning per-step rewards
into per-token advantages is the learner's (rl/advantages.py).

Outcome grading that executes tests lives in `m2rl.rewards.grading` (imported on demand: it pulls
in the SWE-bench harness).
"""

from m2rl.rewards.answer import grade_answer
from m2rl.rewards.components import COMPONENTS, DENSE_COMPONENTS, OUTCOME_COMPONENTS
from m2rl.rewards.compute import EpisodeRewards, compute_episode_rewards
from m2rl.rewards.detectors import DETECTORS, DetectorHit
from m2rl.rewards.episode import Episode, EpisodeInfoError, RewardTask, StepInfo, Verification, parse_steps
from m2rl.rewards.spec import DEFAULT_WEIGHTS, RewardSpec, RewardSpecError

__all__ = [
    "COMPONENTS",
    "DEFAULT_WEIGHTS",
    "DENSE_COMPONENTS",
    "DETECTORS",
    "OUTCOME_COMPONENTS",
    "DetectorHit",
    "Episode",
    "EpisodeInfoError",
    "EpisodeRewards",
    "RewardSpec",
    "RewardSpecError",
    "RewardTask",
    "StepInfo",
    "Verification",
    "compute_episode_rewards",
    "grade_answer",
    "parse_steps",
]
