"""`m2rl/Browser-v0`: a `ToolEnv` whose tool is a real headless Chromium confined to a generated local site.

Each episode (`reset`) generates the task's site from its seed, serves it on 127.0.0.1 (a free port) and
opens a fresh isolated browser context in the env's Chromium (launched once per env, with a fresh
profile, relaunched if it died). Server and context belong to one `BrowserSession`, whose bound
`browser` method is the episode's tool (next to the shared `submit`), so `ToolEnv` closes the session at
the next reset and at `close()`, which also closes Chromium. No sandbox: the browser's only reachable
origin is the env's own server.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from m2rl.envs.registration import register_env
from m2rl.envs.sites.company import render
from m2rl.envs.sites.server import SiteServer
from m2rl.envs.tasks.base import Task
from m2rl.envs.tasks.browser_tasks import BrowserTaskSet, SiteParams
from m2rl.envs.tool import ToolOutput
from m2rl.envs.tool_env import ToolEnv
from m2rl.envs.tools.browser import BrowserConfig, BrowserTool, ChromiumHost
from m2rl.envs.tools.submit import submit


def episode_dir_name(index: int, task_id: str) -> str:
    return f"{index:05d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", task_id)


class BrowserSession:
    """One episode's site server and browser context; its bound `browser` method is the agent's tool."""

    def __init__(self, task: Task, task_set: BrowserTaskSet, episode_dir: Path, host: ChromiumHost) -> None:
        site = task_set.site(task)
        self.server = SiteServer(lambda path, query: render(site, path, query))
        try:
            self.tool = BrowserTool(self.server.origin, episode_dir / "screenshots", host=host)
        except BaseException:
            self.server.close()
            raise

    def browser(
        self,
        action: Literal["open", "click", "type", "read", "screenshot"],
        url: str = "",
        target: str = "",
        text: str = "",
        submit: bool = True,
    ) -> str | ToolOutput:
        return self.tool.browser(action, url=url, target=target, text=text, submit=submit)

    # The agent reads the tool's own docstring (schema descriptions), not the wrapper's.
    browser.__doc__ = BrowserTool.browser.__doc__

    def close(self) -> None:
        try:
            self.tool.close()
        finally:
            self.server.close()  # idempotent, like the tool


@dataclass
class BrowserEnvConfig:
    episode_root: str | None = None  # screenshots go to <root>/<episode>/screenshots; None = a temp dir
    browser: BrowserConfig = field(default_factory=BrowserConfig)
    site: SiteParams = field(default_factory=SiteParams)


class BrowserEnv(ToolEnv):
    """Args: `browser_config` (BrowserEnvConfig) plus every `ToolEnv` option (split=, max_steps=, ...)."""

    def __init__(
        self,
        browser_config: BrowserEnvConfig | None = None,
        reward_spec: Any = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        self.browser_config = browser_config or BrowserEnvConfig()
        self._own_root = self.browser_config.episode_root is None
        self.episode_root = Path(
            self.browser_config.episode_root or tempfile.mkdtemp(prefix="m2rl-browser-env-")
        )
        self._episodes = 0
        self.session: BrowserSession | None = None
        self.host: ChromiumHost | None = None
        overrides.setdefault("max_steps", 24)  # leaf pages sit three clicks deep; some tasks visit several
        super().__init__(
            BrowserTaskSet(self.browser_config.site),
            self._episode_tools,
            backend=None,
            reward_spec=reward_spec,
            render_mode=render_mode,
            **overrides,
        )

    def _episode_tools(self, env: Any) -> list[Any]:
        assert self.task is not None, "ToolEnv picks the task before building tools"
        directory = self.episode_root / episode_dir_name(self._episodes, self.task.id)
        self._episodes += 1
        if self.host is None or not self.host.alive:
            if self.host is not None:
                self.host.close()
            self.host = ChromiumHost(self.browser_config.browser)
        if (
            self.session is not None
        ):  # ToolEnv closed it through its bound tool already; closing is idempotent
            self.session.close()
        self.session = BrowserSession(self.task, self.task_set, directory, self.host)
        return [self.session.browser, submit]

    def close(self) -> None:
        super().close()  # closes the session through its bound tools
        self.session = None
        if self.host is not None:
            self.host.close()
            self.host = None
        if self._own_root:
            shutil.rmtree(self.episode_root, ignore_errors=True)


register_env("m2rl/Browser-v0", "m2rl.envs.browser_env:BrowserEnv")
