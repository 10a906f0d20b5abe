"""One MiniWoB++ episode in the project's Chromium: the task page, started as MiniWoB's own env starts it.

The pages are the `miniwob` wheel's own files (`miniwob/html/`), served on loopback by a `SiteServer`; the
package is located without importing it (its `__init__` registers Selenium-backed envs we do not use, and its
Selenium dependency is not installed). An episode follows `miniwob/selenium_instance.py`'s `begin_task` and
`get_metadata` through core.js's API:

1. load `miniwob/<task>.html` in a fresh browser context (the page shows its START cover),
2. `Math.seedrandom(seed)` (the instance's `set_seed`), `core.setDataMode(mode)` (`set_mode`), then
   `core.startEpisodeReal()` generates the problem; wait for `WOB_TASK_READY` (`block_on_reset`),
3. the instruction is `core.getUtterance()`, the page `core.getDOMInfo()` (miniwob/environment.py's
   observation fields), and the reward is the page's: `WOB_DONE_GLOBAL` once the task's own handler called
   `core.endEpisode(reward)`, with `WOB_RAW_REWARD_GLOBAL` and the time-scaled `WOB_REWARD_GLOBAL`.

One change from MiniWoB's defaults: `core.EPISODE_MAX_TIME` (10 s in core.js, sized for a fast agent) is
`MiniWoBConfig.episode_max_time_s`, 1000 s by default as in BrowserGym's MiniWoB tasks: a language model's turn
takes seconds, and the env's `max_steps` bounds an episode instead.
"""

from __future__ import annotations

import importlib.util
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2rl.envs.miniwob.dom import Element, listing, utterance_text
from m2rl.envs.sites.server import SiteServer
from m2rl.envs.tool import ToolError, ToolOutput
from m2rl.envs.tools.browser import BrowserTool, ChromiumHost

TASK_READY_TIMEOUT_MS = 5000  # MiniWoB waits 1 s (20 x 50 ms); a loaded 2-core machine needs more

_START_JS = """([seed, mode, maxTimeMs]) => {
  Math.seedrandom(seed);
  core.setDataMode(mode);
  core.EPISODE_MAX_TIME = maxTimeMs;
  core.startEpisodeReal();
}"""
# core.getDOMInfo() (it also maps refs to elements for core.elementClick), plus each SELECT's options and the
# chosen one's text (core.js lists neither).
_DOM_JS = """() => {
  const dom = core.getDOMInfo();
  const options = {};
  for (const [ref, el] of Object.entries(core.previousDOMInfo)) {
    if (el instanceof HTMLSelectElement) {
      options[ref] = {options: Array.from(el.options).map((o) => o.text),
                      value: el.selectedIndex >= 0 ? el.options[el.selectedIndex].text : ""};
    }
  }
  return {dom, options};
}"""
# Where the mouse clicks an element: its centre, else the first point of a 5x5 grid over its box where the
# element itself is on top (MiniWoB's pages overlap elements: click-button-sequence's two buttons can), else the
# centre anyway (a real click lands on whatever covers it).
_CLICK_POINT_JS = """(ref) => {
  const el = core.previousDOMInfo[ref];
  const r = el.getBoundingClientRect();
  const at = [0.5, 0.25, 0.75, 0.1, 0.9];
  for (const fy of at) for (const fx of at) {
    const x = r.left + r.width * fx, y = r.top + r.height * fy;
    const hit = document.elementFromPoint(x, y);
    if (hit && (hit === el || el.contains(hit))) return [x, y];
  }
  return [r.left + r.width / 2, r.top + r.height / 2];
}"""
_STATE_JS = """() => ({done: WOB_DONE_GLOBAL, reward: WOB_REWARD_GLOBAL, raw_reward: WOB_RAW_REWARD_GLOBAL,
  reason: WOB_REWARD_REASON == null ? null : String(WOB_REWARD_REASON)})"""


class MiniWoBMissing(RuntimeError):
    """The `miniwob` package (its task pages) is not installed."""


def pages_root() -> Path:
    """`miniwob/html` of the installed wheel (its `miniwob/`, `core/`, `common/` folders)."""
    spec = importlib.util.find_spec("miniwob")
    if spec is None or not spec.submodule_search_locations:
        raise MiniWoBMissing("the MiniWoB++ task pages come from the `miniwob` package: "
                             "pip install --no-deps miniwob==1.1.0 (scripts/setup.sh does)")
    root = Path(next(iter(spec.submodule_search_locations))) / "html"
    if not (root / "core" / "core.js").is_file():
        raise MiniWoBMissing(f"{root} has no core/core.js: the miniwob package is incomplete")
    return root


def available_tasks(root: Path | None = None) -> list[str]:
    """Every task page the wheel ships (`miniwob/<name>.html`)."""
    return sorted(p.stem for p in ((root or pages_root()) / "miniwob").glob("*.html"))


def static_files(root: Path) -> Callable[[str, dict[str, str]], tuple[int, bytes | str, str]]:
    """A `SiteServer` render function serving the files under `root` (nothing outside it)."""
    base = root.resolve()

    def render(path: str, query: dict[str, str]) -> tuple[int, bytes | str, str]:
        target = (base / path.lstrip("/")).resolve()
        if not target.is_relative_to(base) or not target.is_file():
            return 404, "<html><body><h1>Not found</h1></body></html>", "text/html; charset=utf-8"
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind == "application/javascript":
            kind += "; charset=utf-8"
        return 200, target.read_bytes(), kind

    return render


def serve_pages(root: Path | None = None) -> SiteServer:
    return SiteServer(static_files(root or pages_root()))


@dataclass(frozen=True)
class PageState:
    """What the page says about its episode (core.js globals)."""

    done: bool  # WOB_DONE_GLOBAL: the task's handler ended the episode
    reward: float  # WOB_REWARD_GLOBAL: the reward, positive ones scaled by the time left (MiniWoB's default)
    raw_reward: float  # WOB_RAW_REWARD_GLOBAL: the same without the time scaling
    reason: str | None  # WOB_REWARD_REASON, e.g. 'timed out'


class MiniWoBSession:
    """One episode of one task page; its bound methods `click`, `type`, `press` and `select` are the tools.

    Each tool acts with the real mouse and keyboard (Playwright), lets the page's handlers run, and returns
    the page listing again, or, once the page ended the episode, a `ToolOutput(done=True)` that ends it.
    """

    def __init__(self, task: str, seed: int, data_mode: str, origin: str, host: ChromiumHost, *,
                 episode_max_time_s: float, settle_ms: int, screenshot_dir: Path) -> None:
        self.task, self.settle_ms = task, settle_ms
        self.tool = BrowserTool(origin, screenshot_dir, host=host)
        self.elements: dict[int, Element] = {}
        try:
            self.utterance, self.page_text = self.tool.call(
                self._start(f"{origin}/miniwob/{task}.html", seed, data_mode, episode_max_time_s), f"start {task}")
        except BaseException:
            self.tool.close()
            raise

    # ------------------------------------------------------------------ page I/O (browser loop)

    async def _start(self, url: str, seed: int, mode: str, max_time_s: float) -> tuple[str, str]:
        page = self.tool.page
        await page.goto(url, wait_until="load")
        await page.evaluate(_START_JS, [seed, mode, int(max_time_s * 1000)])
        await page.wait_for_function("() => WOB_TASK_READY", timeout=TASK_READY_TIMEOUT_MS)
        return utterance_text(await page.evaluate("() => core.getUtterance()")), await self._listing()

    async def _listing(self) -> str:
        page = await self.tool.page.evaluate(_DOM_JS)
        text, self.elements = listing(page["dom"], page["options"])
        return text

    async def _state(self) -> PageState:
        s = await self.tool.page.evaluate(_STATE_JS)
        return PageState(bool(s["done"]), float(s["reward"]), float(s["raw_reward"]), s["reason"])

    def state(self) -> PageState:
        return self.tool.call(self._state(), "read the page's reward")

    def screenshot(self) -> bytes:
        """A PNG of the task area (#wrap, MiniWoB's 160x210 pixels)."""

        async def shot() -> bytes:
            return await self.tool.page.locator("#wrap").screenshot(type="png")

        return self.tool.call(shot(), "screenshot")

    async def _click_point(self, ref: int) -> tuple[float, float]:
        """A point that clicks element `ref`; text pieces (negative refs) are clicked at their centre."""
        if ref < 0:
            return self.elements[ref].center
        x, y = await self.tool.page.evaluate(_CLICK_POINT_JS, ref)
        return float(x), float(y)

    def _element(self, ref: int) -> Element:
        if ref not in self.elements:
            known = ", ".join(str(r) for r in list(self.elements)[:40])
            raise ToolError(f"there is no element [{ref}] on the page now; its refs are: {known}")
        return self.elements[ref]

    async def _after(self, note: str) -> str | ToolOutput:
        """What an action returns: the page's verdict if it ended the episode, else the page again."""
        if self.settle_ms:
            await self.tool.page.wait_for_timeout(self.settle_ms)
        state = await self._state()
        if state.done:
            reason = f", {state.reason}" if state.reason else ""
            return ToolOutput(output=f"{note}\nThe page ended the episode (reward {state.raw_reward:+.2f}{reason}).",
                              done=True)
        return f"{note}\n\n{await self._listing()}"

    def _act(self, action: Callable[[], Any], note: str, what: str) -> str | ToolOutput:
        async def go() -> str | ToolOutput:
            await action()
            return await self._after(note)

        return self.tool.call(go(), what)

    # ------------------------------------------------------------------ the tools

    def click(self, ref: int) -> str | ToolOutput:
        """Click an element of the page with the mouse (on a visible part of it). Returns the page afterwards.

        Args:
            ref: The element's number, as listed in [brackets] before it.
        """
        self._element(ref)

        async def go() -> None:
            await self.tool.page.mouse.click(*await self._click_point(ref))

        return self._act(go, f"Clicked [{ref}].", f"click [{ref}]")

    def type(self, ref: int, text: str) -> str | ToolOutput:
        """Click an element (a text field) and type text at its cursor, key by key. Returns the page afterwards.

        Args:
            ref: The field's number, as listed in [brackets] before it.
            text: The characters to type.
        """
        self._element(ref)

        async def go() -> None:
            await self.tool.page.mouse.click(*await self._click_point(ref))
            await self.tool.page.keyboard.type(text)

        return self._act(go, f"Typed {text!r} into [{ref}].", f"type into [{ref}]")

    def press(self, key: str) -> str | ToolOutput:
        """Press a key on the focused element. Returns the page afterwards.

        Args:
            key: A key name such as 'Enter', 'Tab', 'Backspace', 'ArrowDown', or a combination like 'Control+a'.
        """
        if not key.strip():
            raise ToolError("press needs a key, e.g. 'Enter' or 'Tab'")
        return self._act(lambda: self.tool.page.keyboard.press(key), f"Pressed {key}.", f"press {key!r}")

    def select(self, ref: int, option: str) -> str | ToolOutput:
        """Choose an option of a drop-down list (a SELECT element) by its text. Returns the page afterwards.

        Args:
            ref: The SELECT element's number, as listed in [brackets] before it.
            option: The text of the option to choose.
        """
        element = self._element(ref)
        if element.tag != "SELECT":
            raise ToolError(f"[{ref}] is a {element.tag}, not a SELECT; use click or type on it")

        async def go() -> None:
            handle = await self.tool.page.evaluate_handle("ref => core.previousDOMInfo[ref]", ref)
            await handle.as_element().select_option(label=option)

        return self._act(go, f"Selected {option!r} in [{ref}].", f"select {option!r} in [{ref}]")

    def close(self) -> None:
        self.tool.close()  # idempotent
