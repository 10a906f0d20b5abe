"""The synchronous training loop: rollouts -> rewards -> advantages -> updates -> weight sync -> eval.

    for step:
        tasks   = curriculum.sample(batch_size(step) / G)            # difficulty curriculum, warm-up
        groups  = G episodes per task from the policy on the env      # token-exact trajectories
        A       = group-relative advantages, per episode or per turn  # dynamic sampling drops flat groups
        learner.update(batch)                                         # CISPO (or a baseline) on sampled tokens
        backend.push(learner weights)                                 # weight sync, version + 1, parity probe
        every k steps: held-out success, checkpoint, curve

The generator and the learner hold separate copies of the weights, as they would on separate devices,
so the generator-vs-learner log-prob gap and the truncated-IS correction measure something real. Which
generator (in-process, a vLLM server the run launches, any OpenAI-compatible server) and how weights
reach it is `policy.*` (rl/weight_sync.py); every sync is probed for parity (rl/parity.py). A generator
that dies or fails its probe ends the run with its metrics and a checkpoint of the last completed step.

The whole configuration is checked (rl/preflight.py) before anything is built, and the run directory is
made last, so a mistake leaves nothing behind. A run name belongs to one run: `resume=true` continues it
from its newest readable checkpoint. An interrupt (SIGINT/SIGTERM, see rl/interrupts.py) stops between
two steps' updates: the envs and their sandboxes are closed and the last completed step is checkpointed.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import yaml

from m2rl.agent.loop import LoopConfig, TextEnv
from m2rl.agent.policy import SamplingParams
from m2rl.config import ConfigError, changed_settings, read_yaml, to_dict
from m2rl.rewards import RewardSpec
from m2rl.rl.advantages import AdvantageMode, GroupBaseline, group_baselines, turn_returns_to_tokens
from m2rl.rl.batch import RolloutBatch, collate
from m2rl.rl.checkpoint import (
    CHECKPOINTS_DIR,
    EXPORT_DIR,
    load_latest_checkpoint,
    publish_export,
    save_checkpoint,
)
from m2rl.rl.curriculum import CurriculumConfig, DifficultyCurriculum
from m2rl.rl.curves import plot_training_curve
from m2rl.rl.distributed import DistributedConfig, init_distributed
from m2rl.rl.interrupts import TrainingInterrupted, deferred_interrupts, interrupts_ignored, run_async
from m2rl.rl.learner import LearnerConfig
from m2rl.rl.learner_group import LearnerGroup
from m2rl.rl.pipeline import StageConfig
from m2rl.rl.preflight import check_config, resolve_init
from m2rl.rl.groups import ScoredGroup
from m2rl.rl.ray_backend import RayConfig
from m2rl.rl.rollout import EpisodeRunner, RolloutError, ScoredTrajectory, rollout_metrics
from m2rl.rl.schedules import BatchSizeWarmup, ContextLengthSchedule
from m2rl.rl.trajectory_samples import trajectory_sample, write_sample_report
from m2rl.rl.weight_sync import (
    GENERATOR_FAILURES,
    PolicyBackend,
    PolicySection,
    SyncRejected,
    SyncReport,
    build_backend,
)
from m2rl.runs import LoggingConfig, Run, atomic_write, default_run_name, progress, read_jsonl

if TYPE_CHECKING:
    from m2rl.envs.tasks.base import TaskSet
    from m2rl.rl.env_pool import EpisodePool
    from m2rl.rl.ray_backend import RayEnvPool
    from m2rl.rl.rollout_thread import BackgroundRollouts
    from m2rl.model.tokenizer import M2Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger(__name__)


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Architecture preset (tiny | m2-mini | m2) of a policy started from random weights (model.init null)."""
    init: str | None = "model/assets/tiny-python-sft"
    """Warm start: a Hugging Face model directory, a checkpoint (runs/X/checkpoints/step_N) or a run (runs/X:
    its final/ export). Relative paths: the working directory, then the repo root (shipped assets)."""
    seed: int = 0
    """Initialisation seed of random weights (when model.init is null)."""


@dataclass
class EnvSection:
    id: str = "m2rl/Python-v0"
    """Gymnasium id of the environment: m2rl/Python-v0, m2rl/Shell-v0, m2rl/Browser-v0, m2rl/MCP-v0, or
    module:ID (the module is imported first, so it can register its own env)."""
    sandbox: str = "bwrap"
    """Sandbox backend the tools run in: bwrap, docker or auto."""
    kinds: list[str] | None = None
    """Restrict the task kinds sampled; null: every kind of the env's task family."""
    max_steps: int = 4
    """Assistant turns per episode before it is truncated."""
    num_train_tasks: int = 256
    """Size of the training task pool the curriculum draws from."""
    enable_thinking: bool = True
    """Open every assistant turn with <think> (M2's interleaved reasoning); false: answer directly."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the env's constructor, e.g. {instances: tasks/swe-starter,
    tool_timeout_s: 60} for m2rl/SWE-v0."""


@dataclass
class RolloutSection:
    group_size: int = 8
    """G: episodes per task; advantages are relative to the group, so at least 2."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts."""
    top_p: float = 1.0
    """Nucleus-sampling threshold of training rollouts (1.0: off)."""
    max_new_tokens: int = 96
    """Tokens the policy may sample per assistant turn."""
    num_envs: int = 32
    """Episodes run concurrently (also the generator's largest batch)."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal: they carry no learning signal (DAPO)."""
    scale_by_std: bool = True
    """Divide group-relative advantages by the group's reward std (GRPO); false: only subtract the mean."""
    advantage: AdvantageMode = "episode"
    """episode: the episode's group-relative return on all its sampled tokens (M1); turn: each turn's
    return-to-go against the same group baseline, on that turn's tokens (uses the env's per-step rewards)."""
    batch_warmup: BatchSizeWarmup = field(default_factory=lambda: BatchSizeWarmup(32, 64, 0, 8))
    """Episodes per training step, warmed up from start_size to target_size."""
    context: ContextLengthSchedule = field(default_factory=lambda: ContextLengthSchedule([(0, 1024)]))
    """Longest episode, in tokens, by training step."""
    curriculum: bool = False
    """Sample training tasks by estimated difficulty (curriculum_config) instead of uniformly."""
    curriculum_config: CurriculumConfig = field(default_factory=CurriculumConfig)
    """How the difficulty curriculum weights tasks (used when rollout.curriculum is true)."""
    max_staleness: int = 0
    """Updates an episode's oldest token may be behind the learner when it is trained on. 0: synchronous
    rollouts (each batch sampled from the current weights while the learner waits); >= 1: asynchronous, the
    episodes go on in the background while the learner trains (rl/orchestrator.py); finished groups waiting
    for the learner are kept in each checkpoint."""
    backend: Literal["local", "ray"] = "local"
    """Where asynchronous rollouts run their envs: local (this process) or ray (env-worker actors calling a
    generator actor on a Ray cluster, rl/ray_backend.py; asynchronous even with max_staleness 0)."""
    episode_timeout_s: float | None = None
    """Asynchronous rollouts: an episode running longer is abandoned and rerun (rollout/abandoned); null: none."""
    sandbox_cpus: float | None = None
    """Asynchronous rollouts: CPU cores the running episodes' sandboxes may declare together (sandbox Limits);
    null: not limited."""
    sandbox_memory_mb: float | None = None
    """Asynchronous rollouts: sandbox memory (MB) the running episodes may declare together; null: not limited."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The Ray backend's cluster, env workers (the num_envs envs split among them) and actor resources."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")

    @property
    def asynchronous(self) -> bool:
        return self.max_staleness > 0 or self.backend == "ray"


@dataclass
class EvalSection:
    every: int = 10
    """Evaluate on held-out tasks every this many steps; 0: only at the start and the end."""
    num_tasks: int = 48
    """Held-out (test split) tasks per evaluation."""
    greedy: bool = True
    """Greedy decoding for evaluation; false: sample at eval.temperature."""
    temperature: float = 1.0
    """Sampling temperature of evaluation when eval.greedy is false."""
    samples_per_task: int = 1
    """With sampling, episodes per task; success is their mean (avg@k)."""
    report_greedy: bool = False
    """With sampling, also log eval/greedy_success_rate (one greedy episode per task)."""


@dataclass
class SFTSection:
    """Used by `sft` stages of a pipeline: expert demonstrations, then cross-entropy on policy tokens."""

    demos: int = 128
    """Expert demonstrations collected for an sft stage."""
    batch_size: int = 16
    """Demonstrations per SFT optimizer step."""
    lr: float = 3e-3
    """Peak learning rate of SFT."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up of SFT, in optimizer steps."""


@dataclass
class TrainConfig:
    name: str = ""
    """Run name: the run writes runs/<name>/ (under run_root); empty: train-<timestamp>."""
    run_root: str = "runs"
    """Folder that holds the run directories."""
    seed: int = 0
    """Seed of Python, NumPy and torch, and of the task sampling."""
    steps: int = 60
    """Training steps: one rollout batch and one learner update each."""
    max_minutes: float = 9.0
    """Wall-clock budget of the whole job, evaluations included; training stops cleanly when it is spent."""
    threads: int = 2
    """CPU threads torch may use."""
    device: str = "cpu"
    """Device of the learner and the in-process generator (a torch device: cpu, cuda, cuda:1, ...)."""
    resume: bool = False
    """Continue runs/<name> from its newest readable checkpoint (an error if there is none)."""
    checkpoint_every: int = 10
    """Checkpoint every this many steps; 0: only at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk; older ones are deleted."""
    model: ModelSection = field(default_factory=ModelSection)
    """The policy: a preset from random weights or a warm start."""
    policy: PolicySection = field(default_factory=PolicySection)
    """The generator rollouts sample from (in-process, a launched vLLM, an OpenAI-compatible server) and its
    weight sync."""
    env: EnvSection = field(default_factory=EnvSection)
    """The environment the policy plays and its sandbox."""
    rewards: str | dict[str, Any] = field(default_factory=dict)
    """The RewardSpec the envs score each step with: a mapping in the YAML form of rewards/spec.py, or the
    path of a YAML file holding one (configs/rewards/default.yaml is the default, written out); empty: the
    env's default."""
    rollout: RolloutSection = field(default_factory=RolloutSection)
    """How episodes are sampled for training, and how their advantages are computed."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The optimizer and loss of the policy update."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data-parallel learner (FSDP2) when launched on several ranks (`m2rl train --nproc N`, or torchrun)."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Held-out evaluation."""
    sft: SFTSection = field(default_factory=SFTSection)
    """Supervised warm-up used by sft stages of a pipeline."""
    stages: list[StageConfig] = field(default_factory=list)
    """A multi-stage pipeline (e.g. SFT short -> SFT long -> RL short -> RL long); empty: one RL stage."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Experiment trackers and trajectory samples, beside metrics.jsonl and run.log."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.rollout.group_size < 2:
            raise ValueError("rollout.group_size must be >= 2 for group-relative advantages")
        reward_spec_of(self.rewards)  # a bad reward spec is a config error now, not after the model has loaded


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_model_and_tokenizer(section: ModelSection, device: str) -> tuple[torch.nn.Module, M2Tokenizer]:
    from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer, load_pretrained

    if section.init:
        # the model directory, or a one-line CheckpointError; the preflight has checked its files
        path = resolve_init(section.init, check_files=False)
        model = load_pretrained(path, dtype=torch.float32, device=device)
        tokenizer_file = path / "tokenizer.json"
        tokenizer = M2Tokenizer.from_file(tokenizer_file) if tokenizer_file.exists() else M2Tokenizer.tiny()
    else:
        model = M2ForCausalLM(M2Config.from_preset(section.preset)).init_weights(seed=section.seed).to(device)
        tokenizer = M2Tokenizer.tiny()
    return model, tokenizer


def reward_spec_of(rewards: str | dict[str, Any]) -> RewardSpec | None:
    """The `rewards` section as a RewardSpec: a mapping (RewardSpec's YAML form) or the path of a YAML file
    (relative: the working directory, then the repo root); empty: None, the env's own default spec."""
    if not rewards:
        return None
    if isinstance(rewards, str):
        path = Path(rewards)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        return RewardSpec.from_dict(read_yaml(path), source=str(path))
    return RewardSpec.from_dict(rewards, prefix="rewards.")


@runtime_checkable
class TaskSetEnv(Protocol):
    """An env whose tasks come from a task set (ToolEnv)."""

    task_set: TaskSet


class EnvFactory:
    """Makes the run's envs, `gymnasium.make(env_id, **kwargs)`, and lists the tasks they play.

    The tasks come from the envs' own task set (`ToolEnv.task_set`), taken from the first env made, so
    listing them needs no env of its own: the trainer lists them once its runners have made their envs.
    """

    def __init__(self, env_id: str, kwargs: dict[str, Any]) -> None:
        self.env_id, self.kwargs = env_id, kwargs
        self._task_set: TaskSet | None = None

    def __call__(self) -> TextEnv:
        import gymnasium

        import m2rl.envs  # noqa: F401  (registers the m2rl/* ids)

        env = gymnasium.make(self.env_id, **self.kwargs)
        if self._task_set is None:
            unwrapped = env.unwrapped
            if not isinstance(unwrapped, TaskSetEnv):
                env.close()
                raise TypeError(f"{self.env_id} has no task set (env.unwrapped.task_set) to draw tasks from")
            self._task_set = unwrapped.task_set
        return env

    @property
    def task_set(self) -> TaskSet:
        if self._task_set is None:
            raise RuntimeError(f"no {self.env_id} env has been made yet, so its task set is not known")
        return self._task_set

    def task_ids(self, split: str, count: int, kinds: Sequence[str] | None = None) -> list[str]:
        """The first `count` tasks of `split` (a fixed list, cycling through `kinds`; None: all kinds)."""
        return task_ids_of(self.task_set, split, count, kinds)


def task_ids_of(task_set: TaskSet, split: str, count: int, kinds: Sequence[str] | None = None) -> list[str]:
    return [task.id for task in task_set.tasks(split, count, kinds=tuple(kinds) if kinds else None)]


def make_env_factory(section: EnvSection, split: str, reward_spec: RewardSpec | None = None) -> EnvFactory:
    kwargs: dict[str, Any] = {"backend": section.sandbox, "split": split, "max_steps": section.max_steps,
                              "enable_thinking": section.enable_thinking}
    if section.kinds:
        kwargs["kinds"] = tuple(section.kinds)
    if reward_spec is not None:  # None: the env's default spec (custom envs need not take the argument)
        kwargs["reward_spec"] = reward_spec
    clashes = sorted(set(section.options) & set(kwargs))
    if clashes:
        raise ValueError(f"env.options {clashes} are set by their own env keys (env.sandbox, env.max_steps, ...)")
    kwargs.update(section.options)
    return EnvFactory(section.id, kwargs)


def task_pool(env: TextEnv, split: str, count: int, kinds: list[str] | None) -> list[str]:
    """The tasks of an env already made (prefer `EnvFactory.task_ids`)."""
    return task_ids_of(env.unwrapped.task_set, split, count, kinds)


def episodes_to_batch(episodes: list[ScoredTrajectory], advantages: Sequence[float | Sequence[float]],
                      pad_id: int) -> RolloutBatch:
    trajectories = [e.trajectory for e in episodes]
    chat = [e.task_id for e in episodes if e.trajectory.chat_mode]
    if chat:  # placeholder log-probs of ids no model sampled: a loss on them would be silently wrong
        raise ValueError(f"{len(chat)} episode(s) were played by a chat policy (e.g. task {chat[0]!r}); they are "
                         "for evaluation only and cannot be trained on")
    return collate(
        [t.ids for t in trajectories],
        [t.loss_mask for t in trajectories],
        [t.logprobs for t in trajectories],
        advantages,
        pad_id=pad_id,
    )


def learner_advantages(
    episodes: Sequence[ScoredTrajectory],
    mode: AdvantageMode = "episode",
    scale_by_std: bool = True,
    dynamic_sampling: bool = True,
) -> list[tuple[ScoredTrajectory, float | list[float]]]:
    """The episodes the learner trains on, each with its advantage (see `episode_advantage`).

    Each group (`ScoredTrajectory.group`: the episodes of one task) gets its baseline from the returns of its
    episodes that ran; a failed one is a crash, not an outcome of the policy, so it counts in no baseline and
    is not trained on (it has no loss tokens anyway). With dynamic sampling, groups whose returns are all
    equal are dropped.
    """
    baselines = group_baselines([e.reward for e in episodes], [e.group for e in episodes],
                                [not e.failed for e in episodes], scale_by_std=scale_by_std)
    kept: list[tuple[ScoredTrajectory, float | list[float]]] = []
    for episode in episodes:
        baseline = baselines.get(episode.group)
        if episode.failed or baseline is None or (dynamic_sampling and not baseline.has_signal):
            continue
        kept.append((episode, episode_advantage(episode, baseline, mode)))
    return kept


def episode_advantage(
    episode: ScoredTrajectory, baseline: GroupBaseline, mode: AdvantageMode
) -> float | list[float]:
    """`episode`: one float, the advantage of the episode's return, for all its sampled tokens. `turn`: one
    value per token, the advantage of the return-to-go of the token's turn (0 off the sampled tokens)."""
    if mode == "episode":
        return float(baseline.advantages(torch.tensor([episode.reward], dtype=torch.float32))[0])
    trajectory = episode.trajectory
    spans = [(span.start, span.end) for span in trajectory.sampled_spans()]
    returns = turn_returns_to_tokens(episode.turn_rewards, spans, len(trajectory.ids))
    return (baseline.advantages(returns) * torch.tensor(trajectory.loss_mask, dtype=torch.float32)).tolist()


def record_attempts(curriculum: DifficultyCurriculum, episodes: Sequence[ScoredTrajectory]) -> None:
    """Each episode that ran is an attempt at its task; a failed one (a crash) says nothing about the task."""
    for episode in episodes:
        if not episode.failed:
            curriculum.update(episode.task_id, 1.0 if episode.resolved else 0.0)


def tool_calls(episode: ScoredTrajectory) -> int:
    """Tool calls the episode made, not counting `submit` (which only hands in the answer)."""
    return sum(name != "submit" for name in episode.episode.tool_names())


def summarize_episodes(episodes: list[ScoredTrajectory], prefix: str) -> dict[str, float]:
    if not episodes:
        return {}
    n = len(episodes)
    metrics = {
        f"{prefix}/success_rate": sum(e.resolved for e in episodes) / n,
        f"{prefix}/reward_mean": sum(e.reward for e in episodes) / n,
        f"{prefix}/sampled_tokens_mean": sum(e.sampled_tokens for e in episodes) / n,
        f"{prefix}/turns_mean": sum(e.trajectory.num_turns for e in episodes) / n,
        f"{prefix}/tool_calls_mean": sum(tool_calls(e) for e in episodes) / n,
        f"{prefix}/tool_use_rate": sum(tool_calls(e) > 0 for e in episodes) / n,
    }
    violations = [e.trajectory.metadata.get("continuity_violations") for e in episodes]
    metrics[f"{prefix}/continuity_violations"] = float(sum(v for v in violations if isinstance(v, int)))
    components: dict[str, float] = {}
    for episode in episodes:
        for name, value in episode.reward_breakdown.items():
            components[name] = components.get(name, 0.0) + value / n
    metrics.update({f"{prefix}/reward/{k}": v for k, v in components.items()})
    metrics.update(rollout_metrics(episodes, prefix))  # detectors/<name>, rollout/failed_episodes
    return metrics


@dataclass
class ResumeReport:
    """What resuming a run found, for the console and run.log."""

    step: int
    checkpoint: Path
    damaged: list[tuple[Path, str]]  # newer checkpoints that could not be read (set aside), with why
    changed: list[str]  # "key (old -> new)" for each setting that differs from the run's config.yaml
    dropped_records: int  # metrics logged after the checkpoint (a crash), removed so steps never repeat


class Trainer:
    """One RL stage. `model`/`tokenizer` may be handed over by an earlier pipeline stage."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module | None = None,
                 tokenizer: M2Tokenizer | None = None) -> None:
        self.config = config
        check_config(config)  # before anything is built or written
        self.name = config.name or default_run_name("train", config.run_root)
        torch.set_num_threads(max(1, config.threads))
        seed_everything(config.seed)
        self._envs: list[Any] = []  # every env made, so an interrupt mid-construction still closes them
        self._unlogged: dict[str, float] | None = None  # a completed step's metrics not yet in metrics.jsonl
        self.background: BackgroundRollouts | None = None  # asynchronous rollouts, started by the first step
        self.ray_pool: RayEnvPool | None = None  # their env workers and generator (rollout.backend ray)
        self._finished_groups: list[ScoredGroup] = []  # finished, untrained groups (from a checkpoint, or closed)
        self._untrained: list[ScoredGroup] = []  # the batch of the step in progress, until its update is done
        self._task_lock = threading.Lock()  # the background rollouts draw tasks from the RNG and curriculum too
        try:
            self._build(model, tokenizer)
            # The run directory comes last: everything above can still fail on a bad config.
            if config.resume:
                self.run = Run.open(self.name, root=config.run_root, trackers=config.logging.trackers,
                                    project=config.logging.project)
            else:
                self.run = Run.create(self.name, root=config.run_root, config=config,
                                      trackers=config.logging.trackers, project=config.logging.project)
            self._build_generator()
            self.resumed: ResumeReport | None = self._resume() if config.resume else None
            if self.resumed is None:
                self._sync_weights(version=0)  # starts a launched server; probes every generator
        except BaseException:
            self._close_envs()
            if hasattr(self, "backend"):
                self.backend.close()
            if hasattr(self, "run"):
                self.run.close()
            if hasattr(self, "group"):
                self._release_ranks()
            raise

    def _build(self, model: torch.nn.Module | None, tokenizer: M2Tokenizer | None) -> None:
        config = self.config
        # Under torchrun this is rank 0; the other ranks run rl/learner_group.py's run_follower.
        self.parallel = init_distributed(config.distributed, config.device)
        if self.parallel.world > 1 and (model is not None or config.resume):
            raise ConfigError("distributed: a data-parallel run cannot resume (its optimizer state is sharded and "
                              "not checkpointed yet) nor be a pipeline stage; run it in one process")
        if model is None:
            model, self.tokenizer = build_model_and_tokenizer(config.model, str(self.parallel.device))
        else:
            from m2rl.model import M2Tokenizer

            self.tokenizer = tokenizer or M2Tokenizer.tiny()
        # self.model is the whole policy (synced, probed, checkpointed); data-parallel, the learner's is a shard
        self.group = LearnerGroup(model, config.learner, self.parallel)
        self.model, self.learner = self.group.full_model, self.group.learner
        reward_spec = reward_spec_of(config.rewards)
        train_envs = make_env_factory(config.env, "train", reward_spec)
        eval_envs = make_env_factory(config.env, "test", reward_spec)
        self.train_runner = EpisodeRunner(self._tracked(train_envs), config.rollout.num_envs, self.tokenizer)
        eval_envs_count = min(config.rollout.num_envs, config.eval.num_tasks)
        self.eval_runner = EpisodeRunner(self._tracked(eval_envs), eval_envs_count, self.tokenizer)
        self.train_tasks = train_envs.task_ids("train", config.env.num_train_tasks, config.env.kinds)
        self.eval_tasks = eval_envs.task_ids("test", config.eval.num_tasks, config.env.kinds)
        self.curriculum = DifficultyCurriculum(self.train_tasks, config.rollout.curriculum_config)
        self.rng = random.Random(config.seed)
        self._rng_after_step = self.rng.getstate()  # the trainer RNG as the last completed step left it
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.initial_eval: dict[str, float] = {}  # the run's first held-out evaluation (kept across resumes)

    def _build_generator(self) -> None:
        """The policy rollouts sample from (`policy.*`); a launched server keeps its files in the run directory."""
        self.backend: PolicyBackend = build_backend(self.config.policy, self.model, self.tokenizer,
                                                    self.run.directory, self.config.rollout.num_envs)
        self.policy = self.backend.policy
        self.generator = self.backend.generator_model  # the in-process copy of the weights (kind local)

    def _tracked(self, make_env: Callable[[], TextEnv]) -> Callable[[], TextEnv]:
        def make() -> TextEnv:
            env = make_env()
            self._envs.append(env)
            return env

        return make

    # ------------------------------------------------------------------ state

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "rng": self._rng_after_step,
            "learner": self.learner.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "policy_version": self.policy.policy_version,
            "finished_groups": [g.to_dict() for g in self._groups_to_keep()],
            "initial_eval": self.initial_eval,
        }

    def save(self, final: bool = False) -> Path:
        """Checkpoint this step (the model as a Hugging Face directory, the learner state beside it);
        `final`: also publish its model as runs/<name>/final/, the run's export."""
        # Data-parallel, AdamW's state is sharded over the ranks: not saved (such a run cannot resume yet).
        optimizer = None if self.group.sharded else self.learner.optimizer
        checkpoint = save_checkpoint(
            self.run.directory / CHECKPOINTS_DIR, self.step, self.model, optimizer,
            self.learner.scheduler, trainer_state=self._trainer_state(), data_position=self.step,
            keep_last=self.config.keep_checkpoints, tokenizer=self.tokenizer,
        )
        if final:
            publish_export(checkpoint, self.run.directory / EXPORT_DIR)
        return checkpoint

    def _resume(self) -> ResumeReport:
        state, damaged = load_latest_checkpoint(self.run.directory / CHECKPOINTS_DIR, self.model,
                                                self.learner.optimizer, self.learner.scheduler)
        self.step = state.step
        trainer_state = state.trainer_state
        version, internal, gauss = trainer_state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._rng_after_step = self.rng.getstate()
        self.learner.load_state_dict(trainer_state["learner"])
        # Not strict: a resumed run may have another task pool (its changed settings are reported).
        self.curriculum.load_state_dict(trainer_state["curriculum"], strict=False)
        self._sync_weights(version=int(trainer_state["policy_version"]))
        self._finished_groups = [ScoredGroup.from_dict(d) for d in trainer_state.get("finished_groups", [])]
        if self._finished_groups and not self.config.rollout.asynchronous:
            self.run.logger.info("%d finished groups in the checkpoint are left: rollouts are synchronous now",
                                 len(self._finished_groups))
        records = self._metrics_up_to(self.step)
        dropped = len(read_jsonl(self.run.metrics_path)) - len(records)
        if dropped:
            atomic_write(self.run.metrics_path, "".join(json.dumps(r) + "\n" for r in records))
        self.history = records
        # Checkpoints from before initial_eval was saved: the step-0 evaluation is in the metrics.
        self.initial_eval = trainer_state.get("initial_eval") or next(
            ({k: v for k, v in r.items() if k.startswith("eval/")} for r in records
             if r.get("step") == 0 and "eval/success_rate" in r), {})
        report = ResumeReport(self.step, state.path, damaged, self._changed_settings(), dropped)
        for path, reason in damaged:
            self.run.logger.warning("checkpoint %s is damaged (%s); set aside", path, reason)
        self.run.logger.info("resumed from %s at step %d; changed settings: %s", state.path, self.step,
                             ", ".join(report.changed) or "none")
        return report

    def _metrics_up_to(self, step: int) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.run.metrics_path) if int(r.get("step", 0)) <= step]

    def _changed_settings(self) -> list[str]:
        path = self.run.directory / "config.yaml"
        try:
            original = read_yaml(path)
        except ConfigError as exc:
            return [f"(cannot compare with the original settings: {exc})"]
        current = yaml.safe_load(yaml.safe_dump(to_dict(self.config)))  # the same plain types as the file
        return [f"{key} ({_show(old)} -> {_show(new)})" for key, old, new in changed_settings(original, current)
                if key != "resume"]

    def _sync_weights(self, version: int | None = None) -> SyncReport:
        """Push the learner's weights to the generator as `version` (default: the next one) and probe them."""
        version = self.policy.policy_version + 1 if version is None else version
        report = self.backend.push(self.model, version)
        parity = f"parity max |diff| {report.parity.max_abs_diff:.3g}" if report.parity else "not probed"
        self.run.logger.info("generator (%s) at policy version %d in %.1f s; %s", self.backend.sync.name,
                             report.version, report.seconds, parity)
        return report

    # ------------------------------------------------------------------ rollouts and evaluation

    def _loop_config(self) -> LoopConfig:
        return LoopConfig(
            max_turns=self.config.env.max_steps,
            max_context_tokens=self.config.rollout.context.max_tokens(self.step),
            enable_thinking=self.config.env.enable_thinking,
        )

    def _sampling(self, greedy: bool = False, temperature: float | None = None) -> SamplingParams:
        r = self.config.rollout
        return SamplingParams(
            max_tokens=r.max_new_tokens, temperature=temperature or r.temperature, top_p=r.top_p,
            stop_ids=(self.tokenizer.eos_id,), greedy=greedy,
        )

    def _sample_tasks(self, count: int) -> list[str]:
        if self.config.rollout.curriculum:
            return [str(t) for t in self.curriculum.sample(count, self.rng)]
        return self.rng.sample(self.train_tasks, min(count, len(self.train_tasks)))

    def evaluate(self) -> dict[str, float]:
        e = self.config.eval
        params = self._sampling(greedy=e.greedy, temperature=e.temperature)
        samples = 1 if e.greedy else max(1, e.samples_per_task)
        episodes = self._rollouts(self.eval_runner, self.eval_tasks, samples, params)
        metrics = summarize_episodes(episodes, "eval")
        if e.report_greedy and not e.greedy:
            greedy = self._rollouts(self.eval_runner, self.eval_tasks, 1, self._sampling(greedy=True))
            metrics["eval/greedy_success_rate"] = sum(g.resolved for g in greedy) / max(1, len(greedy))
        return metrics

    def _rollouts(self, runner: EpisodeRunner, tasks: list[str], group: int,
                  params: SamplingParams) -> list[ScoredTrajectory]:
        """The episodes of `tasks`; a dead generator server is raised as itself (VLLMServerError with its log
        tail), not left to fail episodes one by one: the runner keeps going while any episode succeeds."""
        try:
            if self.background is not None:  # on its loop: one LocalPolicy batcher serves both
                episodes = self.background.run(runner.run(self.policy, tasks, group, params, self._loop_config()))
            else:
                episodes = run_async(self._collect(runner, tasks, group, params))
        except RolloutError:
            self.backend.check_alive()
            raise
        self.backend.check_alive()
        return episodes

    async def _collect(self, runner: EpisodeRunner, tasks: list[str], group: int,
                       params: SamplingParams) -> list[ScoredTrajectory]:
        try:
            return await runner.run(self.policy, tasks, group, params, self._loop_config())
        finally:
            await self.policy.aclose()  # the batching worker belongs to this event loop

    def train_step(self) -> dict[str, float]:
        """One step: rollouts (an interrupt may cut them short), then the update, the weight sync and the
        step count together, so a checkpoint never holds half an optimizer step."""
        r = self.config.rollout
        t0 = time.perf_counter()
        num_tasks = max(1, r.batch_warmup.batch_size(self.step) // r.group_size)
        episodes, groups, batch_metrics = self._training_episodes(num_tasks)
        rollout_s = time.perf_counter() - t0
        with deferred_interrupts():
            with self._task_lock:
                record_attempts(self.curriculum, episodes)
            kept = learner_advantages(episodes, r.advantage, r.scale_by_std, r.dynamic_sampling)
            metrics = summarize_episodes(episodes, "train")
            metrics.update({"rollout_s": rollout_s, "groups_kept": float(len({e.group for e, _ in kept})),
                            "groups": float(groups)})
            metrics.update(batch_metrics)
            metrics.update(self._update(kept))
            self.step += 1
            self._untrained = []
            with self._task_lock:
                self._rng_after_step = self.rng.getstate()
            self._save_trajectory_sample(episodes)
        self._unlogged = metrics  # the step is complete: whatever ends the run from here logs it
        if kept:  # the weights changed; outside the deferred block: a restart may take a minute
            self._push_update(metrics)
        if self.ray_pool is not None:  # the generator actor: the same weights, or the server's new version
            parity = self.ray_pool.sync(self.model, self.policy.policy_version, self.backend.probe,
                                        self.backend.retries)
            if parity is not None:
                metrics["sync/ray_generator_parity_max_diff"] = parity.max_abs_diff
        if self.background is not None:  # also when nothing changed: the next batch is built at this version
            self.background.on_weights_updated(self.policy.policy_version)
        metrics["step_s"] = time.perf_counter() - t0
        return metrics

    def _training_episodes(self, num_tasks: int) -> tuple[list[ScoredTrajectory], int, dict[str, float]]:
        """This step's episodes, their number of groups, and the rollout/* metrics of their batch: sampled now
        from the current weights (synchronous), or the next batch of the background rollouts."""
        r = self.config.rollout
        if not r.asynchronous:
            tasks = self._sample_tasks(num_tasks)
            return self._rollouts(self.train_runner, tasks, r.group_size, self._sampling()), len(tasks), {}
        if self.background is None:
            self.background = self._start_background()
        try:
            batch = self.background.next_batch(num_tasks)
        except RolloutError:  # a dead generator server is raised as itself, with its log tail
            self.backend.check_alive()
            raise
        self._untrained = batch.groups  # kept by a checkpoint taken before this step's update is done
        return batch.episodes(), len(batch.groups), batch.metrics

    def _start_background(self) -> BackgroundRollouts:
        """The orchestrator (rl/orchestrator.py) generating on its own thread from the current weights, the
        checkpoint's finished groups first."""
        from m2rl.rl.admission import ResourceBudget
        from m2rl.rl.orchestrator import OrchestratorConfig, RolloutOrchestrator
        from m2rl.rl.rollout_thread import BackgroundRollouts

        r = self.config.rollout
        config = OrchestratorConfig(
            group_size=r.group_size, groups_per_batch=max(1, r.batch_warmup.batch_size(self.step) // r.group_size),
            max_staleness=r.max_staleness, episode_timeout_s=r.episode_timeout_s,
            budget=ResourceBudget(cpus=r.sandbox_cpus, memory_mb=r.sandbox_memory_mb))
        orchestrator = RolloutOrchestrator(self._episode_pool(), self._next_task, self._sampling(), self._loop_config,
                                           config, version=self.policy.policy_version, eos_id=self.tokenizer.eos_id)
        finished, self._finished_groups = self._finished_groups, []
        threads = len(self.train_runner.envs) + len(self.eval_runner.envs) + 4  # one per env step in flight
        return BackgroundRollouts.start(orchestrator, threads, finished)

    def _episode_pool(self) -> EpisodePool:
        from m2rl.rl.env_pool import LocalEnvPool

        r = self.config.rollout
        if r.backend == "local":
            return LocalEnvPool(self.train_runner, self.policy)
        from m2rl.rl.ray_backend import RayEnvPool, generator_factory

        # The workers make their own envs (the run's envs stay for evaluation) and sample from a generator actor.
        make_env = make_env_factory(self.config.env, "train", reward_spec_of(self.config.rewards))
        self.ray_pool = RayEnvPool.for_run(make_env, r.num_envs, self.tokenizer,
                                           generator_factory(self.policy, r.num_envs), r.ray)
        self.ray_pool.version = self.policy.policy_version
        return self.ray_pool

    def _next_task(self) -> str:
        with self._task_lock:
            return self._sample_tasks(1)[0]

    def _groups_to_keep(self) -> list[ScoredGroup]:
        """Finished groups not trained on yet: a checkpoint keeps them, so a resumed run loses none."""
        waiting = self.background.finished_groups() if self.background is not None else self._finished_groups
        return [*self._untrained, *waiting]

    def _update(self, kept: list[tuple[ScoredTrajectory, float | list[float]]]) -> dict[str, float]:
        """One learner update on the kept episodes; none when no group has a signal. Also the generator-vs-
        learner log-prob gap on the batch, before the update changes the learner (the learner's own
        `logp_gap_gen_learner` is its mean; this adds the max, the tokens importance weights must correct)."""
        if not kept:
            return {"learner/skipped_no_signal": 1.0}
        batch = episodes_to_batch([e for e, _ in kept], [a for _, a in kept], pad_id=self.tokenizer.eos_id)
        return self.group.update(batch)  # on every rank; self.model then holds the new weights

    def _push_update(self, metrics: dict[str, float]) -> None:
        """The step's weight sync and its metrics, also those of a rejected one (the shutdown logs them)."""
        try:
            metrics.update(self._sync_weights().metrics())
        except SyncRejected as exc:
            metrics.update(exc.report.metrics())
            raise

    def _save_trajectory_sample(self, episodes: list[ScoredTrajectory]) -> None:
        """A few of this step's episodes in trajectories/step_NNNNNN.jsonl (logging.trajectory_*), and the
        viewer over the samples of every step so far, trajectories/report.html."""
        c = self.config.logging
        records = trajectory_sample(episodes, self.tokenizer, self.step, c.trajectory_samples, c.trajectory_max_chars)
        if self.run.write_trajectories(self.step, records) is not None:
            write_sample_report(self.run.directory / "trajectories")  # the viewer over every step so far

    # ------------------------------------------------------------------ the whole job

    def train(self) -> dict[str, Any]:
        """Train to `steps`; on an interrupt, close the envs, checkpoint the last completed step and raise
        TrainingInterrupted carrying that step and checkpoint."""
        self._unlogged = None
        try:
            return self._train()
        except KeyboardInterrupt as exc:
            interrupted = exc if isinstance(exc, TrainingInterrupted) else TrainingInterrupted(signal.SIGINT)
            with interrupts_ignored():
                self._close_envs()  # first: the sandboxes go even if saving fails
                if self._unlogged is not None:
                    self._log(self.step, self._unlogged)
                interrupted.step, interrupted.checkpoint = self.step, self.save()
                interrupted.run_name = self.name
                self.run.logger.warning("interrupted by %s after step %d; saved %s", interrupted, self.step,
                                        interrupted.checkpoint)
            raise interrupted from None
        except GENERATOR_FAILURES:
            with interrupts_ignored():
                self._close_envs()
                if self._unlogged is not None:
                    self._log(self.step, self._unlogged)
                checkpoint = self.save()
                self.run.logger.error("the generator failed after step %d; the run's metrics are kept and its last "
                                      "completed step is saved in %s (resume=true continues with a fresh generator)",
                                      self.step, checkpoint)
            raise
        except BaseException:
            self.run.logger.exception("training failed at step %d", self.step)
            raise
        finally:
            self.close()

    def _train(self) -> dict[str, Any]:
        c = self.config
        start = time.monotonic()
        deadline = start + c.max_minutes * 60
        self.run.logger.info("training %s for %d steps (budget %.1f min)", self.name, c.steps, c.max_minutes)
        if self.step == 0 and not self.initial_eval:
            initial = self.evaluate()
            with deferred_interrupts():
                self.initial_eval = initial
                self._log(self.step, initial)
        stopped_early = False
        with progress(f"train {self.name}", total=c.steps) as advance:
            advance(self.step)
            while self.step < c.steps:
                if time.monotonic() > deadline:
                    stopped_early = True
                    break
                metrics = self._unlogged = self.train_step()
                if c.eval.every and self.step % c.eval.every == 0 and self.step < c.steps:
                    metrics.update(self.evaluate())
                with deferred_interrupts():
                    self._log(self.step, metrics)
                    self._unlogged = None
                    if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                        self.save()
                status = f"success {metrics.get('train/success_rate', 0):.2f}"
                if "eval/success_rate" in metrics:
                    status += f" held-out {metrics['eval/success_rate']:.2f}"
                advance(1, status=status)
        final = self.evaluate()
        with deferred_interrupts():
            self._log(self.step, final)
            self.save(final=True)
            summary = self._summary(final, stopped_early, time.monotonic() - start)
            self.run.write_file("summary.json", json.dumps(summary, indent=2))
        return summary

    def _summary(self, final: dict[str, float], stopped_early: bool, elapsed: float) -> dict[str, Any]:
        initial = self.initial_eval  # the run's first evaluation, also after a resume
        summary: dict[str, Any] = {
            "run": str(self.run.directory),
            "steps": self.step,
            "stopped_early_by_time_budget": stopped_early,
            "wall_time_s": round(elapsed, 1),
            "initial_eval_success": initial.get("eval/success_rate"),
            "final_eval_success": final.get("eval/success_rate"),
        }
        if self.resumed is not None:
            summary["resumed_from_step"] = self.resumed.step
        if "eval/greedy_success_rate" in final:
            summary["initial_eval_greedy_success"] = initial.get("eval/greedy_success_rate")
            summary["final_eval_greedy_success"] = final["eval/greedy_success_rate"]
        return summary

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.run.log_metrics(step, clean)
        self.history.append({"step": step, **clean})
        plot_training_curve(self.history, self.run.directory / "curve.png", title=self.name)

    def _close_envs(self) -> None:
        background, self.background = getattr(self, "background", None), None
        if background is not None:  # first: its episodes run on these envs
            background.close()
            self._finished_groups = background.finished_groups()
        ray_pool, self.ray_pool = getattr(self, "ray_pool", None), None
        if ray_pool is not None:
            ray_pool.close()
        for runner in (getattr(self, "train_runner", None), getattr(self, "eval_runner", None)):
            if runner is not None:
                runner.close()
        for env in self._envs:  # also those made before a runner finished building
            try:
                env.close()
            except Exception:  # a dead sandbox must not stop the shutdown of the others
                logger.debug("closing an env failed", exc_info=True)
        self._envs.clear()

    def close(self) -> None:
        self._close_envs()
        self.backend.close()
        self.run.close()
        self._release_ranks()

    def _release_ranks(self) -> None:
        """Data-parallel: the other ranks stop waiting for updates and leave the process group."""
        try:
            self.group.stop()
            self.parallel.close()
        except Exception:  # ranks already gone (torchrun stops them all on a failure): nothing left to release
            logger.debug("releasing the other ranks failed", exc_info=True)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
