"""`m2rl eval` end to end on real envs: the scripted oracles' known scores, resuming after a crash or Ctrl-C, and
the same seed giving the same results with a sampling policy."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from m2rl.cli import main
from m2rl.evaluation.report import TIMING_KEY
from m2rl.evaluation.runner import EvalConfig, run_eval

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "model" / "assets" / "tiny-python-sft")


def results(directory: Path, drop: tuple[str, ...] = ("wall_s",)) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (directory / "results.jsonl").read_text().splitlines()]


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without what depends on the machine (timing) or names the run."""
    return {k: v for k, v in summary.items() if k not in (TIMING_KEY, "name")}


@pytest.mark.bwrap
@pytest.mark.parametrize("env", ["m2rl/Python-v0", "m2rl/Shell-v0"])
def test_scripted_expert_resolves_everything_and_wrong_nothing(env: str, tmp_path: Path) -> None:
    """The envs' acceptance oracles (tests/envs/test_experts.py) through the eval: exactly 1 and exactly 0."""
    # five tasks: one of each kind of the family
    common = {"env": env, "tasks": 5, "parallel": 2, "run_root": str(tmp_path), "show_progress": False}
    expert = run_eval(EvalConfig(policy="scripted:expert", name="expert", **common))
    wrong = run_eval(EvalConfig(policy="scripted:wrong", name="wrong", **common))
    assert [r.resolved for r in expert.records] == [True] * 5 and [r.score for r in expert.records] == [1.0] * 5
    assert [r.resolved for r in wrong.records] == [False] * 5 and [r.score for r in wrong.records] == [0.0] * 5
    assert expert.summary["resolved_rate"] == 1.0 and wrong.summary["resolved_rate"] == 0.0
    assert expert.summary["pass_at_k"] == {"1": 1.0} and wrong.summary["pass_at_k"] == {"1": 0.0}
    assert {r.exit_reason for r in expert.records} == {"terminated"} and expert.summary["failed"] == 0
    assert all(r.reward_breakdown["resolved"] == 1.0 for r in expert.records)
    assert all(r.reward <= 0.5 for r in wrong.records)  # dense shaping is all a wrong policy earns
    # the files: a record and a trajectory per episode, in task order; the report; the viewer
    directory = tmp_path / "expert"
    keys = [r.key for r in expert.records]
    trajectories = [json.loads(line) for line in (directory / "trajectories.jsonl").read_text().splitlines()]
    assert [t["metadata"]["key"] for t in trajectories] == keys == [f"{r.task_id}#0" for r in expert.records]
    from m2rl.agent.trajectory import load_jsonl

    loaded = load_jsonl(directory / "trajectories.jsonl")  # agent/trajectory.py reads the file as it is
    assert [t.metadata["task_id"] for t in loaded] == [r.task_id for r in expert.records]
    for name in ("summary.json", "report.md", "report.html", "plots/resolved_by_group.png"):
        assert (directory / name).is_file(), name
    assert not (directory / "predictions.jsonl").exists()  # only SWE envs


def eval_command(root: Path, name: str, tasks: int = 8) -> list[str]:
    return ["eval", "--env", "m2rl/Python-v0", "--policy", "scripted:expert", "--tasks", str(tasks), "--parallel",
            "1", "--run-root", str(root), "--name", name, "--no-progress"]


def start_and_stop(command: list[str], directory: Path, after: int, sig: int) -> tuple[int, str]:
    """Start `m2rl <command>` in its own process group; send `sig` once `after` episodes are recorded."""
    # SIGINT as a terminal delivers it: a test run started in the background (`cmd &` in a script, as a CI job
    # may be) has SIGINT ignored, which children inherit, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "m2rl.cli", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    path = directory / "results.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the eval ended before it could be stopped: {proc.communicate()}"
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.bwrap
def test_a_killed_eval_resumes_without_redoing_episodes_and_reports_as_an_uninterrupted_one(tmp_path: Path) -> None:
    directory = tmp_path / "killed"
    code, _ = start_and_stop(eval_command(tmp_path, "killed"), directory, after=3, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    before = {r["trajectory"]: r for r in results(directory, drop=())}
    assert 3 <= len(before) < 8
    config = {"env": "m2rl/Python-v0", "policy": "scripted:expert", "tasks": 8, "parallel": 2,
              "run_root": str(tmp_path), "show_progress": False}
    resumed = run_eval(EvalConfig(name="killed", **config))
    assert resumed.ran == 8 - len(before)
    after = {r["trajectory"]: r for r in results(directory, drop=())}
    assert all(after[key] == record for key, record in before.items())  # wall times too: not run again
    whole = run_eval(EvalConfig(name="whole", **config))
    assert results(directory) == results(tmp_path / "whole")
    assert comparable(resumed.summary) == comparable(whole.summary)
    assert comparable(json.loads((directory / "summary.json").read_text())) == comparable(whole.summary)
    # a third run of a finished eval runs nothing and reports the same
    assert run_eval(EvalConfig(name="killed", **config)).ran == 0


@pytest.mark.bwrap
def test_ctrl_c_keeps_the_finished_episodes_and_says_how_to_resume(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "stopped"
    # enough tasks that the eval cannot finish between the signal and its handling on a loaded machine (with 6,
    # a CI run under load recorded all 6 before the SIGINT took effect and exited 0)
    tasks = 30
    code, err = start_and_stop(eval_command(tmp_path, "stopped", tasks=tasks), directory, after=2, sig=signal.SIGINT)
    assert code == 130, err
    note = next(line for line in err.splitlines() if "resume with:" in line)
    assert "interrupted by SIGINT" in note and "--name stopped" in note
    kept = len(results(directory))
    assert kept >= 2
    command = shlex.split(note.split("resume with: ", 1)[1])
    assert command[:2] == ["m2rl", "eval"]
    assert main(command[1:]) == 0
    out = capsys.readouterr()
    assert f"{tasks - kept} episodes run, {kept} were finished before" in out.err
    assert json.loads(out.out.splitlines()[-1])["resolved"] == tasks


@pytest.mark.bwrap
def test_same_seed_same_results_whatever_the_parallelism_and_another_seed_differs(tmp_path: Path) -> None:
    """A sampling (temperature 1) local policy: the seed decides every token, the batch never does."""
    common = {"env": "m2rl/Python-v0", "policy": f"local:{TINY}", "tasks": 2, "samples": 2, "max_new_tokens": 48,
                  "env_options": {"max_steps": 3}, "run_root": str(tmp_path), "show_progress": False, "threads": 1}
    run_eval(EvalConfig(name="a", parallel=4, seed=7, **common))
    run_eval(EvalConfig(name="b", parallel=1, seed=7, **common))
    run_eval(EvalConfig(name="c", parallel=4, seed=8, **common))
    a, b, c = (results(tmp_path / n) for n in "abc")
    assert a == b
    assert [r["seed"] for r in a] != [r["seed"] for r in c]
    trajectories = {n: [json.loads(line)["ids"] for line in (tmp_path / n / "trajectories.jsonl").open()]
                    for n in "abc"}
    assert trajectories["a"] == trajectories["b"]
    assert trajectories["a"] != trajectories["c"]  # the seed matters: sampling is not greedy here
    assert len({json.dumps(t) for t in trajectories["a"]}) >= 3  # the samples of a task are not copies


def test_a_policy_that_stops_answering_stops_the_eval_but_a_failing_sandbox_does_not() -> None:
    import asyncio
    from types import SimpleNamespace

    from m2rl.agent.policy import PolicyUnavailableError, SamplingParams
    from m2rl.evaluation.runner import EvalStopped, stop_if_policy_is_down
    from m2rl.evaluation.seeds import SeededPolicy

    class Down:
        async def generate(self, prompt_ids: list[int], params: SamplingParams) -> None:
            raise PolicyUnavailableError("http://x/v1/completions failed after 5 attempts")

    episode = SeededPolicy(Down(), seed=1)
    with pytest.raises(PolicyUnavailableError):
        asyncio.run(episode.generate([1, 2], SamplingParams(max_tokens=4)))
    alive = SimpleNamespace(check_alive=lambda: None)
    with pytest.raises(EvalStopped, match="stopped answering .* rerun the same command"):
        asyncio.run(stop_if_policy_is_down(alive, episode))  # type: ignore[arg-type]
    asyncio.run(stop_if_policy_is_down(alive, SeededPolicy(Down(), seed=2)))  # it never failed: the env did


def test_episode_seeds_depend_on_task_sample_and_seed_only() -> None:
    from m2rl.evaluation.seeds import SEED_RANGE, episode_seed, turn_seed

    seeds = {episode_seed(task, sample, seed) for task in ("a/b/1", "a/b/2") for sample in range(3) for seed in (0, 1)}
    assert len(seeds) == 12 and all(0 <= s < SEED_RANGE for s in seeds)
    assert episode_seed("a/b/1", 0, 0) == 1202060370  # fixed across processes and Python versions (sha256)
    assert turn_seed(5, 0) != turn_seed(5, 1)
