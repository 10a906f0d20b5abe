"""The statistics of an evaluation: pure functions of counts, each tested against known values.

- `wilson_interval`: the 95% confidence interval of a resolved rate. Wilson's score interval rather than
  the normal approximation p +- 1.96 sqrt(p(1-p)/n), which collapses to a point at 0 or n successes and
  leaves [0, 1] near them: exactly the rates small evals produce.
- `pass_at_k`: the unbiased estimator of the Codex paper (Chen et al., 2021, eq. 1): with n samples of a
  task of which c pass, pass@k = 1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without
  replacement contain a pass. Averaged over tasks.
- `mcnemar_exact`: two policies on the same (task, sample) pairs; only the discordant pairs say which is
  better. Under H0 each discordant pair favours A with probability 1/2: a two-sided exact binomial (sign) test.
- `paired_permutation_test`: per-task differences of resolved rate; under H0 the sign of each difference is
  a coin flip. Exact over all 2^m sign patterns for small m, else a seeded Monte-Carlo estimate.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
EXACT_PERMUTATION_MAX_TASKS = 16  # 2^16 sign patterns; above it, Monte Carlo
PERMUTATION_SAMPLES = 20_000


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there are no trials."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes a bound is exactly 0 or 1; rounding would leave 0.9999999999999999.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one task with `c` passing samples out of `n` (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k contains a pass
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over tasks, each given as (n samples, c passes)."""
    if not counts:
        raise ValueError("no tasks")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def binomial_two_sided(successes: int, n: int) -> float:
    """Exact two-sided p-value of `successes` in `n` fair coin flips (the sign test)."""
    if n == 0:
        return 1.0
    tail = min(successes, n - successes)
    p = 2 * sum(math.comb(n, i) for i in range(tail + 1)) / 2**n
    return min(1.0, p)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact McNemar p-value from the discordant pairs: A resolved and B not (`a_only`), and the reverse."""
    return binomial_two_sided(a_only, a_only + b_only)


def paired_permutation_test(differences: Sequence[float], samples: int = PERMUTATION_SAMPLES,
                            seed: int = 0) -> float:
    """Two-sided p-value of the mean of paired `differences` under random sign flips.

    Exact (every sign pattern) up to EXACT_PERMUTATION_MAX_TASKS non-zero differences, else `samples` seeded
    random patterns, counted with the observed one (so p is never 0). Zero differences cannot change sign
    and are dropped."""
    values = [float(d) for d in differences if d != 0]
    if not values:
        return 1.0
    observed = abs(sum(values))
    tolerance = 1e-12 * max(1.0, observed)  # sums of the same floats in another order
    if len(values) <= EXACT_PERMUTATION_MAX_TASKS:
        hits = total = 0
        for signs in itertools.product((1, -1), repeat=len(values)):
            total += 1
            hits += abs(sum(s * v for s, v in zip(signs, values))) >= observed - tolerance
        return hits / total
    rng = random.Random(seed)
    hits = 1
    for _ in range(samples):
        flipped = sum(v if rng.random() < 0.5 else -v for v in values)
        hits += abs(flipped) >= observed - tolerance
    return hits / (samples + 1)
