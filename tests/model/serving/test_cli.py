"""`m2rl serve`: flags reach the server, it binds 127.0.0.1 by default, and bad input is a one-line error."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn
from m2rl.cli import main
from m2rl.model.serving.app import build_app
from serving_helpers import TINY_DIR


def test_serve_builds_the_app_from_its_flags(monkeypatch, capsys) -> None:
    calls: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    built: dict[str, Any] = {}

    def spy(service: Any, api_key: Any = None) -> Any:
        built.update(service=service, api_key=api_key)
        return build_app(service, api_key)

    monkeypatch.setattr("m2rl.model.serving.app.build_app", spy)
    assert main(["serve", "--model", str(TINY_DIR), "--max-batch", "3", "--max-tokens-in-flight", "900",
                 "--api-key", "k"]) == 0
    assert (calls["host"], calls["port"]) == ("127.0.0.1", 8000)
    scheduler = built["service"].scheduler
    assert (scheduler.config.max_batch, scheduler.config.token_budget, built["api_key"]) == (3, 900, "k")
    assert built["service"].model_name == TINY_DIR.name
    assert "serving 'tiny-python-sft'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/ckpt"], "no config.json"),
    (["--model", str(TINY_DIR), "--port", "70000"], "--port"),
    (["--model", str(TINY_DIR), "--max-batch", "0"], "max_batch"),
    (["--model", str(TINY_DIR), "--max-model-len", "100000"], "max_position_embeddings"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2rl: error:") and message in err and err.count("\n") == 1
