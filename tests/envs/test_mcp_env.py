"""`m2rl/MCP-v0` end to end with real MCP servers over stdio, scripted expert and wrong policies."""

from __future__ import annotations

import time

import gymnasium as gym
import m2rl.envs  # noqa: F401  (registers the env ids)
import pytest
from gymnasium.utils.env_checker import check_env
from m2rl.envs.experts_web import action_text, mcp_expert, mcp_wrong, run_script
from m2rl.envs.mcp_env import SERVERS, MCPEnv, server_available
from m2rl.envs.tasks.mcp_tasks import MCPTaskSet
from m2rl.envs.tools.processes import live_descendants

pytestmark = pytest.mark.mcp

MISSING = [s for s in SERVERS if not server_available(s)]


@pytest.fixture(autouse=True)
def servers_installed() -> None:
    if MISSING:
        pytest.skip(f"MCP servers not installed: {MISSING} (install commands in m2rl/envs/mcp_env.py)")


def test_registered_and_passes_gymnasium_check_env(no_leaks: None) -> None:
    env = gym.make("m2rl/MCP-v0", kinds=("kg_manager", "fs_find_value"))  # the fast (node) servers
    try:
        assert isinstance(env.unwrapped, MCPEnv)
        check_env(env.unwrapped)
    finally:
        env.close()


def test_expert_solves_held_out_tasks_and_wrong_policy_scores_zero(no_leaks: None) -> None:
    task_set = MCPTaskSet()
    tasks = task_set.tasks("test", len(task_set.kinds))  # one held-out task of each kind, every server
    assert {t.meta["server"] for t in tasks} == set(SERVERS)
    env = gym.make("m2rl/MCP-v0", split="test")
    try:
        for task in tasks:
            _, info, _ = run_script(env, mcp_expert, options={"task": task})
            assert info["verification"]["resolved"] is True, (task.id, info["verification"])
            assert info["verification"]["score"] == 1.0
            _, info, _ = run_script(env, mcp_wrong, options={"task": task})
            assert info["verification"]["resolved"] is False and info["verification"]["score"] == 0.0
    finally:
        env.close()


def test_tools_spec_is_the_servers_schema_and_mistakes_become_observations(no_leaks: None) -> None:
    env = MCPEnv(kinds=("fs_count_word",))
    try:
        obs, info = env.reset(seed=5)
        assert env.session is not None
        specs = {s["function"]["name"]: s["function"] for s in env.tools_spec()}
        listed = {t.name: t for t in env.session.client.list_tools()}  # type: ignore[union-attr]
        assert set(specs) == set(listed) | {"submit"}
        assert all(specs[n]["parameters"] == listed[n].input_schema for n in listed)
        assert '"name": "read_text_file"' in obs
        workspace = str(env.session.workspace)
        cases = [
            ([("read_text_file", {"path": "/etc/passwd"})], "outside allowed directories", "tool"),
            ([("read_text_file", {"path": workspace + "/missing.txt"})], "ENOENT", "tool"),
            ([("read_text_file", {})], "missing required parameter 'path'", "schema"),
            ([("rm_rf", {"path": "/"})], "unknown tool 'rm_rf'", "unknown_tool"),
        ]
        for calls, expected, kind in cases:
            obs, _, terminated, truncated, info = env.step(action_text(calls))
            assert expected in obs and not terminated and not truncated, obs[-300:]
            assert kind in [e["kind"] for e in info["errors"]]
        obs, _, terminated, _, info = env.step(action_text([("list_allowed_directories", {})]))
        assert workspace in obs
        obs, _, terminated, _, info = env.step(action_text([("submit", {"answer": "0"})]))
        assert terminated and "verification" in info
    finally:
        env.close()
    assert env.session is None


def test_each_episode_gets_a_fresh_server_and_workspace(no_leaks: None) -> None:
    env = MCPEnv(kinds=("kg_manager",))
    try:
        env.reset(seed=1)
        first = env.session
        assert first is not None and first.workspace.is_dir()
        env.reset(seed=2)
        assert env.session is not first and not first.root.exists()
    finally:
        env.close()


PROBE_SERVER = '''
import socket, sys
from pathlib import Path
from mcp.server.mcpserver import MCPServer

server = MCPServer("probe")

@server.tool()
def write(path: str) -> str:
    """Write a file."""
    Path(path).write_text("x")
    return "written"

@server.tool()
def connect(port: int) -> str:
    """Open a TCP connection to 127.0.0.1:port."""
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return "connected"

server.run()
'''


@pytest.mark.bwrap
def test_isolated_servers_can_write_only_their_workspace_and_reach_no_network(
    tmp_path, no_leaks: None
) -> None:
    import socket
    import sys

    from m2rl.envs.mcp_env import isolate
    from m2rl.envs.tools.mcp import MCPClient, MCPServerSpec

    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SERVER)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    spec = MCPServerSpec("probe", command=sys.executable, args=[str(script)])
    try:
        with MCPClient(spec) as plain:  # the same server unconfined: both succeed (the probe works)
            assert plain.call_tool("write", {"path": str(outside / "a")}).text == "written"
            assert plain.call_tool("connect", {"port": port}).text == "connected"
        with MCPClient(isolate(spec, workspace)) as boxed:
            assert boxed.call_tool("write", {"path": str(workspace / "b")}).text == "written"
            denied = boxed.call_tool("write", {"path": str(outside / "c")})
            assert (
                denied.is_error
            )  # the SDK server reports the OSError (read-only filesystem) as a tool error
            refused = boxed.call_tool("connect", {"port": port})
            assert refused.is_error
        assert (workspace / "b").exists() and not (outside / "c").exists()
    finally:
        listener.close()


def test_a_dead_server_is_an_error_observation_and_the_next_reset_restarts_it(no_leaks: None) -> None:
    import os
    import signal

    env = MCPEnv(kinds=("kg_manager",))
    try:
        env.reset(seed=1)
        servers = [p for p, cmd in live_descendants().items() if "server-memory" in cmd and "bwrap" not in cmd]
        assert servers
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        obs, _, terminated, truncated, info = env.step(action_text([("read_graph", {})]))
        assert "read_graph" in obs and not terminated and not truncated
        assert [e["kind"] for e in info["errors"]] == ["tool"]
        env.reset(seed=2)
        obs, *_ = env.step(action_text([("read_graph", {})]))
        assert '"entities"' in obs
    finally:
        env.close()
