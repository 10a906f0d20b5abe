"""Task generation: determinism, disjoint splits, reference answers checked against independent oracles."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import pytest
from m2rl.envs.tasks import get_task_set
from m2rl.envs.tasks.base import normalize_answer, split_of
from m2rl.envs.tasks.python_tasks import (
    PythonTaskSet,
    arith_expression,
    collatz_steps,
    eval_arith,
    fib_mod,
    sum_primes_below,
)
from m2rl.envs.tasks.shell import ShellTaskSet


@pytest.mark.parametrize("task_set", [ShellTaskSet(), PythonTaskSet()], ids=lambda t: t.family)
def test_splits_disjoint_and_deterministic(task_set) -> None:
    train = set(task_set.seeds("train", 300))
    test = set(task_set.seeds("test", 60))
    assert not train & test
    assert all(split_of(task_set.family, s) == "test" for s in test)
    for task in task_set.tasks("test", 10):
        assert task.split == "test"
        assert task_set.get(task.id) == task  # the id regenerates the task exactly
    fractions = sum(split_of(task_set.family, s) == "test" for s in range(2000)) / 2000
    assert 0.15 < fractions < 0.25
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [task_set.sample("train", rng_a) for _ in range(5)] == [
        task_set.sample("train", rng_b) for _ in range(5)
    ]


def test_sample_respects_split_and_kinds() -> None:
    ts = PythonTaskSet()
    rng = random.Random(0)
    for _ in range(30):
        task = ts.sample("test", rng, kinds=("arith",))
        assert task.split == "test" and task.kind == "arith"
        assert task.prompt == f"Compute `{task.meta['expr']}` with the python tool and submit the result."


@pytest.mark.parametrize(
    "bad", ["python/arith", "python/nope/3", "shell/arith/3", "python/arith/-1", "python/arith/x"]
)
def test_bad_task_ids(bad: str) -> None:
    with pytest.raises(KeyError, match="unknown task id"):
        PythonTaskSet().get(bad)


def test_get_task_set_unknown_family() -> None:
    with pytest.raises(KeyError, match="unknown task family 'zzz'"):
        get_task_set("zzz")


def test_arith_matches_python_eval() -> None:
    for seed in range(500):
        expr = arith_expression(random.Random(seed))
        assert eval_arith(expr) == eval(expr)


def naive_is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def test_number_theory_references() -> None:
    for n in [0, 1, 2, 3, 10, 100, 997, 2000]:
        assert sum_primes_below(n) == sum(i for i in range(n) if naive_is_prime(i))
    fib = [0, 1]
    for _ in range(300):
        fib.append(fib[-1] + fib[-2])
    for k in [0, 1, 2, 10, 299]:
        assert fib_mod(k, 1_000_003) == fib[k] % 1_000_003
    assert collatz_steps(1) == 0 and collatz_steps(27) == 111 and collatz_steps(97) == 118


def test_python_answers_by_an_independent_subprocess() -> None:
    """sha256 / sum_primes answers recomputed by a separate interpreter (different code path)."""
    tasks = [t for t in PythonTaskSet().tasks("test", 10) if t.kind in ("sha256", "sum_primes")]
    for task in tasks:
        if task.kind == "sha256":
            assert task.answer == hashlib.sha256(task.meta["text"].encode()).hexdigest()[:16]
        else:
            code = (
                f"import sys; n={task.meta['n']}; print(sum(p for p in range(2, n) "
                "if all(p % d for d in range(2, int(p**0.5) + 1))))"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert out.stdout.strip() == task.answer


def test_shell_checkers_embed_expected_values_only_in_checker() -> None:
    for task in ShellTaskSet().tasks("test", 10):
        assert task.answer is None and task.checker
        assert "EXPECTED = json.loads(" in task.checker
        compile(task.checker, task.id, "exec")
        assert all(path.startswith("/work/") for path in task.files)
        json.dumps(task.files)


@pytest.mark.parametrize(
    "given, expected, same",
    [
        (" 42\n", "42", True),
        ("`42`", "42", True),
        ("'abc'", "abc", True),
        ("042", "42", True),
        ("42.0", "42", False),
        ("ABC", "abc", False),
        ("", "0", False),
    ],
)
def test_normalize_answer(given: str, expected: str, same: bool) -> None:
    assert (normalize_answer(given) == normalize_answer(expected)) is same
