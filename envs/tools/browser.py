"""The `browser` tool: a real headless Chromium (the system one) driven through Playwright.

Actions: open a URL, click a link (by index, text or CSS selector), type into a field (and submit),
read the page as text (visible text, then links with indices and form fields), and take a screenshot
(a PNG in the episode directory). Only the env's own origin (`http://127.0.0.1:PORT`) is reachable:
every request goes through a Playwright route that aborts anything else, `open` refuses other URLs up
front, and Chromium's resolver maps every other host to nothing (defence in depth).

Playwright's async API runs on a `BackgroundLoop` thread, so `step()` can call it synchronously even
from inside the agent's own event loop (the sync Playwright API refuses to run there).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urljoin, urlsplit

from m2rl.envs.tool import ToolError, ToolOutput
from m2rl.envs.tools.background_loop import BackgroundLoop

logger = logging.getLogger(__name__)

CHROMIUM_PATH = "/usr/bin/chromium"
# Flags that work as root in a container with no GPU and no network beyond loopback.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)

_PAGE_STATE_JS = """() => {
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const links = Array.from(document.querySelectorAll('a[href]')).map((a) => ({
    text: (a.innerText || a.textContent || '').trim(), href: a.getAttribute('href') || ''}));
  const fields = Array.from(document.querySelectorAll('input, textarea, select'))
    .filter((el) => el.type !== 'hidden' && visible(el))
    .map((el) => ({tag: el.tagName.toLowerCase(), type: el.type || '', name: el.name || '', id: el.id || '',
      label: (el.labels && el.labels.length ? el.labels[0].innerText : '').trim(), value: el.value || ''}));
  const buttons = Array.from(document.querySelectorAll('button, input[type=submit]'))
    .filter(visible).map((b) => (b.innerText || b.value || '').trim());
  return {links, fields, buttons, text: document.body ? document.body.innerText : ''};
}"""


@dataclass
class BrowserConfig:
    executable_path: str = CHROMIUM_PATH
    launch_args: tuple[str, ...] = CHROMIUM_ARGS
    viewport_width: int = 1024
    viewport_height: int = 768
    action_timeout_s: float = 15.0  # one action (navigation, click, typing) in Chromium
    launch_timeout_s: float = 60.0  # first launch on a loaded 2-core machine is slow
    max_output_chars: int = 6000  # the page text the model reads is cut here (long pages cost context)


STATE_READ_ATTEMPTS = 3  # page-state reads retried across a navigation that lands mid-read


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class ChromiumHost:
    """The Playwright driver and one headless Chromium on a background loop thread, shared by episodes.

    Chromium starts with a fresh profile (Playwright's temporary user-data-dir, deleted at close); each
    `BrowserTool` opens its own isolated context in it, so episodes share no cookies, storage or cache
    while paying Chromium's launch once per env instead of once per episode (benchmarks/web_envs.py: 1.47 s
    for a fresh launch vs 0.20 s for a new context, on a loaded 2-core machine).
    """

    def __init__(self, config: BrowserConfig | None = None) -> None:
        self.config = config or BrowserConfig()
        self._closed = False
        self.loop = BackgroundLoop(name="m2rl-browser")
        try:
            self.loop.run(self._launch(), timeout=self.config.launch_timeout_s)
        except BaseException:
            self.close()
            raise

    async def _launch(self) -> None:
        from playwright.async_api import async_playwright

        self._pw = await async_playwright().start()
        self.browser = await self._pw.chromium.launch(
            executable_path=self.config.executable_path, headless=True, args=list(self.config.launch_args)
        )

    async def _shutdown(self) -> None:
        browser, pw = getattr(self, "browser", None), getattr(self, "_pw", None)
        if browser is not None:
            await browser.close()
        if pw is not None:
            await pw.stop()

    @property
    def alive(self) -> bool:
        return not self._closed and self.loop.alive and self.browser.is_connected()

    def close(self) -> None:
        """Close Chromium, the Playwright driver and the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.loop.alive:
                self.loop.run(self._shutdown(), timeout=30.0)
        except Exception:  # Chromium is a child of the driver, which `pw.stop()` or our exit ends
            logger.debug("browser shutdown failed", exc_info=True)
        finally:
            self.loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BrowserTool:
    """One isolated browser context with one page, confined to `allowed_origin`.

    Pass a `ChromiumHost` to share one Chromium between episodes; without one the tool launches (and
    closes) its own.
    """

    def __init__(
        self,
        allowed_origin: str,
        screenshot_dir: str | Path,
        config: BrowserConfig | None = None,
        host: ChromiumHost | None = None,
    ) -> None:
        split = urlsplit(allowed_origin)
        if split.scheme != "http" or not split.hostname or split.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"allowed_origin must be an http loopback origin, got {allowed_origin!r}")
        self.origin = f"{split.scheme}://{split.netloc}"
        self.config = config or (host.config if host is not None else BrowserConfig())
        self.screenshot_dir = Path(screenshot_dir)
        self.blocked: list[str] = []  # every request the route aborted, for the env's info and tests
        self.visited: list[str] = []  # main-frame URLs loaded, in order
        self._status: int | None = None
        self._shots = 0
        self._closed = False
        self._own_host = host is None
        self.host = host or ChromiumHost(self.config)
        self._loop = self.host.loop
        try:
            self._loop.run(self._open_context(), timeout=self.config.launch_timeout_s)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle (loop thread)

    async def _open_context(self) -> None:
        self._context = await self.host.browser.new_context(
            viewport={"width": self.config.viewport_width, "height": self.config.viewport_height},
            service_workers="block",
            accept_downloads=False,
        )
        self._context.set_default_timeout(self.config.action_timeout_s * 1000)
        await self._context.route("**/*", self._guard)
        self._page = await self._context.new_page()
        self._page.on("response", self._on_response)

    async def _guard(self, route: Any) -> None:
        url = route.request.url
        if self._allowed(url):
            await route.continue_()
        else:
            self.blocked.append(url)
            await route.abort("blockedbyclient")

    def _on_response(self, response: Any) -> None:
        if response.request.is_navigation_request() and response.frame == self._page.main_frame:
            self._status = response.status
            self.visited.append(response.url)

    async def _close_context(self) -> None:
        context = getattr(self, "_context", None)
        if context is not None:
            await context.close()

    def close(self) -> None:
        """Close this tool's context (and its own Chromium, if it launched one); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._loop.alive and self.host.alive:
                self._loop.run(self._close_context(), timeout=30.0)
        except Exception:  # a dead browser took the context with it
            logger.debug("closing the browser context failed", exc_info=True)
        finally:
            if self._own_host:
                self.host.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ for tools built on this context

    @property
    def page(self) -> Any:
        """The Playwright page; use it only inside coroutines passed to `call` (they run on the host's loop)."""
        return self._page

    def call(self, coro: Any, what: str) -> Any:
        """Run `coro` on the browser's loop with this tool's timeout; a failure is a one-line `ToolError`."""
        return self._run(coro, what)

    # ------------------------------------------------------------------ helpers

    def _allowed(self, url: str) -> bool:
        split = urlsplit(url)
        return f"{split.scheme}://{split.netloc}" == self.origin

    def _resolve(self, url: str) -> str:
        url = url.strip()
        if not url:
            raise ToolError(f"open needs a url, e.g. '/' or '{self.origin}/catalogue'")
        absolute = urljoin(self.origin + "/", url)
        if not self._allowed(absolute):
            raise ToolError(
                f"Blocked: {url!r} is outside this environment. "
                f"Only pages under {self.origin}/ can be opened "
                "(use a path like '/catalogue' or a link from the current page)."
            )
        return absolute

    def _run(self, coro: Any, what: str) -> Any:
        if self._closed:
            coro.close()
            raise ToolError("the browser is closed")
        try:
            return self._loop.run(coro, timeout=self.config.action_timeout_s * 2 + 5)
        except ToolError:
            raise
        except TimeoutError as exc:
            raise ToolError(f"{what} timed out after {self.config.action_timeout_s:.0f}s") from exc
        except Exception as exc:  # Playwright errors carry a long call log: keep the first line for the model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ToolError(f"{what} failed: {first}") from exc

    def _short_href(self, href: str) -> str:
        absolute = urljoin(self._page.url, href)
        if absolute.startswith(self.origin):
            return absolute[len(self.origin) :] or "/"
        return absolute

    async def _state(self) -> dict[str, Any]:
        # An action can start a navigation that commits (or is aborted into an error page) after the action
        # returned; reading the page in that window hits a destroyed execution context. Wait for the new
        # document and read again.
        for _ in range(STATE_READ_ATTEMPTS - 1):
            try:
                return await self._page.evaluate(_PAGE_STATE_JS)
            except Exception as exc:
                if "Execution context was destroyed" not in str(exc):
                    raise
                await self._page.wait_for_load_state("load")
        return await self._page.evaluate(_PAGE_STATE_JS)

    async def _render(self, note: str = "", blocked_before: int | None = None) -> str:
        page = self._page
        lines: list[str] = []
        if note:
            lines.append(note)
        if blocked_before is not None and len(self.blocked) > blocked_before:
            lines.append(
                f"Blocked request(s) to {', '.join(self.blocked[blocked_before:][:3])}: "
                f"only {self.origin}/ is "
                "reachable from this browser."
            )
        if page.url.startswith("chrome-error://") or page.url == "about:blank":
            lines.append("No page is loaded. Use action 'open' with a path such as '/'.")
            return "\n".join(lines)
        state = await self._state()
        lines += [f"URL: {self._short_href(page.url)}", f"Title: {await page.title()}"]
        if self._status is not None:
            lines.append(f"Status: {self._status}")
        lines += ["", state["text"].strip()]
        if state["links"]:
            lines += ["", "Links:"]
            lines += [
                f"[{i}] {link['text'] or '(no text)'} -> {self._short_href(link['href'])}"
                for i, link in enumerate(state["links"])
            ]
        if state["fields"]:
            lines += ["", "Fields:"]
            for f in state["fields"]:
                label = f" label={f['label']!r}" if f["label"] else ""
                lines.append(
                    f"- {f['tag']} name={f['name']!r} id={f['id']!r} type={f['type']!r}{label} "
                    f"value={f['value']!r}"
                )
        if state["buttons"]:
            lines.append("Buttons: " + ", ".join(repr(b) for b in state["buttons"]))
        text = "\n".join(lines)
        limit = self.config.max_output_chars
        return text if len(text) <= limit else text[:limit] + f"\n... [page text cut at {limit} characters]"

    # ------------------------------------------------------------------ actions (caller thread)

    def open(self, url: str) -> str:
        """Load `url` (a path like '/catalogue' or a URL on the env's origin); returns the page text."""
        absolute = self._resolve(url)

        async def go() -> str:
            before = len(self.blocked)
            self._status = None
            await self._page.goto(absolute, wait_until="load")
            return await self._render(blocked_before=before)

        return self._run(go(), f"open {url!r}")

    def read(self) -> str:
        """The current page as text: visible text, numbered links, form fields."""
        return self._run(self._render(), "read")

    async def _find_link(self, target: str) -> Any:
        """A locator for `target`: a link index ('3' or '[3]'), a link's exact text, or a CSS selector."""
        page, wanted = self._page, target.strip()
        links = (await self._state())["links"]
        index = wanted.strip("[]")
        if index.isdigit():
            i = int(index)
            if i >= len(links):
                raise ToolError(
                    f"there is no link [{i}] on this page (links are numbered 0..{len(links) - 1})"
                )
            return page.locator("a[href]").nth(i)
        for i, link in enumerate(links):
            if link["text"].strip().lower() == wanted.lower():
                return page.locator("a[href]").nth(i)
        try:
            locator = page.locator(wanted)
            count = await locator.count()
        except Exception:  # not a selector either: the error below lists the links
            logger.debug("%r is not a usable selector", wanted, exc_info=True)
            count = 0
        if count == 0:
            names = ", ".join(repr(link["text"]) for link in links[:30])
            raise ToolError(
                f"no link with text {wanted!r} and no element matches CSS selector {wanted!r}. "
                f"Links on this page: {names or '(none)'}"
            )
        return locator.first

    def click(self, target: str) -> str:
        """Click a link by index ('3'), exact link text, or CSS selector; returns the resulting page."""

        async def go() -> str:
            before = len(self.blocked)
            locator = await self._find_link(target)
            await locator.click()
            await self._page.wait_for_load_state("load")
            return await self._render(blocked_before=before)

        return self._run(go(), f"click {target!r}")

    async def _find_field(self, field: str) -> Any:
        page, wanted = self._page, field.strip()
        candidates = []
        if wanted:
            candidates = [page.get_by_label(wanted, exact=True)]
            if wanted.replace("-", "").replace("_", "").isalnum():
                candidates += [page.locator(f'[name="{wanted}"]'), page.locator(f"#{wanted}")]
            candidates.append(page.locator(wanted))
        else:
            candidates = [page.locator("input[type=text], input[type=search], input:not([type]), textarea")]
        for locator in candidates:
            try:
                if await locator.count() > 0:
                    return locator.first
            except Exception:  # not a valid selector: try the next reading of `field`
                logger.debug("a reading of the field name is not a valid selector", exc_info=True)
                continue
        fields = (await self._state())["fields"]
        names = ", ".join(repr(f["name"] or f["id"]) for f in fields)
        raise ToolError(
            f"no input field matches {field!r} (by label, name, id or CSS selector). "
            f"Fields on this page: {names or '(none)'}"
        )

    def type(self, field: str, text: str, submit: bool = True) -> str:
        """Type `text` into a field (by label, name, id or CSS selector; '' = the first text box)."""

        async def go() -> str:
            before = len(self.blocked)
            locator = await self._find_field(field)
            await locator.fill(text)
            note = "" if submit else f"Typed {text!r} (not submitted)."
            if submit and await locator.evaluate("el => !!el.form"):
                async with self._page.expect_navigation(wait_until="load"):
                    await locator.press("Enter")
            elif (
                submit
            ):  # Enter outside a form submits nothing: do not wait for a navigation that never comes
                await locator.press("Enter")
                note = f"Typed {text!r} and pressed Enter (the field is in no form: nothing was submitted)."
            return await self._render(note=note, blocked_before=before)

        return self._run(go(), f"type into {field!r}")

    def screenshot(self) -> ToolOutput:
        """Save a PNG of the current page in the screenshot directory; returns its path and size."""
        self.screenshot_dir.mkdir(parents=True, exist_ok=True)
        path = self.screenshot_dir / f"screenshot_{self._shots:03d}.png"
        self._shots += 1
        data: bytes = self._run(self._page.screenshot(path=str(path), full_page=True), "screenshot")
        width, height = png_size(data)
        return ToolOutput(
            output=f"Saved screenshot {path} ({len(data)} bytes, {width}x{height} PNG) of "
            f"{self._short_href(self._page.url)}"
        )

    # ------------------------------------------------------------------ the agent-facing tool

    def browser(
        self,
        action: Literal["open", "click", "type", "read", "screenshot"],
        url: str = "",
        target: str = "",
        text: str = "",
        submit: bool = True,
    ) -> str | ToolOutput:
        """Use a web browser that can reach only this environment's local website. Every action returns the
        page as text: its visible text, then its links numbered [0], [1], ... and its form fields.

        Args:
            action: 'open' a url, 'click' a link, 'type' into a field, 'read' the current page, or take a
                'screenshot'.
            url: For 'open': a path such as '/' or '/catalogue', or a full URL on the site's own origin.
            target: For 'click': a link number such as '3', a link's exact text, or a CSS selector.
                For 'type': the field's label, name, id or CSS selector ('' = the first text box).
            text: For 'type': the text to enter.
            submit: For 'type': press Enter after typing to submit the form.
        """
        if action == "open":
            return self.open(url)
        if action == "click":
            if not target.strip():
                raise ToolError(
                    "click needs a target: a link number such as '3', a link's text, or a CSS selector"
                )
            return self.click(target)
        if action == "type":
            return self.type(target, text, submit=submit)
        if action == "read":
            return self.read()
        if action == "screenshot":
            return self.screenshot()
        raise ToolError(f"unknown action {action!r}; use one of open, click, type, read, screenshot")
