"""Rollouts on a Ray cluster (`rollout.backend: ray`): env workers and the generator as actors.

    GeneratorActor(make_policy)                  one process holding the policy: a LocalPolicy with its own
                                                 copy of the weights, or an HTTP client of vLLM / m2rl serve; it
                                                 serves every env worker's requests concurrently, so they batch
    EnvWorker(make_env, num_envs, tokenizer, g)  a few envs (and their sandboxes) in one process; runs whole
                                                 episodes, asking the generator actor for each turn
    RayEnvPool(...)                              the orchestrator's EpisodePool (rl/env_pool.py): an episode
                                                 goes to the worker with the most free envs

The same RolloutOrchestrator drives them (admission, staleness, groups, long tail): only where an episode
runs changes. Actors are placed by resources: each env worker asks for `worker_cpus` plus any custom
resources (e.g. {"sandbox_host": 1} to pin sandboxes to the nodes that run them), the generator for
`generator_cpus` / `generator_gpus` and its own custom resources; Ray puts them on nodes that have them.

Failures: an env or sandbox that fails inside a worker is a failed episode there (EpisodeRunner replaces
the env); a worker process that dies (its actor errors) is replaced by a fresh worker and the episode
returned as failed, so the orchestrator resamples it. Segments do not report their versions while an
episode runs in a worker, so a stale one is dropped when its group is built rather than cancelled early.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from m2rl.agent.loop import LoopConfig, TextEnv, Tokenizer
from m2rl.agent.policy import Policy, PolicyOutput, SamplingParams
from m2rl.rl.admission import ResourceCost, episode_cost
from m2rl.rl.env_pool import VersionCallback, WatchedPolicy
from m2rl.rl.parity import ParityProbe, ParityResult
from m2rl.rl.weight_sync import SyncRejected, SyncReport
from m2rl.rl.rollout import EpisodeRunner, ScoredTrajectory, failed_episode
from m2rl.rl.rollout_stats import BusyClock

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the actors


class GeneratorActor:
    """A Policy in its own process (run as a Ray async actor: concurrent `generate` calls interleave)."""

    def __init__(self, make_policy: Callable[[], Policy]) -> None:
        self.policy = make_policy()
        self.clock = BusyClock()
        self.watched = WatchedPolicy(self.policy, self.clock)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        return await self.watched.generate(prompt_ids, params)

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> int:
        """Load new weights into an in-process policy (between its batches), labelled `version`."""
        return await asyncio.to_thread(self.policy.update_weights, state_dict, version)  # type: ignore[attr-defined]

    def set_policy_version(self, version: int) -> None:
        """A server's weights were updated by the trainer's own sync: its outputs now carry `version`."""
        setter = getattr(self.policy, "set_policy_version", None)
        if setter is not None:
            setter(version)
        else:
            self.policy.policy_version = version  # type: ignore[attr-defined]

    def policy_version(self) -> int:
        return int(self.policy.policy_version)  # type: ignore[attr-defined]

    def logprobs(self, ids: list[int]) -> list[float]:
        """The in-process model's log-probs of `ids` (the parity probe, rl/parity.py)."""
        from m2rl.rl.parity import model_logprobs

        return model_logprobs(self.policy.model, ids)  # type: ignore[attr-defined]

    def busy_seconds(self) -> float:
        return self.clock.busy_seconds()


class ActorPolicy:
    """The Policy an env worker's episodes see: every request goes to the generator actor."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        return await self.generator.generate.remote(prompt_ids, params)


class EnvWorker:
    """A few envs in one process (a Ray async actor): one episode per env at a time, EpisodeRunner's failure
    handling (a failed episode is returned as such and its env replaced)."""

    def __init__(self, make_env: Callable[[], TextEnv], num_envs: int, tokenizer: Tokenizer, generator: Any) -> None:
        self.runner = EpisodeRunner(make_env, num_envs, tokenizer)
        self.policy = ActorPolicy(generator)
        self.free: asyncio.Queue[TextEnv] | None = None

    def cost(self) -> ResourceCost:
        return episode_cost(self.runner.envs[0])

    async def run_episode(self, task_id: str, params: SamplingParams, loop_config: LoopConfig) -> ScoredTrajectory:
        if self.free is None:  # the actor's event loop exists only once a method runs
            self.free = asyncio.Queue()
            for env in self.runner.envs:
                self.free.put_nowait(env)
        env = await self.free.get()
        try:
            episode, env = await self.runner.episode(env, self.policy, task_id, 0, params, loop_config)
        except asyncio.CancelledError:  # abandoned: the env may be mid-step in a thread; a fresh one replaces it
            env = await asyncio.to_thread(self.runner.replace_env, env)
            raise
        finally:
            self.free.put_nowait(env)
        return episode

    def pid(self) -> int:
        import os

        return os.getpid()

    def close(self) -> None:
        self.runner.close()


# ---------------------------------------------------------------------------------------------- placement


@dataclass
class RayConfig:
    """The cluster, and how the actors ask it for resources (`rollout.ray.*`)."""

    address: str = ""
    """The cluster to join (e.g. auto, ray://head:10001); empty: join the one this process started, or start a
    local one for the run (stopped when it ends)."""
    env_workers: int = 2
    """Env-worker actors; the envs are split among them as evenly as possible."""
    worker_cpus: float = 1.0
    """CPUs Ray reserves for each env worker (its envs' tool calls and sandboxes)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources of each env worker, e.g. {"sandbox_host": 1}."""
    generator_cpus: float = 1.0
    """CPUs Ray reserves for the generator actor."""
    generator_gpus: float = 0.0
    """GPUs Ray reserves for the generator actor (a local policy on CUDA)."""
    generator_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources of the generator actor."""

    def __post_init__(self) -> None:
        if self.env_workers < 1:
            raise ValueError(f"rollout.ray.env_workers must be >= 1, got {self.env_workers}")


def split_envs(num_envs: int, workers: int) -> list[int]:
    """Envs per worker: as even as possible, none empty (fewer workers when there are fewer envs)."""
    workers = max(1, min(workers, num_envs))
    size, rest = divmod(num_envs, workers)
    return [size + (1 if k < rest else 0) for k in range(workers)]


class RayEnvPool:
    """The orchestrator's EpisodePool on Ray: env-worker actors that call one generator actor."""

    def __init__(self, make_env: Callable[[], TextEnv], num_envs: int, tokenizer: Tokenizer,
                 make_policy: Callable[[], Policy], config: RayConfig | None = None) -> None:
        import ray

        self.config = config or RayConfig()
        self.make_env, self.tokenizer = make_env, tokenizer
        p = self.config
        self.generator = ray.remote(GeneratorActor).options(
            num_cpus=p.generator_cpus, num_gpus=p.generator_gpus, resources=p.generator_resources or None,
        ).remote(make_policy)
        self.sizes = split_envs(num_envs, p.env_workers)
        self.workers = [self._start_worker(n) for n in self.sizes]
        self.free = list(self.sizes)
        self._cost = ray.get(self.workers[0].cost.remote())
        self.eos_id = tokenizer.eos_id
        self.workers_replaced = 0
        self.version: int | None = None  # the version last synced by `sync`
        self.local_generator = isinstance(make_policy, LocalPolicyFactory)
        self.owns_cluster = False  # `for_run` started the cluster: `close` stops it

    @classmethod
    def for_run(cls, make_env: Callable[[], TextEnv], num_envs: int, tokenizer: Tokenizer,
                make_policy: Callable[[], Policy], config: RayConfig) -> RayEnvPool:
        """Join `config.address` (or the cluster this process already joined, or start a local one), then start
        the actors."""
        import ray

        started = not ray.is_initialized()
        if started:
            ray.init(address=config.address or None, include_dashboard=False, log_to_driver=False)
        try:
            pool = cls(make_env, num_envs, tokenizer, make_policy, config)
        except BaseException:
            if started:
                ray.shutdown()
            raise
        pool.owns_cluster = started
        return pool

    def _start_worker(self, num_envs: int) -> Any:
        import ray

        p = self.config
        return ray.remote(EnvWorker).options(
            num_cpus=p.worker_cpus, resources=p.worker_resources or None,
        ).remote(self.make_env, num_envs, self.tokenizer, self.generator)

    @property
    def slots(self) -> int:
        return sum(self.sizes)

    @property
    def cost(self) -> ResourceCost:
        return self._cost

    async def run(self, task_id: str, params: SamplingParams, loop_config: LoopConfig,
                  on_version: VersionCallback | None = None) -> ScoredTrajectory:
        import ray

        k = max(range(len(self.free)), key=lambda i: self.free[i])
        if self.free[k] <= 0:
            raise RuntimeError(f"all {self.slots} envs are busy: the orchestrator started too many episodes")
        self.free[k] -= 1
        worker = self.workers[k]
        ref = worker.run_episode.remote(task_id, params, loop_config)
        try:
            episode: ScoredTrajectory = await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except ray.exceptions.RayActorError as exc:  # the worker process died: a fresh one takes its place
            logger.warning("env worker %d died (%s); starting a new one", k, exc)
            if self.workers[k] is worker:
                self.workers[k] = self._start_worker(self.sizes[k])
                self.workers_replaced += 1
            episode = failed_episode(task_id, 0, f"env worker died: {type(exc).__name__}", self.eos_id)
        finally:
            self.free[k] += 1
        if on_version is not None:
            for version in {v for v in episode.trajectory.policy_versions if v >= 0}:
                on_version(version)
        return episode

    async def generator_busy_seconds(self) -> float:
        return float(await self.generator.busy_seconds.remote())

    def push_weights(self, model: torch.nn.Module, version: int) -> None:
        """The learner's weights to an in-process generator (CPU tensors through the object store)."""
        import ray

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ray.get(self.generator.update_weights.remote(state, version))

    def sync(self, model: torch.nn.Module, version: int, probe: ParityProbe | None = None,
             retries: int = 1) -> ParityResult | None:
        """After the trainer's own weight sync: an in-process generator gets the weights, a server's client the
        version (the server itself was updated, and probed, by the trainer's transport). Nothing when the version
        is the same. With `probe`, the generator actor's copy is probed as the trainer probes its own: pushed
        again up to `retries` times while it disagrees, then SyncRejected. Returns the last probe's result."""
        if version == self.version:
            return None
        parity = None
        if not self.local_generator:
            self.set_policy_version(version)
        else:
            for _ in range(retries + 1):
                self.push_weights(model, version)
                if probe is None:
                    break
                parity = probe.check(model, self.generator_logprobs)
                if parity.passed:
                    break
            else:
                raise SyncRejected(SyncReport(version, 0.0, parity, retries + 1))
        self.version = version
        return parity

    def set_policy_version(self, version: int) -> None:
        import ray

        ray.get(self.generator.set_policy_version.remote(version))

    def generator_logprobs(self, ids: list[int]) -> list[float]:
        import ray

        return ray.get(self.generator.logprobs.remote(ids))

    async def aclose(self) -> None:
        pass  # the episodes are cancelled by the orchestrator; `close` ends the actors

    def close(self) -> None:
        import ray

        for worker in self.workers:
            try:
                ray.get(worker.close.remote(), timeout=60)
            except Exception:  # a dead worker has nothing left to close
                logger.debug("closing an env worker failed", exc_info=True)
            ray.kill(worker)
        ray.kill(self.generator)
        if self.owns_cluster:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- policies


def generator_factory(policy: Policy, max_batch_size: int) -> Callable[[], Policy]:
    """What the generator actor builds from the trainer's policy: a LocalPolicy with a CPU copy of its model
    (kind local), or a client of the same server (kinds m2rl, vllm, openai)."""
    import copy

    from m2rl.agent.local_policy import LocalPolicy
    from m2rl.agent.openai_policy import OpenAIPolicy

    if isinstance(policy, LocalPolicy):
        return LocalPolicyFactory(copy.deepcopy(policy.model).cpu(), policy.tokenizer, max_batch_size,
                                  policy.policy_version)
    if isinstance(policy, OpenAIPolicy):
        return ServerPolicyFactory(policy.base_url, policy.model, max_concurrency=max_batch_size,
                                   policy_version=policy.policy_version)
    raise TypeError(f"the Ray backend cannot start a generator for a {type(policy).__name__}")


@dataclass
class LocalPolicyFactory:
    """Builds a LocalPolicy in the generator actor from a copy of the model (picklable)."""

    model: torch.nn.Module
    tokenizer: Any
    max_batch_size: int = 32
    policy_version: int = 0

    def __call__(self) -> Policy:
        from m2rl.agent.local_policy import LocalPolicy

        model = self.model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return LocalPolicy(model, self.tokenizer, max_batch_size=self.max_batch_size,
                           policy_version=self.policy_version)


@dataclass
class ServerPolicyFactory:
    """Builds an OpenAIPolicy (vLLM, m2rl serve, any OpenAI-compatible server) in the generator actor."""

    base_url: str
    model: str
    timeout_s: float = 300.0
    max_concurrency: int = 32
    policy_version: int = 0

    def __call__(self) -> Policy:
        from m2rl.agent.openai_policy import OpenAIPolicy

        return OpenAIPolicy(self.base_url, self.model, timeout_s=self.timeout_s, max_concurrency=self.max_concurrency,
                            policy_version=self.policy_version)
