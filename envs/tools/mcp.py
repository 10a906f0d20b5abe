"""The `mcp` tool: connect to any MCP server (stdio or streamable HTTP) and expose its tools to the agent.

`MCPClient(MCPServerSpec(...))` starts the server (stdio) or connects to it (URL) with the official `mcp`
SDK, lists its tools, and turns each into an agent `Tool` whose spec parameters are the server's own
`inputSchema`. The SDK is async; the client session lives in one owner task on a `BackgroundLoop` thread
(anyio cancel scopes must be entered and exited by the same task), and sync callers reach it through
`BackgroundLoop.run`. `close()` exits the session, which ends a stdio server process (stdin closed,
then SIGTERM/SIGKILL of its process tree by the SDK).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TextIO

from m2rl.envs.tool import Tool, ToolError, ToolOutput
from m2rl.envs.tools.background_loop import BackgroundLoop

logger = logging.getLogger(__name__)


@dataclass
class MCPServerSpec:
    """How to reach one MCP server: a stdio `command` (+ args, env, cwd) or a streamable-HTTP `url`."""

    name: str
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    stderr_path: str | None = None  # where a stdio server's stderr goes (default: discarded)

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r}: give exactly one of command (stdio) or url (HTTP)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {self.name!r}: url must be http(s), got {self.url!r}")


@dataclass
class MCPConfig:
    connect_timeout_s: float = 60.0  # a cold `node` or venv start on a loaded 2-core machine
    call_timeout_s: float = 30.0
    max_output_chars: int = 8000


@dataclass
class MCPCallResult:
    text: str
    is_error: bool
    structured: Any = None


def render_content(result: Any) -> str:
    """The text the model reads for a CallToolResult: text blocks verbatim, others summarised."""
    parts: list[str] = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} content: {block.mime_type}, {len(block.data) * 3 // 4} bytes]")
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None else f"[binary resource {resource.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{kind or type(block).__name__} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    return "\n".join(parts)


def describe(exc: BaseException) -> str:
    """`Type: message` of the first leaf of an exception group (anyio wraps transport failures in groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class MCPClient:
    """One connected MCP server. Thread-safe for sequential calls from the env's thread."""

    def __init__(self, spec: MCPServerSpec, config: MCPConfig | None = None) -> None:
        self.spec = spec
        self.config = config or MCPConfig()
        self._client: Any = None
        self._owner: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._errlog: TextIO | None = None
        self._closed = False
        self.server_info: dict[str, Any] = {}
        self._loop = BackgroundLoop(name=f"m2rl-mcp-{spec.name}")
        try:
            self._loop.run(self._start(), timeout=self.config.connect_timeout_s)
        except BaseException as exc:
            self.close()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(
                    f"MCP server {spec.name!r} did not start in {self.config.connect_timeout_s}s"
                )
            raise

    # ------------------------------------------------------------------ session owner (loop thread)

    def _transport(self) -> Any:
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client

        if self.spec.url is not None:
            return streamable_http_client(self.spec.url)
        # The SDK hands errlog to the subprocess as its stderr, so it must be a real file.
        self._errlog = open(self.spec.stderr_path or "/dev/null", "a", encoding="utf-8")  # noqa: SIM115
        params = StdioServerParameters(
            command=self.spec.command or "",
            args=list(self.spec.args),
            env=dict(self.spec.env) or None,
            cwd=self.spec.cwd,
        )
        return stdio_client(params, errlog=self._errlog)

    async def _start(self) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._owner = asyncio.create_task(self._own_session(ready))
        await ready

    async def _own_session(self, ready: asyncio.Future[None]) -> None:
        from mcp import Client

        try:
            async with Client(self._transport(), read_timeout_seconds=self.config.call_timeout_s) as client:
                self._client = client
                info = client.server_info
                self.server_info = {
                    "name": getattr(info, "name", None),
                    "version": getattr(info, "version", None),
                    "protocol_version": client.protocol_version,
                }
                ready.set_result(None)
                assert self._stop is not None
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(
                    RuntimeError(
                        f"MCP server {self.spec.name!r} failed to start: {describe(exc)}{self._stderr_tail()}"
                    )
                )
            if isinstance(exc, asyncio.CancelledError):
                raise
            # After a successful start a failure only ends the session: later calls report "not connected".
        finally:
            self._client = None

    def _stderr_tail(self, lines: int = 5) -> str:
        if not self.spec.stderr_path:
            return ""
        try:
            tail = Path(self.spec.stderr_path).read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("\nserver stderr:\n" + "\n".join(tail)) if tail else ""

    async def _shutdown(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._owner is not None:
            await asyncio.wait({self._owner}, timeout=15.0)
            if not self._owner.done():
                self._owner.cancel()
                await asyncio.wait({self._owner}, timeout=10.0)

    def close(self) -> None:
        """End the session and the server process, then the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._loop.alive:
                self._loop.run(self._shutdown(), timeout=30.0)
        except Exception:  # best effort: the loop is closed next whatever happened
            logger.debug("MCP session shutdown failed", exc_info=True)
        finally:
            self._loop.close()
            if self._errlog is not None:
                self._errlog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls (caller thread)

    def _require(self) -> Any:
        if self._closed or self._client is None:
            raise ToolError(f"the MCP server {self.spec.name!r} is not connected")
        return self._client

    def list_tools(self) -> list[Any]:
        """Every tool the server lists (all pages), as `mcp.types.Tool`."""
        client = self._require()

        async def fetch() -> list[Any]:
            tools, cursor = [], None
            for _ in range(100):  # a paginator that never ends cannot hang the env
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if cursor is None:
                    break
            return tools

        return self._loop.run(fetch(), timeout=self.config.call_timeout_s)

    def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> MCPCallResult:
        """Call one server tool; protocol errors and timeouts become `ToolError` with the server's message."""
        client = self._require()
        try:
            result = self._loop.run(
                client.call_tool(name, arguments or {}), timeout=self.config.call_timeout_s + 5
            )
        except TimeoutError as exc:
            raise ToolError(f"MCP tool {name!r} timed out after {self.config.call_timeout_s:.0f}s") from exc
        except Exception as exc:  # MCPError (unknown tool, invalid params), broken pipe, validation
            raise ToolError(f"MCP tool {name!r} failed: {describe(exc)}") from exc
        text = render_content(result)
        limit = self.config.max_output_chars
        if len(text) > limit:
            text = text[:limit] + f"\n... [output cut at {limit} characters]"
        return MCPCallResult(text=text, is_error=bool(result.is_error), structured=result.structured_content)

    def agent_tools(self, prefix: str = "") -> list[Tool]:
        """One agent `Tool` per server tool; the parameters schema is the server's `inputSchema` verbatim."""
        out: list[Tool] = []
        for tool in self.list_tools():
            schema = dict(tool.input_schema or {"type": "object", "properties": {}})
            spec = {
                "type": "function",
                "function": {
                    "name": prefix + tool.name,
                    "description": tool.description or "",
                    "parameters": schema,
                },
            }
            out.append(Tool(fn=self._bound_call(tool.name), spec=spec))
        return out

    def _bound_call(self, server_tool: str) -> Any:
        def call(**arguments: Any) -> ToolOutput:
            result = self.call_tool(server_tool, arguments)
            # A tool-level failure (isError) is shown to the model and reported in info["errors"].
            return ToolOutput(
                output=result.text, ok=not result.is_error, error=result.text if result.is_error else None
            )

        call.__name__ = server_tool
        return call


def stderr_log(directory: str | Path, name: str) -> str:
    """A path for a stdio server's stderr inside the episode directory."""
    path = Path(directory) / f"mcp-{name}.stderr.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)
