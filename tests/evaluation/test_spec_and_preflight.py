"""--policy parsing, and every unusable env, policy or endpoint stopping `m2rl eval` with one line before it writes
anything."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from m2rl.agent.server_process import free_port
from m2rl.cli import main
from m2rl.evaluation.spec import PolicySpec, SpecError, parse_policy_spec


def test_parse_policy_spec() -> None:
    assert parse_policy_spec("local:runs/x") == PolicySpec("local", "runs/x")
    assert parse_policy_spec("vllm:/ckpt") == PolicySpec("vllm", "/ckpt")
    assert parse_policy_spec("scripted:expert") == PolicySpec("scripted", "expert")
    spec = parse_policy_spec("openai:http://127.0.0.1:8000/v1#MiniMaxAI/MiniMax-M2")
    assert spec == PolicySpec("openai", "http://127.0.0.1:8000/v1", "MiniMaxAI/MiniMax-M2")
    assert str(spec) == "openai:http://127.0.0.1:8000/v1#MiniMaxAI/MiniMax-M2"
    assert parse_policy_spec("openai:http://h:1").model == ""
    for bad in ("expert", "hf:x", "local:", "scripted: ", "openai:#m"):
        with pytest.raises(SpecError, match="bad --policy"):
            parse_policy_spec(bad)


class _Stub(BaseHTTPRequestHandler):
    """/v1/models lists two models; /v1/completions refuses token-id prompts, as a chat-only API does."""

    def do_GET(self) -> None:
        self._reply(200, {"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]} if self.path == "/v1/models"
                    else {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._reply(400, {"error": {"message": "prompt must be a string"}})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def chat_only_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def eval_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `m2rl eval` expecting a user error: its one line, and nothing written under the run root."""
    code = main(["eval", "--run-root", str(tmp_path / "runs"), "--name", "e", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("m2rl: error: ") and "\n" not in err, err
    assert not (tmp_path / "runs" / "e").exists()
    return err


@pytest.mark.bwrap
def test_unusable_env_task_or_policy_is_one_line_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], chat_only_endpoint: str) -> None:
    env = ["--env", "m2rl/Python-v0"]
    assert "no environment 'm2rl/Nope-v0' is registered" in eval_error(
        tmp_path, capsys, "--env", "m2rl/Nope-v0", "--policy", "scripted:expert")
    assert "cannot be built" in eval_error(tmp_path, capsys, *env, "--policy", "scripted:expert", "no_such_option=1")
    assert "unknown task id 'python/arith/x'" in eval_error(
        tmp_path, capsys, *env, "--policy", "scripted:expert", "--task-ids", "python/arith/x")
    assert "no scripted policy 'oracle' for task family 'python'; choose one of expert, mental_arith, wrong" in (
        eval_error(tmp_path, capsys, *env, "--policy", "scripted:oracle"))
    assert "checkpoint directory not found" in eval_error(tmp_path, capsys, *env, "--policy", "local:no/such/ckpt")
    assert "bad --policy" in eval_error(tmp_path, capsys, *env, "--policy", "hf:gpt2")
    down = f"http://127.0.0.1:{free_port()}/v1"
    assert f"endpoint {down} is not reachable" in eval_error(tmp_path, capsys, *env, "--policy", f"openai:{down}")
    assert "model 'nope' is not served" in eval_error(
        tmp_path, capsys, *env, "--policy", f"openai:{chat_only_endpoint}#nope")
    assert "serves 2 models (m1, m2): name one" in eval_error(
        tmp_path, capsys, *env, "--policy", f"openai:{chat_only_endpoint}")
    assert "does not do token-in/token-out (HTTP 400" in eval_error(
        tmp_path, capsys, *env, "--policy", f"openai:{chat_only_endpoint}#m1", "--mode", "token")
    assert "--samples must be >= 1" in eval_error(tmp_path, capsys, *env, "--policy", "scripted:expert",
                                                  "--samples", "0")
    assert "needs --env ID and --policy SPEC" in eval_error(tmp_path, capsys, "--policy", "scripted:expert")


@pytest.mark.bwrap
def test_a_run_directory_of_something_else_or_other_settings_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    (runs / "train-run").mkdir(parents=True)
    (runs / "train-run" / "metrics.jsonl").write_text("")
    common = ["eval", "--run-root", str(runs), "--env", "m2rl/Python-v0", "--policy", "scripted:wrong",
              "--no-progress", "--tasks", "1"]
    assert main([*common, "--name", "train-run"]) == 2
    assert "already exists and is not an eval" in capsys.readouterr().err
    assert main([*common, "--name", "ev"]) == 0
    capsys.readouterr()
    assert main([*common, "--name", "ev", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "is an eval of other settings: seed (0 -> 5)" in err and "\n" not in err.strip()


def test_local_spec_of_a_run_directory_opens_its_newest_checkpoint(tmp_path: Path) -> None:
    import shutil

    from m2rl.evaluation.spec import OpenOptions, open_policy

    tiny = Path(__file__).resolve().parents[2] / "model" / "assets" / "tiny-python-sft"
    for step in (2, 5):
        checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:09d}"
        shutil.copytree(tiny, checkpoint)
        (checkpoint / "meta.json").write_text(json.dumps({"step": step}))
    opened = open_policy(parse_policy_spec(f"local:{tmp_path / 'run'}"), OpenOptions(parallel=2))
    try:
        assert opened.mode == "token" and opened.version == 5 and "step_000000005" in opened.description
        assert opened.max_context_tokens == 4096 and opened.policy.policy_version == 5
        assert opened.tokenizer.vocab_size == 4096
    finally:
        opened.close()
