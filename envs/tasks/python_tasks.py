"""Python task family: problems whose answer needs executed code, graded by exact match.

Every task is generated from a seed; the expected answer is computed here, on the host, by reference code,
and compared with what the agent passes to `submit` (never with anything it printed).

Kinds:
- `arith`: "Compute `EXPR` with the python tool and submit the result." -- a short integer expression. The
  template never changes, so a tiny SFT-warm-started policy can learn it (the RL main job trains on it).
- `sum_primes`: the sum of the primes below N.
- `sha256`: the first 16 hex digits of the SHA-256 of a string.
- `fib_mod`: the k-th Fibonacci number mod m.
- `collatz`: the number of Collatz steps from n down to 1.
"""

from __future__ import annotations

import hashlib
import random

from m2rl.envs.tasks.base import Task, TaskSet

SYSTEM_PROMPT = (
    "You are a careful assistant that solves problems by running code. Use the `python` tool to compute "
    "(it keeps variables between calls), then call `submit` with only the final answer."
)
WORDS = (
    "alpha",
    "river",
    "stone",
    "cloud",
    "maple",
    "orbit",
    "pixel",
    "quartz",
    "ember",
    "delta",
    "lunar",
    "cedar",
    "frost",
    "harbor",
    "violet",
    "zephyr",
)


def arith_expression(rng: random.Random) -> str:
    """A short integer expression: 2-4 operands, + - *, maybe one pair of parentheses."""
    n = rng.randint(2, 4)
    operands = [str(rng.randint(2, 99)) for _ in range(n)]
    ops = [rng.choice(["+", "-", "*"]) for _ in range(n - 1)]
    if n >= 3 and rng.random() < 0.5:
        i = rng.randrange(n - 1)
        operands[i] = "(" + operands[i]
        operands[i + 1] = operands[i + 1] + ")"
    expr = operands[0]
    for op, operand in zip(ops, operands[1:]):
        expr += f" {op} {operand}"
    return expr


def eval_arith(expr: str) -> int:
    """Evaluate an `arith_expression` with a tiny recursive-descent parser (no eval on the host)."""
    tokens = expr.replace("(", " ( ").replace(")", " ) ").split()
    pos = 0

    def atom() -> int:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            value = additive()
            pos += 1  # ")"
            return value
        return int(tok)

    def term() -> int:
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            value *= atom()
        return value

    def additive() -> int:
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            value = value + term() if op == "+" else value - term()
        return value

    return additive()


def sum_primes_below(n: int) -> int:
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"[: min(2, n)]
    for p in range(2, int(n**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytearray(len(range(p * p, n, p)))
    return sum(i for i in range(n) if sieve[i])


def fib_mod(k: int, m: int) -> int:
    a, b = 0, 1
    for _ in range(k):
        a, b = b, (a + b) % m
    return a % m


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


class PythonTaskSet(TaskSet):
    family = "python"
    kinds = ("arith", "sum_primes", "sha256", "fib_mod", "collatz")
    system_prompt = SYSTEM_PROMPT

    def generate(self, kind: str, seed: int) -> Task:
        if kind not in self.kinds:
            raise KeyError(f"unknown python task kind {kind!r}; known: {list(self.kinds)}")
        rng = random.Random(f"python/{kind}/{seed}")
        meta: dict = {}
        answer: int | str
        if kind == "arith":
            expr = arith_expression(rng)
            meta = {"expr": expr}
            prompt, answer = f"Compute `{expr}` with the python tool and submit the result.", eval_arith(expr)
        elif kind == "sum_primes":
            n = rng.randint(1_000, 200_000)
            meta = {"n": n}
            prompt = (
                f"What is the sum of all prime numbers below {n}? Compute it with the python tool, then "
                "submit just the number."
            )
            answer = sum_primes_below(n)
        elif kind == "sha256":
            text = "-".join(rng.choice(WORDS) for _ in range(3)) + str(rng.randint(0, 9999))
            meta = {"text": text}
            prompt = (
                f"What are the first 16 hexadecimal characters of the SHA-256 digest of the UTF-8 string "
                f"'{text}'? Compute them with the python tool, then submit them (lowercase)."
            )
            answer = hashlib.sha256(text.encode()).hexdigest()[:16]
        elif kind == "fib_mod":
            k, m = rng.randint(1_000, 200_000), rng.randint(1_000, 1_000_000_007)
            meta = {"k": k, "m": m}
            prompt = (
                f"With F(0) = 0 and F(1) = 1, what is the Fibonacci number F({k}) modulo {m}? Compute it "
                "with the python tool, then submit just the number."
            )
            answer = fib_mod(k, m)
        else:  # collatz
            n = rng.randint(100_000, 10**12)
            meta = {"n": n}
            prompt = (
                f"How many steps does the Collatz sequence starting at {n} take to reach 1 (each step maps "
                "n to n/2 if n is even, else to 3n+1)? Compute it with the python tool, then submit just "
                "the number."
            )
            answer = collatz_steps(n)
        return self.make_task(kind, seed, prompt, answer=str(answer), meta=meta)
