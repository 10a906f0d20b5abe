"""SCRIPTED POLICIES (not learned models): experts and wrong policies for the Shell and Python task families.

They are acceptance oracles for the envs (the expert must solve 100% of held-out tasks, the wrong policy
must score 0) and the demonstration source for SFT warm starts. A script is a generator over one task: it
yields the tool calls of the next assistant turn (`[(name, arguments)]`) and receives the text outputs of
those calls. The Python expert writes code from the task's generator parameters and submits what the
code PRINTED in the sandbox (never the task's hidden answer), so a broken tool or sandbox makes it fail.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Sequence
from typing import Any

from m2rl.agent.format import render_completion
from m2rl.envs.tasks.base import Task
from m2rl.envs.tasks.python_tasks import eval_arith

Call = tuple[str, dict[str, Any]]
Script = Generator[list[Call], list[str], None]
ScriptFn = Callable[[Task], Script]


def action_text(calls: list[Call], reasoning: str = "", enable_thinking: bool = True) -> str:
    """What a model would write for these calls: reasoning, `</think>`, the tool-call block, `[e~[`."""
    message = {
        "role": "assistant",
        "content": "",
        "reasoning_content": reasoning,
        "tool_calls": [{"name": name, "arguments": args} for name, args in calls],
    }
    return render_completion(message, enable_thinking=enable_thinking)


def run_script(
    env: Any, script: ScriptFn, seed: int | None = None, options: dict[str, Any] | None = None
) -> tuple[float, dict[str, Any], int]:
    """One episode of `script` on `env`; returns (total reward, last info, steps)."""
    env.reset(seed=seed, options=options)
    turns = script(env.unwrapped.task)
    calls = next(turns)
    total, steps = 0.0, 0
    while True:
        _, reward, terminated, truncated, info = env.step(action_text(calls, reasoning=expert_reasoning(calls)))
        total += reward
        steps += 1
        if terminated or truncated:
            return total, info, steps
        try:
            calls = turns.send([result["output"] for result in info["tool_results"]])
        except StopIteration:
            calls = [("submit", {"answer": ""})]


def expert_reasoning(calls: list[Call]) -> str:
    """The fixed reasoning line a scripted expert writes before its calls."""
    name = calls[0][0] if calls else ""
    return {
        "python": "I will compute this with the python tool.",
        "bash": "I will do this with a shell command.",
        "submit": "I have the result, so I submit it.",
        "str_replace_editor": "Let me look at the files.",
    }.get(name, "Next step.")


# ----------------------------------------------------------------------------- Python family

PYTHON_SOLUTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "arith": lambda m: f"print({m['expr']})",
    "sum_primes": lambda m: (
        f"n = {m['n']}\nsieve = [True] * n\nsieve[:2] = [False, False]\n"
        "for p in range(2, int(n ** 0.5) + 1):\n    if sieve[p]:\n"
        "        sieve[p * p::p] = [False] * len(range(p * p, n, p))\n"
        "print(sum(i for i, is_prime in enumerate(sieve) if is_prime))"
    ),
    "sha256": lambda m: f"import hashlib\nprint(hashlib.sha256({m['text']!r}.encode()).hexdigest()[:16])",
    "fib_mod": lambda m: (
        f"a, b = 0, 1\nfor _ in range({m['k']}):\n    a, b = b, (a + b) % {m['m']}\nprint(a)"
    ),
    "collatz": lambda m: (
        f"n, steps = {m['n']}, 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
        "    steps += 1\nprint(steps)"
    ),
}


def python_expert(task: Task) -> Script:
    outputs = yield [("python", {"code": PYTHON_SOLUTIONS[task.kind](task.meta)})]
    yield [("submit", {"answer": outputs[0].strip()})]


def python_mental_arith(task: Task) -> Script:
    """Answers an `arith` task from its own arithmetic, without the tool: correct, but a skill a small
    model imitates badly (it has to compute in its weights instead of copying the expression into code)."""
    if task.kind != "arith":
        raise ValueError(f"python_mental_arith only does arith tasks, got {task.kind!r}")
    yield [("submit", {"answer": str(eval_arith(task.meta["expr"]))})]


def python_wrong(task: Task) -> Script:
    """Guesses without computing: submits a non-number."""
    yield [("submit", {"answer": "I am not sure"})]


# ----------------------------------------------------------------------------- Shell family

SHELL_SOLUTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "count_matches": lambda m: (
        f"cat /work/logs/*.log | grep -c -- '{m['level']}' > /work/answer.txt; cat /work/answer.txt"
    ),
    "sort_uniq": lambda m: "LC_ALL=C sort -u /work/names.txt > /work/unique.txt && wc -l /work/unique.txt",
    "rename_ext": lambda m: 'cd /work/docs && for f in *.txt; do mv -- "$f" "${f%.txt}.md"; done; ls',
    "csv_column": lambda m: (
        f"tail -n +2 /work/data.csv | cut -d, -f{m['index']} > /work/column.txt; head -3 /work/column.txt"
    ),
    "largest_file": lambda m: (
        "cd /work/files && find . -type f -printf '%s %P\\n' | sort -n | tail -n 1 | "
        "cut -d' ' -f2- > /work/answer.txt; cat /work/answer.txt"
    ),
}


def shell_expert(task: Task) -> Script:
    yield [("bash", {"command": "ls -R /work | head -n 60"})]
    yield [("bash", {"command": SHELL_SOLUTIONS[task.kind](task.meta)})]
    yield [("submit", {"answer": "done"})]


def shell_wrong(task: Task) -> Script:
    """Looks around, then claims success without changing anything."""
    yield [("bash", {"command": "ls /work"})]
    yield [("submit", {"answer": "done"})]


def mixture(weighted: Sequence[tuple[ScriptFn, float]]) -> ScriptFn:
    """One script per task, picked by a stable hash of the task id with the given (relative) weights.

    Real SFT data mixes strategies; a mixture of experts lets a warm start carry several of them, in
    known proportions, for RL to choose between.
    """
    total = sum(weight for _, weight in weighted)
    if not weighted or total <= 0 or any(weight < 0 for _, weight in weighted):
        raise ValueError(f"mixture needs non-negative weights with a positive sum, got {[w for _, w in weighted]}")

    def pick(task: Task) -> Script:
        digest = hashlib.sha256(f"mixture/{task.id}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * total
        for script, weight in weighted:
            if point < weight:
                return script(task)
            point -= weight
        return weighted[-1][0](task)

    return pick


EXPERTS: dict[str, ScriptFn] = {"python": python_expert, "shell": shell_expert}
WRONG: dict[str, ScriptFn] = {"python": python_wrong, "shell": shell_wrong}
