"""Ordinary user mistakes give exactly one line `m2rl: error: <message>` and a non-zero exit, never a
traceback, and `m2rl train` checks the whole configuration before it creates a run directory."""

from __future__ import annotations

import os
from collections.abc import Callable
import subprocess
import sys
from pathlib import Path

import pytest

from m2rl import doctor
from m2rl.cli import main

REPO = Path(__file__).resolve().parents[1]
M2RL = Path(sys.executable).parent / "m2rl"
TINY_SFT = REPO / "model" / "assets" / "tiny-python-sft"


# Small enough that a check which fails to stop the run costs seconds, not the main job's minutes.
SMALL = ["model.init=null", "steps=1", "eval.num_tasks=2", "eval.samples_per_task=1", "rollout.num_envs=2",
         "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.batch_warmup.start_size=2",
         "rollout.batch_warmup.target_size=2", "rollout.batch_warmup.multiple_of=2", "env.max_steps=1",
         "env.num_train_tasks=4", "threads=1"]


def train(tmp_path: Path, *overrides: str) -> int:
    return main(["train", *SMALL, f"run_root={tmp_path / 'runs'}", "name=r", *overrides])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("m2rl: error: "), err
    assert "Traceback" not in err
    return err.removeprefix("m2rl: error: ").rstrip("\n")


def copy_checkpoint(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    for item in TINY_SFT.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def registered() -> str:
    import m2rl.envs

    return ", ".join(m2rl.envs.registered_ids())


def bad_values() -> list[tuple[list[str], str]]:
    return [
        (["env.sandbox=nope"], "env.sandbox: unknown sandbox backend 'nope'; choose one of docker, bwrap, auto"),
        # The list is read when the test runs: other tests' imports register envs (m2rl/WordCount-v0 ...).
        (["env.id=m2rl/Nope-v0"], lambda: f"env.id: no environment 'm2rl/Nope-v0' is registered; m2rl envs: {registered()}"),
        (["env.id=nosuchmodule:m2rl/Python-v0"],
         "env.id: cannot import module 'nosuchmodule' of 'nosuchmodule:m2rl/Python-v0': No module named 'nosuchmodule'"),
        (["env.id=CartPole-v1"],
         "env.id: 'CartPole-v1' is not an m2rl tool environment (register it with m2rl.envs.register_env "
         "under the 'm2rl/' namespace)"),
        (["name=../x"], "name: bad run name '../x': use letters, digits, '.', '_' and '-'"),
        (["model.preset=nope"], "model.preset: unknown preset 'nope'; choose from ['m2', 'm2-mini', 'tiny']"),
        (["device=tpu"], "device: unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
        (["env.kinds=[arith, zzz]"], "env.kinds: m2rl/Python-v0 has no task kind(s) ['zzz']; known: "
                                      "['arith', 'sum_primes', 'sha256', 'fib_mod', 'collatz']"),
        (["rollout.num_envs=0"], "rollout.num_envs: must be >= 1, got 0"),
        (["eval.num_tasks=0"], "eval.num_tasks: must be >= 1, got 0"),
        (["rollout.temperature=0"], "rollout.temperature: must be > 0, got 0.0"),
    ]


@pytest.mark.parametrize("overrides, message", bad_values())
def test_bad_values_are_one_line_and_make_no_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     overrides: list[str], message: str | Callable[[], str]) -> None:
    assert train(tmp_path, *overrides) == 2
    assert one_error_line(capsys) == (message() if callable(message) else message)
    assert not (tmp_path / "runs").exists()


def test_cuda_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert train(tmp_path, "device=cuda") == 2
    assert one_error_line(capsys) == f"device: 'cuda' needs a CUDA GPU, but torch {torch.__version__} sees none"
    assert not (tmp_path / "runs").exists()


def test_several_problems_are_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, "env.sandbox=nope", "name=../x") == 2
    assert one_error_line(capsys) == (
        "2 problems in the configuration: env.sandbox: unknown sandbox backend 'nope'; choose one of docker, "
        "bwrap, auto; name: bad run name '../x': use letters, digits, '.', '_' and '-'"
    )


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_unreadable_init_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    ckpt = copy_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        reason = "incomplete metadata, file not fully covered"
    elif damage == "garbage":
        weights.write_bytes(b"not a safetensors file" * 10)
        reason = "header too large"
    else:
        ckpt = tmp_path / "nowhere"
    assert train(tmp_path, f"model.init={ckpt}") == 2
    message = one_error_line(capsys)
    if damage == "missing":
        assert message == (f"model.init: checkpoint directory not found: {ckpt} (build one with "
                           "`python -m m2rl.rl.warm_start all --out PATH` or set model.init=null)")
    else:
        assert message == (f"model.init: {weights} is not a readable safetensors file "
                           f"(Error while deserializing header: {reason})")
    assert not (tmp_path / "runs").exists()


def test_garbage_config_json_in_init_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / "config.json").write_bytes(b"\xff\xfe garbage")
    assert train(tmp_path, f"model.init={ckpt}") == 2
    assert one_error_line(capsys).startswith(f"model.init: {ckpt / 'config.json'} is not valid JSON")


def test_non_utf8_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"steps: 2\nname: caf\xe9\n")
    assert main(["train", "--config", str(config)]) == 2
    assert one_error_line(capsys) == f"config file {config} is not UTF-8 text (byte 0xe9 on line 2, offset 18)"


def test_duplicate_yaml_key_names_key_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "dup.yaml"
    config.write_text("steps: 2\nenv:\n  id: m2rl/Python-v0\n  max_steps: 2\n  id: m2rl/Shell-v0\n")
    assert main(["train", "--config", str(config)]) == 2
    assert one_error_line(capsys) == f"duplicate key 'env.id' in {config} line 5 (first set on line 3)"


def test_garbage_meta_json_in_the_checkpoint_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step = tmp_path / "runs" / "r" / "checkpoints" / "step_000000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_bytes(b"\x00garbage{")
    assert train(tmp_path, "resume=true", "steps=2") == 2
    assert one_error_line(capsys).startswith(
        f"no readable checkpoint in {step.parent}: step_000000001: meta.json is not valid JSON")


def test_bad_image_spec_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nfiles: [1, 2\n")
    assert main(["images", "build", str(spec)]) == 1
    assert one_error_line(capsys).startswith(f"image spec {spec}: bad YAML line 3, column 1:")
    spec.write_text("name: x\nfiles: [a, b]\n")
    assert main(["images", "build", str(spec)]) == 1
    assert one_error_line(capsys) == f"image spec {spec}: 'files' must be a mapping"
    spec = tmp_path / "bad.json"
    spec.write_bytes(b"\xff{")
    assert main(["images", "build", str(spec)]) == 1
    assert one_error_line(capsys) == f"image spec {spec} is not UTF-8 text (byte 0xff on line 1, offset 0)"


def test_base_only_with_specs_uses_the_one_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["images", "build", "--base-only", "x.yaml"]) == 2
    assert one_error_line(capsys) == "--base-only takes no SPEC arguments"


def test_usage_errors_use_the_one_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert one_error_line(capsys) == "unrecognized arguments: --no-such-flag (see `m2rl --help`)"


def test_real_entry_point_hides_the_traceback_unless_debug(tmp_path: Path) -> None:
    args = [str(M2RL), "train", f"run_root={tmp_path}", "env.sandbox=nope"]
    env = {k: v for k, v in os.environ.items() if k != "M2RL_DEBUG"}
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 2
    assert quiet.stderr == "m2rl: error: env.sandbox: unknown sandbox backend 'nope'; choose one of docker, bwrap, auto\n"
    loud = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**env, "M2RL_DEBUG": "1"})
    assert loud.returncode == 2
    assert "Traceback" in loud.stderr and loud.stderr.endswith(quiet.stderr)


def test_unexpected_exceptions_are_one_line_too(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from m2rl import cli

    def broken(args: object) -> int:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "_cmd_version", broken)
    assert main(["version"]) == 1
    assert one_error_line(capsys) == (
        "unexpected RuntimeError: something broke (run with --debug or M2RL_DEBUG=1 for the traceback)")


def test_doctor_lists_every_problem_of_the_config(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Only the configuration matters here: the component checks are replaced by one quick fake.
    monkeypatch.setattr(doctor, "CHECKS", {"transformers": lambda: doctor.CheckResult("transformers", True, "ok")})
    # one value per key (env.id and env.kinds are checked only once the sandbox backend is valid)
    cases = [(case, message) for case, message in bad_values() if not case[0].startswith(("env.id", "env.kinds"))]
    assert main(["doctor", *[override for case, _ in cases for override in case]]) == 1
    out = " ".join(capsys.readouterr().out.split())
    for _, message in cases:
        assert f"configuration problem: {message}" in out, message


def test_doctor_accepts_a_good_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(doctor, "CHECKS", {"transformers": lambda: doctor.CheckResult("transformers", True, "ok")})
    monkeypatch.setattr(doctor, "required_components", lambda raw: {"transformers"})
    assert main(["doctor", "name=fine"]) == 0
    assert "configuration problem" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["tasks", "list", "--family", "python", "--count", "100000000"],
     "--count must be between 0 and 10000, got 100000000"),
    (["tasks", "sample", "--family", "python", "-n", "-1"], "-n/--count must be between 1 and 10000, got -1"),
    (["tasks", "sample", "--family", "python", "-n", "100000000"],
     "-n/--count must be between 1 and 10000, got 100000000"),
])
def test_task_counts_are_bounded(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    assert one_error_line(capsys) == message


def test_count_error_from_the_real_entry_point() -> None:
    result = subprocess.run([str(M2RL), "tasks", "sample", "--family", "python", "-n", "-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "m2rl: error: -n/--count must be between 1 and 10000, got -1\n"


def test_a_pipeline_checks_every_stage_directory_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    used = tmp_path / "p-rl-short"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    argv = ["train", "--config", str(REPO / "configs" / "pipeline.yaml"), f"run_root={tmp_path}", "name=p"]
    assert main(argv) == 2
    assert one_error_line(capsys) == (f"run directory {used} already exists (stage 'rl-short'); choose another name=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p-rl-short"]  # the SFT stages did not start
    assert main([*argv, "name=q", "resume=true"]) == 2
    assert one_error_line(capsys) == ("resume=true is not supported for a multi-stage pipeline (stages); resume "
                                      "one RL stage as a single run instead")
