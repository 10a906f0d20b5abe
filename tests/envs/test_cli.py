"""`m2rl tasks list|show|sample`."""

from __future__ import annotations

import argparse
import json

import pytest
from m2rl.envs import cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="m2rl")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_list_families_and_tasks(capsys) -> None:
    assert run(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "shell    count_matches, sort_uniq, rename_ext, csv_column, largest_file" in out
    assert "python   arith, sum_primes, sha256, fib_mod, collatz" in out
    assert run(["tasks", "list", "--family", "python", "--count", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("python/arith/9 ")


def test_show_prints_the_hidden_answer(capsys) -> None:
    assert run(["tasks", "show", "python/arith/9", "--json"]) == 0
    task = json.loads(capsys.readouterr().out)
    assert task["answer"] == str(2 * 90 * 82) and task["split"] == "test"
    assert run(["tasks", "show", "shell/rename_ext/16"]) == 0
    assert "graded by a checker script" in capsys.readouterr().out


def test_sample_is_reproducible(capsys) -> None:
    assert run(["tasks", "sample", "--family", "python", "--seed", "3", "-n", "4", "--kinds", "arith"]) == 0
    first = capsys.readouterr().out
    assert run(["tasks", "sample", "--family", "python", "--seed", "3", "-n", "4", "--kinds", "arith"]) == 0
    assert capsys.readouterr().out == first and first.count("python/arith/") == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tasks", "show", "nope/x/1"], "unknown task family 'nope'"),
        (["tasks", "show", "python/x/1"], "unknown task id 'python/x/1'"),
        (["tasks", "sample", "--family", "python", "--kinds", "zzz"], "unknown task kinds ['zzz']"),
        (["tasks", "list", "--family", "zzz"], "unknown task family 'zzz'"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, argv: list[str], message: str) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tasks", "list", "--family", "python", "--count", "100000000"],
         "--count must be between 0 and 10000, got 100000000"),
        (["tasks", "list", "--family", "python", "--count", "-1"], "--count must be between 0 and 10000, got -1"),
        (["tasks", "sample", "--family", "python", "-n", "-1"], "-n/--count must be between 1 and 10000, got -1"),
        (["tasks", "sample", "--family", "python", "-n", "0"], "-n/--count must be between 1 and 10000, got 0"),
    ],
)
def test_counts_out_of_range_are_errors(capsys, argv: list[str], message: str) -> None:
    assert run(argv) == 2
    assert capsys.readouterr().err == f"m2rl: error: {message}\n"


# ------------------------------------------------------------------ --env: any env's own task set

JSON_FIXER = "m2rl.envs.examples.json_fixer:m2rl/JsonFixer-v0"


def test_a_custom_env_lists_shows_and_samples_its_tasks(capsys) -> None:
    from m2rl.envs.examples.json_fixer import JsonFixerTasks

    assert run(["tasks", "list", "--env", JSON_FIXER, "--count", "3"]) == 0
    ids = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert ids == [task.id for task in JsonFixerTasks().tasks("test", 3)]  # the env's own listing
    assert run(["tasks", "show", ids[0], "--env", JSON_FIXER, "--json"]) == 0
    task = json.loads(capsys.readouterr().out)
    assert task["split"] == "test" and task["checker"] and "/work/config.json" in task["files"]
    assert run(["tasks", "sample", "--env", JSON_FIXER, "--seed", "1", "-n", "2"]) == 0
    assert capsys.readouterr().out.count("json_fixer/fix/") == 2


def test_env_takes_a_registered_id_too(capsys) -> None:
    assert run(["tasks", "list", "--env", "m2rl/Python-v0", "--count", "2"]) == 0
    by_env = capsys.readouterr().out
    assert run(["tasks", "list", "--family", "python", "--count", "2"]) == 0
    assert capsys.readouterr().out == by_env


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tasks", "list", "--env", "m2rl/Nope-v0"], "unknown env 'm2rl/Nope-v0'"),
        (["tasks", "list", "--env", "no_such_module:m2rl/X-v0"], "unknown env 'no_such_module:m2rl/X-v0'"),
        (["tasks", "list", "--env", "CartPole-v1"], "env 'CartPole-v1' has no task set"),
        (["tasks", "show", "json_fixer/fix/3"], "(the tasks of another env: --env module:ID)"),
    ],
)
def test_env_errors_are_one_line(capsys, argv: list[str], message: str) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_family_and_env_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit):
        run(["tasks", "list", "--family", "python", "--env", "m2rl/Python-v0"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_tasks_commands_do_not_import_torch() -> None:
    """`m2rl tasks` is a quick look at the data: registering every command must not pull in torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from m2rl.cli import main\n"
        "code = main(['tasks', 'list', '--family', 'python', '--count', '1'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
