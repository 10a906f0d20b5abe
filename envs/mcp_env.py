"""`m2rl/MCP-v0`: a `ToolEnv` whose tools are those of a real MCP server, started per episode over stdio.

At `reset` the task's data (files, a knowledge graph, a git history) is written into a fresh workspace
directory, the task's server is started confined to it (`server_spec`), and every tool the server lists
becomes an agent tool with the server's own `inputSchema`, next to `submit`. When bubblewrap is installed
the server runs under it (`isolate`: read-only filesystem but the workspace, no network). All of it
belongs to one `MCPSession`, which the env closes at the next reset and at `close()` (server process tree
ended, workspace removed).

Servers and how to install them (offline at run time; the set-up script installs them):
- filesystem, memory: `npm install --prefix <repo>/.cache/npm @modelcontextprotocol/server-filesystem
  @modelcontextprotocol/server-memory` (or set `M2RL_MCP_NPM_DIR` to another prefix), run with `node`.
- time, git: `pip install mcp-server-time mcp-server-git` into the project venv (console scripts found
  next to the running Python, else on PATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2rl.envs.registration import register_env
from m2rl.envs.tasks.base import Task
from m2rl.envs.tasks.mcp_tasks import MCPTaskSet
from m2rl.envs.tool import Tool
from m2rl.envs.tool_env import ToolEnv
from m2rl.envs.tools.mcp import MCPClient, MCPConfig, MCPServerSpec, stderr_log
from m2rl.envs.tools.submit import submit

REPO_ROOT = Path(__file__).resolve().parent.parent
NPM_PACKAGES = {
    "filesystem": "@modelcontextprotocol/server-filesystem",
    "memory": "@modelcontextprotocol/server-memory",
}
PY_SERVERS = {"time": "mcp-server-time", "git": "mcp-server-git"}
SERVERS = tuple(NPM_PACKAGES) + tuple(PY_SERVERS)


class ServerNotInstalled(RuntimeError):
    pass


def npm_dir() -> Path:
    return Path(os.environ.get("M2RL_MCP_NPM_DIR", REPO_ROOT / ".cache" / "npm"))


def _npm_entry(server: str) -> Path:
    path = npm_dir() / "node_modules" / NPM_PACKAGES[server] / "dist" / "index.js"
    if not path.is_file() or shutil.which("node") is None:
        raise ServerNotInstalled(
            f"MCP server {server!r} is not installed: run "
            f"`npm install --prefix {npm_dir()} {NPM_PACKAGES[server]}` "
            "(needs node on PATH)"
        )
    return path


def _console_script(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise ServerNotInstalled(f"MCP server {name!r} is not installed: run `pip install {name}`")
    return found


def server_available(server: str) -> bool:
    try:
        server_spec(server, Path(tempfile.gettempdir()))
        return True
    except ServerNotInstalled:
        return False


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


def isolate(spec: MCPServerSpec, workspace: Path, scratch: Path | None = None) -> MCPServerSpec:
    """Run a stdio server under bubblewrap: the whole filesystem read-only except `workspace` (and `scratch`,
    its TMPDIR), no network, its own pid and IPC namespaces; whatever arguments the policy sends, the server
    can change nothing else. /tmp stays visible read-only (the repo, venv or npm dir may live there).
    bwrap stays in the SDK's process group, so closing the session still kills the whole tree."""
    assert spec.command is not None, "only stdio servers run as local processes"
    writable = [str(workspace)] + ([str(scratch)] if scratch is not None else [])
    binds = [arg for path in writable for arg in ("--bind", path, path)]
    wrapper = [
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        *binds,
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--die-with-parent",
        "--chdir",
        spec.cwd or str(workspace),
        "--",
        spec.command,
        *spec.args,
    ]
    env = {**spec.env, **({"TMPDIR": str(scratch)} if scratch is not None else {})}
    return MCPServerSpec(
        spec.name, command="bwrap", args=wrapper, env=env, cwd=spec.cwd, stderr_path=spec.stderr_path
    )


def server_spec(server: str, workspace: Path, log_dir: Path | None = None) -> MCPServerSpec:
    """How to start `server` confined to `workspace`; `ServerNotInstalled` names the install command."""
    stderr = stderr_log(log_dir, server) if log_dir is not None else None
    if server == "filesystem":
        return MCPServerSpec(
            server, command="node", args=[str(_npm_entry(server)), str(workspace)], stderr_path=stderr
        )
    if server == "memory":
        return MCPServerSpec(
            server,
            command="node",
            args=[str(_npm_entry(server))],
            env={"MEMORY_FILE_PATH": str(workspace / "memory.jsonl")},
            stderr_path=stderr,
        )
    if server == "time":
        return MCPServerSpec(
            server,
            command=_console_script(PY_SERVERS[server]),
            args=["--local-timezone", "UTC"],
            stderr_path=stderr,
        )
    if server == "git":
        return MCPServerSpec(
            server,
            command=_console_script(PY_SERVERS[server]),
            args=["--repository", str(workspace)],
            cwd=str(workspace),
            stderr_path=stderr,
        )
    raise ValueError(f"unknown MCP server {server!r}; known: {list(SERVERS)}")


def build_git_repo(workspace: Path, commits: list[dict[str, Any]]) -> None:
    """A repository whose history is exactly `commits` (authors and dates fixed, so hashes are stable)."""

    def git(*args: str, env: dict[str, str] | None = None) -> None:
        subprocess.run(
            ["git", *args],
            cwd=workspace,
            check=True,
            capture_output=True,
            timeout=30,
            env={
                **os.environ,
                "GIT_CONFIG_GLOBAL": "/dev/null",
                "GIT_CONFIG_SYSTEM": "/dev/null",
                **(env or {}),
            },
        )

    git("init", "-q", "-b", "main")
    for commit in commits:
        for path, content in commit["files"].items():
            target = workspace / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        git("add", "-A")
        who = {
            "GIT_AUTHOR_NAME": commit["author"],
            "GIT_AUTHOR_EMAIL": commit["email"],
            "GIT_AUTHOR_DATE": commit["date"],
            "GIT_COMMITTER_NAME": commit["author"],
            "GIT_COMMITTER_EMAIL": commit["email"],
            "GIT_COMMITTER_DATE": commit["date"],
        }
        git("commit", "-q", "--allow-empty", "-m", commit["message"], env=who)


def prepare_workspace(task: Task, workspace: Path) -> None:
    """Write the task's data where its server will read it."""
    workspace.mkdir(parents=True, exist_ok=True)
    for rel, content in task.files.items():
        path = workspace / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    if task.meta.get("commits"):
        build_git_repo(workspace, task.meta["commits"])


class MCPSession:
    """One episode's workspace and MCP server connection (the env closes it at the next reset and close)."""

    def __init__(
        self, task: Task, config: MCPConfig, keep_dir: Path | None = None, sandboxed: bool = True
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="m2rl-mcp-"))
        self.workspace = self.root / "workspace"
        self.keep_dir = keep_dir
        self.client: MCPClient | None = None
        try:
            prepare_workspace(task, self.workspace)
            server = str(task.meta["server"])
            spec = server_spec(server, self.workspace, self.root / "logs")
            if sandboxed:
                scratch = self.root / "tmp"
                scratch.mkdir()
                spec = isolate(spec, self.workspace, scratch)
            self.client = MCPClient(spec, config)
            self.tools: list[Tool] = self.client.agent_tools()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End the server and remove the workspace (idempotent)."""
        try:
            if self.client is not None:
                self.client.close()
        finally:
            if self.keep_dir is not None and (self.root / "logs").is_dir():
                shutil.copytree(self.root / "logs", self.keep_dir, dirs_exist_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class MCPEnvConfig:
    client: MCPConfig = field(default_factory=MCPConfig)
    log_root: str | None = None  # keep each episode's server stderr under <log_root>/<episode>/
    # "bwrap": servers run under bubblewrap (see `isolate`); "none": plain host processes; "auto": bwrap if
    # installed. The servers' own confinement (allowed directories, --repository) applies either way.
    isolation: str = "auto"


class MCPEnv(ToolEnv):
    """Args: `mcp_config` (MCPEnvConfig) plus every `ToolEnv` option (split=, kinds=, max_steps=, ...).

    `kinds` defaults to the task kinds whose servers are installed here."""

    def __init__(
        self,
        mcp_config: MCPEnvConfig | None = None,
        reward_spec: Any = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        self.mcp_config = mcp_config or MCPEnvConfig()
        task_set = MCPTaskSet()
        if overrides.get("kinds") is None:
            kinds = tuple(k for k in task_set.kinds if server_available(task_set.server_of_kind[k]))
            if not kinds:
                raise ServerNotInstalled(
                    "no MCP server is installed; see m2rl/envs/mcp_env.py for the commands"
                )
            overrides["kinds"] = kinds
        if self.mcp_config.isolation not in ("auto", "bwrap", "none"):
            raise ValueError(
                f"isolation must be 'auto', 'bwrap' or 'none', got {self.mcp_config.isolation!r}"
            )
        if self.mcp_config.isolation == "bwrap" and not bwrap_available():
            raise ServerNotInstalled("isolation='bwrap' needs bubblewrap (apt-get install bubblewrap)")
        self.sandboxed = self.mcp_config.isolation == "bwrap" or (
            self.mcp_config.isolation == "auto" and bwrap_available()
        )
        self._episodes = 0
        self.session: MCPSession | None = None
        super().__init__(
            task_set,
            self._episode_tools,
            backend=None,
            reward_spec=reward_spec,
            render_mode=render_mode,
            **overrides,
        )

    def _episode_tools(self, env: Any) -> list[Any]:
        assert self.task is not None, "ToolEnv picks the task before building tools"
        keep = None
        if self.mcp_config.log_root is not None:
            keep = Path(self.mcp_config.log_root) / f"{self._episodes:05d}"
        self._episodes += 1
        if self.session is not None:
            self.session.close()
            self.session = None
        self.session = MCPSession(self.task, self.mcp_config.client, keep, sandboxed=self.sandboxed)
        names = {t.name for t in self.session.tools}
        answer_tool: Any = submit
        if "submit" in names:  # a server tool named submit would shadow ours: rename ours
            answer_tool = Tool.of(submit, name="submit_answer")
        return [*self.session.tools, answer_tool]

    def close(self) -> None:
        super().close()
        if self.session is not None:
            self.session.close()
            self.session = None


register_env("m2rl/MCP-v0", "m2rl.envs.mcp_env:MCPEnv")
