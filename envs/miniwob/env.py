"""`m2rl/MiniWoB-v0`: Farama's MiniWoB++ task pages as a `ToolEnv`, rewarded by the pages themselves.

    gymnasium.make("m2rl/MiniWoB-v0", tasks="click-button,enter-text", max_steps=8)

A task is `miniwob/<page>/<seed>` (kind = the page's name, so evals count per page). At reset the env loads the
page in a fresh context of its Chromium (one per env, `ChromiumHost`), seeds and starts the page's episode
(page.py), and the user message is the page's instruction (`core.getUtterance()`) and its element listing
(dom.py). The tools click, type, press and select on elements by their listed refs; each returns the page again,
and when the page's own handler ends its episode the env terminates. The verdict is the page's
(`page_verdict`): resolved = the page gave its full reward, score = its reward. The default reward spec pays
exactly that score (`grader_score`), so an episode's return is the page's reward; pass `reward_spec=` to train
on `resolved` with dense shaping instead. A reply without a tool call, or `max_steps`, ends the episode with the
page's state as it is (reward 0 while the page's episode has not ended).

Info: `reset` and every `step` carry `screenshot_png` (the task area as PNG bytes) unless `screenshots=False`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from m2rl.config import from_dict as config_from_dict
from m2rl.envs.miniwob.page import MiniWoBSession, PageState, available_tasks, serve_pages
from m2rl.envs.registration import register_env
from m2rl.envs.sites.server import SiteServer
from m2rl.envs.tasks.base import Task, TaskSandbox, TaskSet
from m2rl.envs.tool_env import ToolEnv
from m2rl.envs.tools.browser import BrowserConfig, ChromiumHost
from m2rl.rewards import RewardSpec
from m2rl.rewards.episode import Verification

log = logging.getLogger(__name__)

FAMILY = "miniwob"
# Pages the scripted expert (experts.py) solves with the full reward: the default task list.
DEFAULT_TASKS = (
    "click-test", "click-button", "click-button-sequence", "click-checkboxes", "click-link", "click-option",
    "click-dialog", "click-tab", "enter-text", "enter-password", "focus-text", "choose-list", "login-user",
)
SYSTEM_PROMPT = (
    "You operate a small web page through tools to do what its instruction says. The page is listed one "
    "element per line as [ref] TAG #id .classes \"text\" value=...; pass an element's ref to click, type or "
    "select. Each tool returns the page afterwards. The episode ends when the page has judged your actions."
)


@dataclass
class MiniWoBConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS  # page names (miniwob/html/miniwob/<name>.html); "a,b" in options
    reward: Literal["raw", "env"] = "raw"  # raw: WOB_RAW_REWARD_GLOBAL; env: scaled by the time left (WOB_REWARD_GLOBAL)
    episode_max_time_s: float = 1000.0  # the page's own time limit (core.EPISODE_MAX_TIME; MiniWoB's is 10 s)
    settle_ms: int = 50  # after each action, before reading the page: lets its handlers and redraws run
    screenshots: bool = True  # info["screenshot_png"] at reset and at every step
    episode_root: str | None = None  # where episode files go; None = a temp dir removed at close()
    browser: BrowserConfig = field(default_factory=lambda: BrowserConfig(viewport_width=500, viewport_height=320))


def page_verdict(state: PageState, reward: str = "raw") -> Verification:
    """The page's verdict: resolved when it gave its full (raw) reward, score = its reward (0 if not ended)."""
    if not state.done:
        return Verification(False, 0.0, "the page's episode had not ended: no reward")
    score = state.reward if reward == "env" else state.raw_reward
    reason = f" ({state.reason})" if state.reason else ""
    return Verification(state.raw_reward >= 1.0, float(score),
                        f"page reward {state.raw_reward:+.3f} raw, {state.reward:+.3f} time-scaled{reason}")


class MiniWoBTaskSet(TaskSet):
    """One kind per page; a task's seed seeds the page (`Math.seedrandom`), its split is the page's data mode."""

    family = FAMILY
    system_prompt = SYSTEM_PROMPT

    def __init__(self, tasks: tuple[str, ...]) -> None:
        known = set(available_tasks())
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ValueError(f"unknown MiniWoB task(s) {unknown}; the miniwob package has: {', '.join(sorted(known))}")
        if not tasks:
            raise ValueError("tasks is empty: name at least one MiniWoB page")
        self.kinds = tuple(tasks)

    def generate(self, kind: str, seed: int) -> Task:
        # The instruction exists only once the page has generated the problem: the env fills the prompt at reset.
        return self.make_task(kind, seed, f"MiniWoB++ task {kind} (seed {seed}): the page states its instruction "
                              "when the episode starts.")

    def grade(self, task: Task, sandbox: TaskSandbox | None, answer: str | None) -> Verification:
        raise NotImplementedError("MiniWoB episodes are graded by the page (MiniWoBEnv reads its reward)")


def task_prompt(task: str, utterance: str, page: str) -> str:
    return f"MiniWoB++ task: {task}\nInstruction: {utterance}\n\nThe page:\n{page}"


def _tasks_option(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return tuple(str(t) for t in value)


class MiniWoBEnv(ToolEnv):
    """Options: the `MiniWoBConfig` fields (tasks=, reward=, ...) and every `ToolEnv` option (split=, max_steps=)."""

    def __init__(self, reward_spec: Any = None, render_mode: str | None = None, **options: Any) -> None:
        own = {k: options.pop(k) for k in list(options) if k in {f.name for f in dataclasses.fields(MiniWoBConfig)}}
        if "tasks" in own:
            own["tasks"] = _tasks_option(own["tasks"])
        self.miniwob = config_from_dict(MiniWoBConfig, own, source="MiniWoB options")
        task_set = MiniWoBTaskSet(self.miniwob.tasks)  # MiniWoBMissing, or an unknown page, before anything starts
        self._own_root = self.miniwob.episode_root is None
        self.episode_root = Path(self.miniwob.episode_root or tempfile.mkdtemp(prefix="m2rl-miniwob-"))
        self.host: ChromiumHost | None = None
        self.server: SiteServer | None = None
        self.session: MiniWoBSession | None = None
        self._episodes = 0
        options.setdefault("max_steps", 10)
        super().__init__(task_set, self._episode_tools, backend=None,
                         reward_spec=RewardSpec(weights={"grader_score": 1.0}) if reward_spec is None else reward_spec,
                         render_mode=render_mode, **options)

    # ------------------------------------------------------------------ episode set-up

    def _setup_task(self, task: Task) -> None:
        """Start the page's episode; the task's prompt becomes the page's instruction and listing."""
        if self.host is None or not self.host.alive:
            if self.host is not None:
                self.host.close()
            self.host = ChromiumHost(self.miniwob.browser)
        if self.server is None:
            self.server = serve_pages()
        if self.session is not None:
            self.session.close()
        directory = self.episode_root / f"{self._episodes:05d}-{task.kind}-{task.seed}"
        self._episodes += 1
        self.session = MiniWoBSession(task.kind, task.seed, task.split, self.server.origin, self.host,
                                      episode_max_time_s=self.miniwob.episode_max_time_s,
                                      settle_ms=self.miniwob.settle_ms, screenshot_dir=directory)
        self.task = dataclasses.replace(task, prompt=task_prompt(task.kind, self.session.utterance,
                                                                 self.session.page_text))

    def _episode_tools(self, env: Any) -> list[Any]:
        assert self.session is not None, "ToolEnv sets the task up before building tools"
        return [self.session.click, self.session.type, self.session.press, self.session.select]

    def _grade(self, info: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            assert self.session is not None
            verdict = page_verdict(self.session.state(), self.miniwob.reward)
        except Exception as exc:  # noqa: BLE001  a dead page has no verdict: not the agent's success
            verdict = Verification(False, 0.0, f"the page's reward could not be read: {type(exc).__name__}: {exc}")
        info["verification"] = verdict.to_dict()
        info["timings"]["grade_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        obs, info = super().reset(seed=seed, options=options)
        assert self.session is not None
        info["utterance"] = self.session.utterance
        self._add_screenshot(info)
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        self._add_screenshot(info)
        return obs, reward, terminated, truncated, info

    def _add_screenshot(self, info: dict[str, Any]) -> None:
        if self.miniwob.screenshots and self.session is not None:
            try:
                info["screenshot_png"] = self.session.screenshot()
            except Exception as exc:  # noqa: BLE001  a closed or dead page has no picture; the text observation already says so
                log.debug("miniwob: no screenshot (%s: %s)", type(exc).__name__, exc)
                info["screenshot_png"] = b""

    def close(self) -> None:
        super().close()  # closes the session through its bound tools
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.host is not None:
            self.host.close()
            self.host = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._own_root:
            shutil.rmtree(self.episode_root, ignore_errors=True)


register_env("m2rl/MiniWoB-v0", "m2rl.envs.miniwob.env:MiniWoBEnv")
