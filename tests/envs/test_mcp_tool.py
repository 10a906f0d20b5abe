"""The `mcp` tool: real MCP servers over stdio (npm filesystem server) and streamable HTTP (an SDK server)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from m2rl.envs.mcp_env import server_available, server_spec
from m2rl.envs.tool import ToolError, validate_arguments
from m2rl.envs.tools.mcp import MCPClient, MCPServerSpec
from m2rl.envs.tools.processes import live_descendants

pytestmark = pytest.mark.mcp


@pytest.fixture
def fs_client(tmp_path: Path, no_leaks: None) -> Iterator[tuple[MCPClient, Path]]:
    if not server_available("filesystem"):
        pytest.skip("npm @modelcontextprotocol/server-filesystem not installed (see m2rl/envs/mcp_env.py)")
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha beta\n")
    (root / "sub" / "b.txt").write_text("gamma\n")
    client = MCPClient(server_spec("filesystem", root))
    yield client, root
    client.close()


def test_lists_server_tools_with_their_own_input_schemas(fs_client: tuple[MCPClient, Path]) -> None:
    client, _ = fs_client
    listed = {t.name: t for t in client.list_tools()}
    assert {"read_text_file", "list_directory", "search_files", "list_allowed_directories"} <= set(listed)
    tools = {t.name: t for t in client.agent_tools()}
    assert set(tools) == set(listed)
    for name, tool in tools.items():
        function = tool.spec["function"]
        assert function["parameters"] == listed[name].input_schema  # the server's schema, verbatim
        assert function["description"] == (listed[name].description or "")
    prefixed = client.agent_tools(prefix="fs_")
    assert {t.name for t in prefixed} == {f"fs_{n}" for n in listed}


def test_calls_tools_and_reports_server_errors(fs_client: tuple[MCPClient, Path]) -> None:
    client, root = fs_client
    tools = {t.name: t for t in client.agent_tools()}
    out = tools["read_text_file"](path=str(root / "a.txt"))
    assert out.ok and out.output == "alpha beta\n"
    out = tools["list_directory"](path=str(root))
    assert out.ok and "[FILE] a.txt" in out.output and "[DIR] sub" in out.output
    out = tools["read_text_file"](path="/etc/passwd")  # the server confines itself to its root
    assert not out.ok and "outside allowed directories" in out.output
    result = client.call_tool("no_such_tool", {})
    assert result.is_error and "no_such_tool" in result.text
    # The env validates arguments against the server's schema before calling: a clear message, no call.
    _, problems = validate_arguments(tools["read_text_file"].spec, {"pathh": "x"})
    assert any("missing required parameter 'path'" in p for p in problems)


def test_usable_from_inside_a_running_event_loop(fs_client: tuple[MCPClient, Path]) -> None:
    import asyncio

    client, root = fs_client

    async def agent_turn() -> str:
        return client.call_tool("read_text_file", {"path": str(root / "sub" / "b.txt")}).text

    assert asyncio.run(agent_turn()) == "gamma\n"


def test_close_ends_the_server_and_later_calls_fail_cleanly(tmp_path: Path, no_leaks: None) -> None:
    if not server_available("filesystem"):
        pytest.skip("npm @modelcontextprotocol/server-filesystem not installed")
    client = MCPClient(server_spec("filesystem", tmp_path))
    assert any("server-filesystem" in cmd for cmd in live_descendants().values())
    client.close()
    client.close()  # idempotent
    assert not any("server-filesystem" in cmd for cmd in live_descendants().values())
    with pytest.raises(ToolError, match="not connected"):
        client.call_tool("list_allowed_directories", {})


def test_a_server_that_cannot_start_raises_a_clear_error(no_leaks: None) -> None:
    with pytest.raises(RuntimeError, match="failed to start"):
        MCPClient(MCPServerSpec("broken", command=sys.executable, args=["-c", "import sys; sys.exit(3)"]))
    with pytest.raises(ValueError, match="exactly one of command"):
        MCPServerSpec("neither")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HTTP_SERVER = textwrap.dedent('''
    import sys
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("calc")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
''')


def test_streamable_http_transport(tmp_path: Path, no_leaks: None) -> None:
    script = tmp_path / "calc_server.py"
    script.write_text(HTTP_SERVER)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "HTTP MCP server did not start"
                time.sleep(0.2)
        with MCPClient(MCPServerSpec("calc", url=f"http://127.0.0.1:{port}/mcp")) as client:
            (tool,) = client.agent_tools()
            assert tool.name == "add" and tool.spec["function"]["description"] == "Add two integers."
            assert set(tool.spec["function"]["parameters"]["properties"]) == {"a", "b"}
            out = tool(a=2, b=40)
            assert out.ok and out.output == "42"
            assert client.call_tool("add", {"a": "x", "b": 1}).is_error
    finally:
        proc.terminate()
        proc.wait(10)
