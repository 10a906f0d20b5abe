"""evaluation/stats.py against known values and brute-force references."""

from __future__ import annotations

import itertools
import math

import pytest
from m2rl.evaluation.stats import (
    binomial_two_sided,
    mcnemar_exact,
    mean_pass_at_k,
    paired_permutation_test,
    pass_at_k,
    wilson_interval,
)


@pytest.mark.parametrize(("successes", "n", "expected"), [
    # Values of the Wilson score interval at z = 1.96 (e.g. Newcombe 1998, table I; R's binom::binom.wilson).
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
    (10, 10, (0.7225, 1.0)),
    (5, 10, (0.2366, 0.7634)),
])
def test_wilson_interval_known_values(successes: int, n: int, expected: tuple[float, float]) -> None:
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1], abs=1e-4)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(7, 7)[1] == 1.0 and wilson_interval(0, 7)[0] == 0.0  # exact, not 0.9999999999999999
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The definition: the share of the k-subsets of the n samples that contain a passing one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_subset_probability(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the mean
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert mean_pass_at_k([(4, 1), (4, 3)], 1) == pytest.approx(0.5)
    assert mean_pass_at_k([(4, 1), (4, 3)], 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all 6 discordant pairs favour B
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert binomial_two_sided(2, 12) == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 4096)


def test_paired_permutation_test_exact_and_monte_carlo() -> None:
    assert paired_permutation_test([1, 1, 1, 1, 1]) == pytest.approx(2 / 32)  # only all-plus and all-minus reach 5
    assert paired_permutation_test([0.5, -0.5, 0, 0]) == 1.0  # zeros dropped; every pattern reaches |0|
    assert paired_permutation_test([]) == 1.0
    # [1, 1, 0.5]: |sum| 2.5 is reached by (+,+,+) and (-,-,-) only; 1.5 by flipping the 0.5 too
    assert paired_permutation_test([1, 1, 0.5]) == pytest.approx(2 / 8)
    # 20 differences: Monte Carlo, seeded, close to the exact 2 / 2^20 (never 0: the observed pattern counts)
    p = paired_permutation_test([1.0] * 20, samples=2000)
    assert p == paired_permutation_test([1.0] * 20, samples=2000) and 0 < p <= 2 / 2001
    mixed = [0.25 * (i % 3 - 1) + 0.1 for i in range(20)]
    assert 0.05 < paired_permutation_test(mixed, samples=4000) < 1.0
