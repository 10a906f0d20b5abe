"""`m2rl eval` against real servers of the shipped tiny checkpoint: `m2rl serve` (openai:URL, token ids probed and
used; chat mode through the chat adapter) and a vLLM-CPU server the eval launches, owns and stops (vllm:PATH)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from m2rl.evaluation.runner import EvalConfig, run_eval
from m2rl.rl.m2rl_server import M2RLServer, M2RLServerConfig

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "model" / "assets" / "tiny-python-sft"
SMALL = {"env": "m2rl/Python-v0", "tasks": 2, "samples": 1, "max_new_tokens": 48, "env_options": {"max_steps": 3},
             "show_progress": False, "threads": 1}


def results(directory: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (directory / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def serve() -> Iterator[M2RLServer]:
    server = M2RLServer(M2RLServerConfig(model_dir=TINY, served_model_name="tiny", dtype="float32",
                                         env={"OMP_NUM_THREADS": "1"}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.bwrap
def test_eval_against_m2rl_serve_in_token_mode_is_deterministic(serve: M2RLServer, tmp_path: Path) -> None:
    policy = f"openai:{serve.base_url}#tiny"
    first = run_eval(EvalConfig(policy=policy, name="one", run_root=str(tmp_path), seed=3, **SMALL))
    assert first.summary["mode"] == "token" and first.summary["episodes"] == 2 and first.summary["failed"] == 0
    assert all(r.tokens.sampled > 0 and r.turns >= 1 for r in first.records)
    second = run_eval(EvalConfig(policy=policy, name="two", run_root=str(tmp_path), seed=3, parallel=1, **SMALL))
    assert results(first.directory) == results(second.directory)  # seeded requests: the server's batches do not matter


@pytest.mark.bwrap
def test_eval_against_m2rl_serve_in_chat_mode(serve: M2RLServer, tmp_path: Path) -> None:
    pytest.importorskip("m2rl.agent.chat_adapter", reason="chat mode needs the chat adapter (agent/chat_adapter.py)")
    outcome = run_eval(EvalConfig(policy=f"openai:{serve.base_url}#tiny", mode="chat", name="chat",
                                  run_root=str(tmp_path), **SMALL))
    assert outcome.summary["mode"] == "chat" and outcome.summary["episodes"] == 2
    assert outcome.summary["failed"] == 0, [r.error for r in outcome.records]
    # The server's own counts, per episode (what a hosted API bills).
    for r in outcome.records:
        assert r.server_usage["completion_tokens"] > 0 and r.server_usage["prompt_tokens"] > 0
    assert outcome.summary["tokens"]["server_usage"]["completion_tokens"] == sum(
        r.server_usage["completion_tokens"] for r in outcome.records)


@pytest.mark.vllm
@pytest.mark.bwrap
def test_eval_launches_owns_and_stops_a_vllm_server(tmp_path: Path) -> None:
    from m2rl.envs.tools.processes import live_descendants

    before = set(live_descendants())
    outcome = run_eval(EvalConfig(policy=f"vllm:{TINY}", name="vllm", run_root=str(tmp_path), **SMALL))
    assert outcome.summary["mode"] == "token" and outcome.summary["episodes"] == 2
    assert outcome.summary["failed"] == 0, [r.error for r in outcome.records]
    assert all(r.tokens.sampled > 0 for r in outcome.records)
    left = {pid: cmd for pid, cmd in live_descendants().items() if pid not in before and "vllm" in cmd}
    assert left == {}, left  # the launched server and its engine process are gone
