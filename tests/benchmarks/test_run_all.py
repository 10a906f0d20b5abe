"""benchmarks/run_all.py: it lists every benchmark, skips with a reason, records failures, and writes one table."""

from __future__ import annotations

from pathlib import Path

import pytest
from m2rl.benchmarks import run_all
from m2rl.benchmarks.run_all import BENCHMARKS, NOT_RUNNABLE, Benchmark, Outcome, markdown_table, run_one

HERE = Path(run_all.__file__).resolve().parent


def test_every_benchmark_module_is_listed_once() -> None:
    modules = {path.stem for path in HERE.glob("*.py")} - NOT_RUNNABLE
    listed = [b.module for b in BENCHMARKS]
    assert sorted(listed) == sorted(modules) and len(set(listed)) == len(listed)
    assert all(need in run_all.REQUIREMENTS for b in BENCHMARKS for need in b.needs)


def test_a_missing_component_skips_and_a_failing_benchmark_is_recorded(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(run_all.REQUIREMENTS, "gpu", (lambda: False, "needs a CUDA GPU"))
    run_all.available.cache_clear()
    try:
        skipped = run_one(Benchmark("kernels", quick=("--smoke",), needs=("gpu",)), full=False, out_dir=tmp_path)
    finally:
        run_all.available.cache_clear()
    assert (skipped.status, skipped.result) == ("skipped", "needs a CUDA GPU")
    failed = run_one(Benchmark("no_such_benchmark"), full=False, out_dir=tmp_path)
    assert failed.status == "failed (exit 1)" and "No module named" in failed.result
    assert "No module named" in (tmp_path / "no_such_benchmark.txt").read_text()


def test_the_table_has_the_machine_and_one_row_per_benchmark() -> None:
    machine = run_all.machine_description()
    assert {"platform", "cpus", "python", "torch", "gpus"} <= set(machine)
    outcomes = [Outcome(Benchmark("model_cpu"), "ok", 12.34, '{"tok_s": 1 | 2}', ["--repeats", "1"]),
                Outcome(Benchmark("kernels"), "skipped", 0.0, "needs a CUDA GPU", ["--smoke"])]
    table = markdown_table(outcomes, machine, full=False)
    assert f"| cpus | {machine['cpus']} |" in table
    assert '| model_cpu | `--repeats 1` | ok | 12.3 | {"tok_s": 1 \\| 2} |' in table
    assert "| kernels | `--smoke` | skipped | 0.0 | needs a CUDA GPU |" in table
