"""ServerProcess (agent/server_process.py), the life cycle under VLLMServer and M2RLServer, on a tiny HTTP server.

The server is `python -c` with the standard library's http.server: it forks a sleeping child first (as vLLM
forks its engine core), so `stop()` must end a process group, not one process. Oracles: the exit code and log
lines the server is known to write, and `os.killpg(pid, 0)` failing once the group is gone.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from m2rl.agent.server_process import ServerProcess

TINY_SERVER = r"""
import http.server, subprocess, sys

port, health = int(sys.argv[1]), int(sys.argv[2])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a child in the server's group


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response({"/ready": 200, "/health": health}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args):
        pass


print("tiny server listening", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


class TinyServerError(RuntimeError):
    pass


class TinyServer(ServerProcess):
    name = "tiny server"
    error = TinyServerError
    unhealthy = "engine is dead"
    ready_path = "/ready"
    ready_poll_s = 0.05

    def __init__(self, log_path: Path, health: int = 200, script: str = TINY_SERVER) -> None:
        super().__init__("127.0.0.1", None, log_path, log_prefix="tiny-", startup_timeout_s=30.0)
        self.health, self.script = health, script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.port), str(self.health)]


def assert_group_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):  # nothing of the server's process group survived
        os.killpg(pid, 0)


def test_a_killed_server_is_reported_with_its_log_tail_and_stop_ends_its_group(tmp_path: Path) -> None:
    server = TinyServer(tmp_path / "tiny.log").start()
    assert server.process is not None
    pid = server.process.pid
    try:
        server.check_alive()  # ready, and /health answers 200
        os.kill(pid, signal.SIGKILL)  # the leader only: its child lives on in the group
        server.process.wait()
        with pytest.raises(TinyServerError, match=r"(?s)^tiny server exited with code -9; log .*tiny.log:\n"
                                                  r"tiny server listening"):
            server.check_alive()
    finally:
        server.stop()
    assert_group_gone(pid)
    with pytest.raises(TinyServerError, match=r"tiny server is not running \(stopped\)"):
        server.check_alive()


def test_a_context_manager_stops_the_group_and_a_second_start_appends_to_the_log(tmp_path: Path) -> None:
    server = TinyServer(tmp_path / "tiny.log")
    with server:
        assert server.process is not None
        pid = server.process.pid
    assert server.process is None
    assert_group_gone(pid)
    with server:
        pass
    assert (tmp_path / "tiny.log").read_text().count("tiny server listening") == 2


def test_health_503_means_dead(tmp_path: Path) -> None:
    with (TinyServer(tmp_path / "tiny.log", health=503) as server,
          pytest.raises(TinyServerError, match=r"tiny server's engine is dead \(/health answers 503\)")):
        server.check_alive()


def test_an_exit_during_start_up_raises_with_the_log_tail_and_stops(tmp_path: Path) -> None:
    server = TinyServer(tmp_path / "tiny.log", script="print('no model here'); raise SystemExit(3)")
    with pytest.raises(TinyServerError, match=r"(?s)exited with code 3 during start-up; log .*no model here"):
        server.start()
    assert server.process is None
