"""`m2rl eval`: a policy on an env's tasks, K samples each, N episodes at a time, resumable and deterministic.

    plan      = the env (made once: a bad id or option fails here), the task list, the family
    directory = runs/<name>/: new, or an earlier eval of the same settings to resume (eval.json says which)
    policy    = open_policy(spec)                     # loads, launches or probes; errors before any episode
    for each (task, sample) not in results.jsonl:    # P at a time over a pool of P envs
        seed    = hash(task id, sample, --seed)       # evaluation/seeds.py: never batch or timing
        episode = EpisodeRunner.episode(...)          # rl/rollout.py: a failing sandbox fails one episode
        append trajectory, then result (fsynced)      # evaluation/records.py
    rewrite both files in task order; write the report (evaluation/report.py)

A rerun with the same --name skips every finished (task, sample) pair, so a crash or Ctrl-C loses only the
episodes in flight, and the report covers all of them. A server that stops answering (or dies) stops the
eval rather than failing every remaining episode: rerun to continue. Failed episodes (a sandbox error) are
recorded as such, unresolved; `--retry-errors` runs them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m2rl.agent.loop import LoopConfig
from m2rl.agent.policy import PolicyUnavailableError, SamplingParams
from m2rl.envs.tasks.base import Task
from m2rl.evaluation.records import EpisodeRecord, EvalFiles, episode_key, episode_record, trajectory_line
from m2rl.evaluation.seeds import episode_seed
from m2rl.evaluation.spec import EvalPolicy, ModeChoice, OpenOptions, open_policy, parse_policy_spec
from m2rl.runs import Run, atomic_write, default_run_name, progress, run_name_problem

logger = logging.getLogger(__name__)

SETTINGS_FILE = "eval.json"  # what the eval was asked, to refuse resuming it with other settings
DEFAULT_TASKS = 32


class EvalError(ValueError):
    """The eval cannot run as asked (an env, task or run-directory problem); the message says what to change."""


class EvalStopped(RuntimeError):
    """The policy's server stopped answering mid-eval: finished episodes are kept; rerun to continue."""


@dataclass
class EvalConfig:
    """An eval, as `m2rl eval` flags give it."""

    env: str
    """Gymnasium id of the env (m2rl/Python-v0, m2rl/SWE-v0, or module:ID)."""
    policy: str
    """local:PATH | vllm:PATH | openai:BASE_URL[#MODEL] | scripted:NAME (evaluation/spec.py)."""
    split: str = "test"
    """Task split the tasks come from."""
    tasks: int = DEFAULT_TASKS
    """The first N tasks of the split (ignored with task_ids)."""
    task_ids: list[str] = field(default_factory=list)
    """Exactly these tasks, in this order."""
    samples: int = 1
    """Episodes per task (K): pass@1..K is reported."""
    parallel: int = 4
    """Episodes at once (envs in the pool)."""
    name: str = ""
    """Run name: outputs go to <run_root>/<name>/; an existing eval of that name is resumed. Empty: eval-<time>."""
    run_root: str = "runs"
    seed: int = 0
    """Seeds every episode's sampling together with its task and sample index."""
    temperature: float = 1.0
    """Sampling temperature; 0: greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 512
    """Tokens the policy may sample per turn."""
    max_turns: int | None = None
    """Turns per episode; None: the env's own max_steps."""
    max_context_tokens: int = 32768
    """Prompt and everything appended, capped further by the model's context when it is known."""
    time_limit_s: float | None = None
    """Wall clock per episode; None: none."""
    env_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the env's constructor (key=value on the command line, like env.options in training)."""
    mode: ModeChoice = "auto"
    """openai: auto | token | chat."""
    tokenizer: str | None = None
    """tokenizer.json (or a directory with one) when the model's own cannot be found (hosted models)."""
    device: str = "cpu"
    """Torch device of a local: policy."""
    threads: int = 0
    """CPU threads torch may use; 0: its default."""
    price_in: float | None = None
    """USD per 1M input tokens (each turn's whole prompt), for the report's cost."""
    price_out: float | None = None
    """USD per 1M sampled tokens."""
    retry_errors: bool = False
    """Run failed episodes of a resumed eval again."""
    show_progress: bool = True

    def __post_init__(self) -> None:
        problems = [p for p in (
            self.samples < 1 and f"--samples must be >= 1, got {self.samples}",
            self.parallel < 1 and f"--parallel must be >= 1, got {self.parallel}",
            not self.task_ids and self.tasks < 1 and f"--tasks must be >= 1, got {self.tasks}",
            self.temperature < 0 and f"--temperature must be >= 0, got {self.temperature}",
            not 0 < self.top_p <= 1 and f"--top-p must be in (0, 1], got {self.top_p}",
            self.max_new_tokens < 1 and f"--max-new-tokens must be >= 1, got {self.max_new_tokens}",
            self.mode not in ("auto", "token", "chat") and f"--mode must be auto, token or chat, got {self.mode!r}",
            len(set(self.task_ids)) != len(self.task_ids) and "--task-ids names a task twice",
        ) if p]
        if problems:
            raise EvalError("; ".join(problems))

    def settings(self) -> dict[str, Any]:
        """What decides the results: a resumed eval must have the same (parallelism, name, prices may change)."""
        keys = ("env", "policy", "split", "tasks", "task_ids", "samples", "seed", "temperature", "top_p",
                "max_new_tokens", "max_turns", "max_context_tokens", "time_limit_s", "env_options", "mode", "tokenizer")
        plain = asdict(self)
        return {key: plain[key] for key in keys}

    def sampling(self, eos_id: int) -> SamplingParams:
        greedy = self.temperature == 0
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=1.0 if greedy else self.temperature,
                              top_p=self.top_p, stop_ids=(eos_id,), greedy=greedy)


@dataclass
class EvalPlan:
    """The env and the tasks an eval plays, checked before anything else is done."""

    make_env: Callable[[], Any]
    first_env: Any  # made while checking; the pool's first env
    tasks: list[Task]
    family: str
    max_turns: int


@dataclass(frozen=True)
class Job:
    task: Task
    group: int  # the task's index in the plan
    sample: int
    seed: int


@dataclass
class EvalOutcome:
    directory: Path
    records: list[EpisodeRecord]
    ran: int  # episodes run by this invocation (the rest were finished before)
    summary: dict[str, Any]


def run_eval(config: EvalConfig) -> EvalOutcome:
    """The whole eval; every check comes before the run directory is written (see the module docstring)."""
    spec = parse_policy_spec(config.policy)
    if config.threads > 0:
        import torch

        torch.set_num_threads(config.threads)
    name = config.name or default_run_name("eval", config.run_root)
    if problem := run_name_problem(name):
        raise EvalError(problem)
    directory = Path(config.run_root) / name
    plan = plan_eval(config)
    policy: EvalPolicy | None = None
    envs: list[Any] = [plan.first_env]
    try:
        resumed = check_directory(directory, config)
        options = OpenOptions(parallel=config.parallel, device=config.device, mode=config.mode,
                              tokenizer=config.tokenizer)
        policy = open_policy(spec, options, plan.family)
        with (Run.open(name, config.run_root, trackers=()) if resumed
              else Run.create(name, config.run_root, trackers=())) as run:
            atomic_write(directory / SETTINGS_FILE, json.dumps(config.settings(), indent=2) + "\n")
            run.logger.info("eval of %s on %s (%d tasks x %d samples), policy %s", config.env,
                            config.split, len(plan.tasks), config.samples, policy.description)
            files = EvalFiles(directory)
            done = files.load(config.retry_errors)
            jobs = pending_jobs(plan.tasks, config.samples, config.seed, set(done))
            ran = run_jobs(jobs, plan, policy, files, config, envs, already=len(done))
            records = finish_files(files, plan.tasks, config.samples)
            from m2rl.evaluation.report import write_report

            summary = write_report(directory, records, files.trajectories(), report_context(config, name, policy))
            return EvalOutcome(directory, records, ran, summary)
    finally:
        close_envs(envs)
        if policy is not None:
            policy.close()


def plan_eval(config: EvalConfig) -> EvalPlan:
    """Make one env (the id, its options and its sandbox backend are checked) and pick the tasks."""
    from m2rl.rl.preflight import _env_id_problem
    from m2rl.rl.trainer import EnvFactory

    if problem := _env_id_problem(config.env):
        raise EvalError(problem.replace("env.id:", "--env:", 1))
    factory = EnvFactory(config.env, {"split": config.split, **config.env_options})
    try:
        env = factory()
    except Exception as exc:  # an unknown option, a missing dependency of the env: the user's to fix
        raise EvalError(f"--env {config.env} cannot be built with {config.env_options or 'no options'}: "
                        f"{type(exc).__name__}: {exc}") from exc
    try:
        unwrapped = env.unwrapped
        if problem := sandbox_problem(getattr(unwrapped, "backend", None)):
            raise EvalError(problem)
        tasks = select_tasks(factory.task_set, config, getattr(getattr(unwrapped, "config", None), "kinds", None))
        max_steps = getattr(getattr(unwrapped, "config", None), "max_steps", None)
        max_turns = config.max_turns or (int(max_steps) if max_steps else LoopConfig.max_turns)
    except BaseException:
        env.close()
        raise
    return EvalPlan(factory, env, tasks, factory.task_set.family, max_turns)


def sandbox_problem(backend: Any) -> str | None:
    """Whether the env's sandbox backend can start here (checked now, not at the first episode's reset)."""
    if backend == "bwrap" and shutil.which("bwrap") is None:
        return "the env's sandbox backend bwrap is not installed (apt-get install bubblewrap, or pass backend=docker)"
    if backend == "docker":
        from m2rl.sandboxes.docker_backend import engine_available

        if not engine_available():
            return "the env's sandbox backend docker is not reachable (start dockerd, or pass backend=bwrap)"
    return None


def select_tasks(task_set: Any, config: EvalConfig, kinds: Any) -> list[Task]:
    if config.task_ids:
        tasks = []
        for task_id in config.task_ids:
            try:
                tasks.append(task_set.get(task_id))
            except (KeyError, ValueError) as exc:
                raise EvalError(f"--task-ids: {exc.args[0] if exc.args else exc}") from None
        return tasks
    try:
        tasks = task_set.tasks(config.split, config.tasks, kinds=tuple(kinds) if kinds else None)
    except ValueError as exc:
        raise EvalError(f"--split {config.split}: {exc}") from None
    if not tasks:
        raise EvalError(f"{config.env} has no tasks in split {config.split!r}")
    return list(tasks)


def check_directory(directory: Path, config: EvalConfig) -> bool:
    """True when `directory` holds an eval of the same settings to resume; EvalError when it holds anything
    else. Reads only: nothing is written before the policy has been opened."""
    settings_path = directory / SETTINGS_FILE
    if not settings_path.is_file():
        if directory.is_dir() and any(directory.iterdir()):
            raise EvalError(f"{directory} already exists and is not an eval; choose another --name")
        return False
    try:
        before = json.loads(settings_path.read_text())
    except ValueError as exc:
        raise EvalError(f"{settings_path} is not valid JSON ({exc}); choose another --name") from None
    now = json.loads(json.dumps(config.settings()))  # the same plain types as the file
    changed = [f"{key} ({before.get(key)!r} -> {now[key]!r})" for key in now if before.get(key) != now[key]]
    if changed:
        raise EvalError(f"{directory} is an eval of other settings: {', '.join(changed)}; rerun it with its "
                        "settings to resume it, or choose another --name")
    return True


def pending_jobs(tasks: list[Task], samples: int, seed: int, done: set[str]) -> list[Job]:
    return [Job(task, group, sample, episode_seed(task.id, sample, seed))
            for group, task in enumerate(tasks) for sample in range(samples)
            if episode_key(task.id, sample) not in done]


def run_jobs(jobs: list[Job], plan: EvalPlan, policy: EvalPolicy, files: EvalFiles, config: EvalConfig,
             envs: list[Any], already: int) -> int:
    """Run `jobs` `config.parallel` at a time, recording each as it finishes; the number run."""
    from m2rl.rl.interrupts import run_async
    from m2rl.rl.rollout import EpisodeRunner

    if not jobs:
        return 0
    fresh = iter([plan.first_env])

    def make_env() -> Any:  # the env made while planning first, then new ones (tracked so all are closed)
        env = next(fresh, None) or plan.make_env()
        if env is not plan.first_env:
            envs.append(env)
        return policy.wrap_env(env)

    runner = EpisodeRunner(make_env, min(config.parallel, len(jobs)), policy.tokenizer)
    context = min(config.max_context_tokens, policy.max_context_tokens or config.max_context_tokens)
    loop_config = LoopConfig(max_turns=plan.max_turns, max_context_tokens=context, time_limit_s=config.time_limit_s)
    params = config.sampling(policy.tokenizer.eos_id)
    total = already + len(jobs)
    with progress(f"eval {files.directory.name}", total=total, disable=not config.show_progress) as advance:
        advance(already)
        run_async(_run_jobs(jobs, runner, policy, files, params, loop_config, advance))
    return len(jobs)


async def _run_jobs(jobs: list[Job], runner: Any, policy: EvalPolicy, files: EvalFiles, params: SamplingParams,
                    loop_config: LoopConfig, advance: Callable[..., None]) -> None:
    free: asyncio.Queue[Any] = asyncio.Queue()
    for env in runner.envs:
        free.put_nowait(env)
    resolved = [sum(r.resolved for r in files.records.values())]

    async def one(job: Job) -> None:
        env = await free.get()
        episode_policy = policy.episode_policy(env, job.seed)
        start = time.perf_counter()
        try:
            scored, env = await runner.episode(env, episode_policy, job.task.id, job.group, params, loop_config)
        finally:
            free.put_nowait(env)
        if scored.failed:
            await stop_if_policy_is_down(policy, episode_policy)
        record = episode_record(scored, job.sample, family=job.task.family, kind=job.task.kind,
                                wall_s=time.perf_counter() - start, seed=job.seed, policy_version=policy.version,
                                server_usage=getattr(episode_policy, "usage", None))
        files.append(record, trajectory_line(scored.trajectory, job.task.id, job.sample))
        resolved[0] += record.resolved
        advance(1, status=f"resolved {resolved[0]}/{len(files.records)}")

    try:
        async with asyncio.TaskGroup() as group:  # one fatal error cancels the episodes still running
            for job in jobs:
                group.create_task(one(job))
    except BaseExceptionGroup as failed:  # the first error as itself: a dead server is a one-line user error
        raise failed.exceptions[0] from None
    finally:
        await policy.aclose()


async def stop_if_policy_is_down(policy: EvalPolicy, episode_policy: Any) -> None:
    """A failed episode whose policy server died or stopped answering is not the episode's failure: stop."""
    await asyncio.to_thread(policy.check_alive)  # a launched server that died raises with its log tail
    failure = getattr(episode_policy, "failure", None)
    if isinstance(failure, PolicyUnavailableError):
        raise EvalStopped(f"the policy stopped answering ({failure}); the finished episodes are kept: rerun the "
                          "same command to continue")


def finish_files(files: EvalFiles, tasks: list[Task], samples: int) -> list[EpisodeRecord]:
    """Rewrite results and trajectories in (task, sample) order: the same settings give the same files."""
    order = {episode_key(task.id, sample): i for i, (task, sample) in
             enumerate((task, sample) for task in tasks for sample in range(samples))}
    records = sorted((r for r in files.records.values() if r.key in order), key=lambda r: order[r.key])
    trajectories = files.trajectories()
    files.rewrite(records, [trajectories[r.key] for r in records if r.key in trajectories])
    return records


def report_context(config: EvalConfig, name: str, policy: EvalPolicy) -> dict[str, Any]:
    """What the report says about the eval besides its episodes."""
    return {"name": name, "env": config.env, "split": config.split, "policy": config.policy,
            "policy_description": policy.description, "mode": policy.mode, "samples": config.samples,
            "seed": config.seed, "temperature": config.temperature, "price_in": config.price_in,
            "price_out": config.price_out}


def close_envs(envs: list[Any]) -> None:
    for env in envs:
        try:
            env.close()
        except Exception:
            logger.debug("closing an env failed", exc_info=True)
