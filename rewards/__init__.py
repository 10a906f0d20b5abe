"""m2rl.rewards: reward components as pure functions of an episode's step infos, a `RewardSpec`
from configuration, anti-hacking detectors, and per-token reward placement.

Outcome grading that executes tests lives in `m2rl.rewards.grading` (imported on demand: it pulls
in the SWE-bench harness).
"""

from m2rl.rewards.answer import grade_answer
from m2rl.rewards.components import COMPONENTS, DENSE_COMPONENTS, OUTCOME_COMPONENTS
from m2rl.rewards.compute import EpisodeRewards, compute_episode_rewards
from m2rl.rewards.detectors import DETECTORS, DetectorHit
from m2rl.rewards.episode import Episode, EpisodeInfoError, RewardTask, StepInfo, parse_steps
from m2rl.rewards.spec import DEFAULT_WEIGHTS, RewardSpec, RewardSpecError
from m2rl.rewards.tokens import per_token_rewards

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
    "compute_episode_rewards",
    "grade_answer",
    "parse_steps",
    "per_token_rewards",
]
