"""evaluation/report.py and evaluation/compare.py on constructed records: the numbers, the files, the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from m2rl.evaluation.compare import compare_records, compare_runs, comparison_markdown
from m2rl.evaluation.records import EpisodeRecord, EvalFiles, TokenCounts, read_records
from m2rl.evaluation.report import PREDICTIONS_FILE, summarize, swe_predictions, write_report
from m2rl.evaluation.stats import wilson_interval


def record(task: str, sample: int, resolved: bool, *, family: str = "python", kind: str = "arith",
           turns: int = 2, sampled: int = 50, billed: int = 400, calls: int = 2, errors: int = 0,
           error: str | None = None) -> EpisodeRecord:
    return EpisodeRecord(
        task_id=task, sample=sample, resolved=resolved, score=1.0 if resolved else 0.0,
        reward=1.1 if resolved else 0.1, reward_breakdown={"resolved": float(resolved)}, turns=turns,
        tokens=TokenCounts(prompt=300, sampled=sampled, total=300 + sampled, billed_input=billed),
        tool_calls=calls, tool_errors=errors, format_errors=0, wall_s=0.5, policy_version=3,
        exit_reason="error" if error else "terminated", error=error, seed=sample, family=family, kind=kind,
        repository=kind if family == "swe" else None, trajectory=f"{task}#{sample}")


def test_summary_numbers() -> None:
    # task a: 3/4 resolved, task b: 1/4 (one failed to run), kinds arith and collatz
    records = ([record("a", s, s < 3, calls=3, errors=1) for s in range(4)]
               + [record("b", s, s == 0, kind="collatz", error="boom" if s == 3 else None) for s in range(4)])
    s = summarize(records, {"samples": 4, "name": "x", "price_in": 2.0, "price_out": 10.0})
    assert (s["episodes"], s["resolved"], s["failed"], s["tasks"]) == (8, 4, 1, 2)
    assert s["resolved_rate"] == 0.5 and s["resolved_rate_ci95"] == list(wilson_interval(4, 8))
    # pass@k over tasks: a (n=4, c=3), b (n=4, c=1)
    assert s["pass_at_k"]["1"] == pytest.approx(0.5)
    assert s["pass_at_k"]["2"] == pytest.approx((1.0 + 0.5) / 2)  # a: always; b: 1 - C(3,2)/C(4,2) = 0.5
    assert s["pass_at_k"]["4"] == 1.0
    assert s["tool_calls"] == {"total": 20, "errors": 4, "error_rate": 0.2, "per_episode": 2.5}
    assert s["cost_usd"]["input"] == pytest.approx(8 * 400 * 2.0 / 1e6)
    assert s["cost_usd"]["output"] == pytest.approx(8 * 50 * 10.0 / 1e6)
    assert s["by_group"]["python/arith"]["resolved"] == 3 and s["by_group"]["python/collatz"]["resolved_rate"] == 0.25
    assert s["exit_reasons"] == {"error": 1, "terminated": 7} and s["policy_versions"] == [3]
    assert summarize(records, {"samples": 4})["cost_usd"] is None  # no prices, no cost


def test_cost_counts_the_servers_usage_where_every_episode_has_it(tmp_path: Path) -> None:
    """A hosted model bills its own tokenizer's counts: those win over ours, but only when no episode lacks them."""
    import dataclasses

    records = [dataclasses.replace(record("a", s, True), server_usage={"prompt_tokens": 1000, "completion_tokens": 70,
                                                                       "total_tokens": 1070}) for s in range(2)]
    prices = {"samples": 2, "price_in": 2.0, "price_out": 10.0}
    s = summarize(records, prices)
    assert s["tokens"]["server_usage"] == {"completion_tokens": 140, "prompt_tokens": 2000, "total_tokens": 2140}
    assert s["cost_usd"]["counted_by"] == "server usage"
    assert s["cost_usd"]["input"] == pytest.approx(2000 * 2.0 / 1e6)
    assert s["cost_usd"]["output"] == pytest.approx(140 * 10.0 / 1e6)
    mixed = summarize(records + [record("b", 0, False)], {**prices, "samples": 1})
    assert mixed["cost_usd"]["counted_by"] == "m2rl tokenizer"
    assert mixed["cost_usd"]["input"] == pytest.approx(3 * 400 * 2.0 / 1e6)
    line = EpisodeRecord.from_dict(json.loads(json.dumps(dataclasses.asdict(records[0]))))
    assert line.server_usage == records[0].server_usage  # results.jsonl keeps it
    old = dataclasses.asdict(record("c", 0, True))
    del old["server_usage"]  # a results.jsonl written before the field existed still loads
    assert EpisodeRecord.from_dict(old).server_usage == {}
    write_report(tmp_path, records, {}, {"name": "hosted", "samples": 2, **prices})
    assert "server-reported tokens | completion_tokens 140, prompt_tokens 2000" in (tmp_path / "report.md").read_text()


def test_write_report_files_and_swe_predictions(tmp_path: Path) -> None:
    records = [record("org__lib-1", 0, True, family="swe", kind="org/lib"),
               record("org__lib-2", 0, False, family="swe", kind="org/lib")]
    diff = "diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"
    trajectories = {"org__lib-1#0": {"metadata": {"steps": [{}, {"verification": {"resolved": True, "score": 1.0,
                                                                                "patch": diff}}]}},
                    "org__lib-2#0": {"metadata": {"steps": []}}}
    assert swe_predictions(records, trajectories, "m")[0] == [
        {"instance_id": "org__lib-1", "model_name_or_path": "m", "model_patch": diff},
        {"instance_id": "org__lib-2", "model_name_or_path": "m", "model_patch": ""}]
    summary = write_report(tmp_path, records, trajectories, {"name": "swe-eval", "samples": 1, "env": "m2rl/SWE-v0",
                                                              "split": "test", "policy": "scripted:expert"})
    predictions = [json.loads(line) for line in (tmp_path / PREDICTIONS_FILE).read_text().splitlines()]
    assert [p["instance_id"] for p in predictions] == ["org__lib-1", "org__lib-2"]
    assert predictions[0]["model_patch"] == diff and predictions[0]["model_name_or_path"] == "swe-eval"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    report = (tmp_path / "report.md").read_text()
    assert "| resolved | 1 / 2 = 0.500" in report
    assert "| org/lib | 2 | 2 | 1 | 0.500 |" in report
    for png in ("plots/resolved_by_group.png", "plots/turns.png", "plots/tokens.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in report


def test_eval_files_repair_a_torn_line_and_an_uncommitted_trajectory(tmp_path: Path) -> None:
    files = EvalFiles(tmp_path)
    files.load()
    files.append(record("a", 0, True), {"metadata": {"key": "a#0"}, "ids": [1]})
    files.append(record("a", 1, False), {"metadata": {"key": "a#1"}, "ids": [2]})
    # a crash: the next trajectory was written, its result torn mid-line
    (tmp_path / "trajectories.jsonl").open("a").write(json.dumps({"metadata": {"key": "b#0"}}) + "\n")
    (tmp_path / "results.jsonl").open("a").write('{"task_id": "b", "sam')
    again = EvalFiles(tmp_path)
    assert sorted(again.load()) == ["a#0", "a#1"]
    assert sorted(again.trajectories()) == ["a#0", "a#1"]  # b#0 has no result: dropped, to run again
    again.append(record("b", 0, True), {"metadata": {"key": "b#0"}})
    assert [r.key for r in read_records(tmp_path)] == ["a#0", "a#1", "b#0"]  # appended after a clean line
    assert sorted(EvalFiles(tmp_path).load(retry_errors=True)) == ["a#0", "a#1", "b#0"]


def test_compare_counts_pairs_and_tests() -> None:
    # 6 tasks x 2 samples. A resolves sample 0 of t0..t2; B resolves both samples of t0..t4.
    a = [record(f"t{i}", s, i < 3 and s == 0) for i in range(6) for s in range(2)]
    b = [record(f"t{i}", s, i < 5) for i in range(6) for s in range(2)]
    c = compare_records(a, b, "A", "B")
    assert (c.pairs, c.both, c.a_only, c.b_only, c.neither) == (12, 3, 0, 7, 2)
    assert c.mcnemar_p == pytest.approx(2 / 2**7)  # 7 discordant pairs, all for B
    # per-task differences: t0..t2 +0.5, t3, t4 +1, t5 0 -> 5 non-zero, all positive: exact p = 2 / 2^5
    assert [t.difference for t in c.tasks] == [0.5, 0.5, 0.5, 1.0, 1.0, 0.0]
    assert c.permutation_p == pytest.approx(2 / 32)
    text = comparison_markdown(c)
    assert "| exact McNemar |" in text and "| t3 | 0/2 | 2/2 | +1.000 |" in text and "t5" not in text
    # a run with a missing episode: that pair is not compared, and the count says so
    partial = compare_records(a, b[:-1], "A", "B")
    assert partial.pairs == 11 and partial.unpaired_a == 1 and partial.unpaired_b == 0


def test_compare_runs_reads_eval_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from m2rl.cli import main

    for name, resolved in (("one", [True, False]), ("two", [True, True])):
        files = EvalFiles(tmp_path / name)
        files.load()
        for sample, ok in enumerate(resolved):
            files.append(record("t", sample, ok), {"metadata": {"key": f"t#{sample}"}})
    assert compare_runs("one", str(tmp_path / "two"), run_root=str(tmp_path)).b_only == 1
    assert main(["eval", "--run-root", str(tmp_path), "compare", "one", "two"]) == 0
    assert "# two vs one" in capsys.readouterr().out
    assert main(["eval", "--run-root", str(tmp_path), "compare", "one", "nope"]) == 2
    assert "no eval at 'nope'" in capsys.readouterr().err
