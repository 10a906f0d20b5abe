"""The `browser` tool against real headless Chromium and a real local HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from m2rl.envs.sites.company import generate_site, item_url, render
from m2rl.envs.sites.server import SiteServer
from m2rl.envs.tool import ToolError, ToolOutput
from m2rl.envs.tools.browser import BrowserTool, ChromiumHost, png_size
from m2rl.envs.tools.processes import live_descendants

pytestmark = pytest.mark.browser


def wait_no_new_processes(before: dict[int, str], timeout: float = 10.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        leaked = {pid: cmd for pid, cmd in live_descendants().items() if pid not in before}
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(0.2)


@pytest.fixture(scope="module")
def host() -> Iterator[ChromiumHost]:
    before = live_descendants()
    threads = set(threading.enumerate())
    host = ChromiumHost()
    assert any("chromium" in cmd for cmd in live_descendants().values())
    yield host
    host.close()
    assert wait_no_new_processes(before) == {}, "Chromium or the Playwright driver outlived close()"
    assert {t for t in threading.enumerate() if t.is_alive()} <= threads


@pytest.fixture(scope="module")
def site_server() -> Iterator[SiteServer]:
    site = generate_site(21)
    with SiteServer(lambda p, q: render(site, p, q)) as server:
        server.site = site  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def tool(host: ChromiumHost, site_server: SiteServer, tmp_path: Path) -> Iterator[BrowserTool]:
    tool = BrowserTool(site_server.origin, tmp_path / "shots", host=host)
    yield tool
    tool.close()


def test_open_click_by_text_index_and_css(tool: BrowserTool, site_server: SiteServer) -> None:
    site = site_server.site  # type: ignore[attr-defined]
    page = tool.browser("open", url="/")
    assert "URL: /" in page and "Status: 200" in page and "[0] Product catalogue -> /catalogue" in page
    page = tool.browser("click", target="Product catalogue")
    assert "URL: /catalogue" in page
    category = list(site.categories)[1]
    page = tool.browser("click", target=category.upper())  # link text matches case-insensitively
    assert f"Category: {category}" in page
    item = site.categories[category][0]
    index = next(
        line.split("]")[0].lstrip("[") for line in page.splitlines() if line.endswith(item_url(item))
    )
    page = tool.browser("click", target=f"[{index}]")
    assert f"Title: {item.name}" in page and f"${item.price}" in page
    page = tool.browser("click", target="nav a:first-child")  # a CSS selector: the Home crumb
    assert "URL: /\n" in page
    assert tool.visited[-1] == site_server.origin + "/"


def test_type_into_the_search_form_and_submit(tool: BrowserTool, site_server: SiteServer) -> None:
    item = site_server.site.items()[3]  # type: ignore[attr-defined]
    tool.open("/search")
    page = tool.browser("type", target="q", text=item.sku)
    assert f"URL: /search?q={item.sku}" in page
    assert f"{item.name} ({item.sku}) -> {item_url(item)}" in page
    page = tool.browser("type", target="Search items, SKUs and staff:", text="abc", submit=False)
    assert "not submitted" in page and "value='abc'" in page
    with pytest.raises(ToolError, match="no input field matches 'nope'"):
        tool.type("nope", "x")


def test_screenshot_is_a_png_in_the_episode_dir(tool: BrowserTool, tmp_path: Path) -> None:
    tool.open("/staff")
    out = tool.browser("screenshot")
    assert isinstance(out, ToolOutput) and out.ok
    path = tmp_path / "shots" / "screenshot_000.png"
    data = path.read_bytes()
    width, height = png_size(data)
    assert width == 1024 and height >= 1
    assert f"{path} ({len(data)} bytes, {width}x{height} PNG)" in out.output


def test_bad_targets_give_clear_errors(tool: BrowserTool) -> None:
    tool.open("/")
    with pytest.raises(ToolError, match=r"no link \[99\]"):
        tool.click("99")
    with pytest.raises(ToolError, match="no link with text 'Nowhere'.*Links on this page"):
        tool.click("Nowhere")
    with pytest.raises(ToolError, match="no element matches CSS selector"):
        tool.click("div[[[")
    with pytest.raises(ToolError, match="unknown action"):
        tool.browser("fly")  # type: ignore[arg-type]
    with pytest.raises(ToolError, match="click needs a target"):
        tool.browser("click")
    page = tool.open("/does/not/exist")
    assert "Status: 404" in page and "Page not found" in page


def test_only_the_env_origin_is_reachable(host: ChromiumHost, tmp_path: Path) -> None:
    """A page that pulls resources from elsewhere (another local server, other hosts) gets them aborted."""
    other_hits: list[str] = []
    with SiteServer(lambda p, q: (other_hits.append(p) or 200, "<html><body>other</body></html>")) as other:
        page_html = (
            "<html><body><h1>Hub</h1>"
            f'<img src="{other.origin}/pixel.png"><img src="http://example.com/x.png">'
            f'<script src="http://10.1.2.3/evil.js"></script>'
            f'<a href="{other.origin}/secret">other local server</a> <a href="http://example.com/">outside</a>'
            "</body></html>"
        )
        with SiteServer(lambda p, q: (200, page_html)) as own:
            tool = BrowserTool(own.origin, tmp_path, host=host)
            try:
                page = tool.open("/")
                assert "Hub" in page and "Blocked request(s)" in page
                assert {
                    f"{other.origin}/pixel.png",
                    "http://example.com/x.png",
                    "http://10.1.2.3/evil.js",
                } <= set(tool.blocked)
                page = tool.click("other local server")
                assert "Blocked request(s) to " + f"{other.origin}/secret" in page
                for url in (
                    f"{other.origin}/secret",
                    "http://example.com/",
                    "file:///etc/passwd",
                    "chrome://version",
                    "data:text/html,<h1>x</h1>",
                    "javascript:alert(1)",
                ):
                    with pytest.raises(ToolError, match="Blocked: .* Only pages under"):
                        tool.open(url)
            finally:
                tool.close()
        assert other_hits == []  # not one request reached the other server


def test_a_tool_without_a_host_launches_and_closes_its_own_chromium(tmp_path: Path) -> None:
    before = live_descendants()
    site = generate_site(1)
    with SiteServer(lambda p, q: render(site, p, q)) as server:
        tool = BrowserTool(server.origin, tmp_path)
        assert "No page is loaded" in tool.read()
        assert "Welcome" in tool.open("/")
        tool.close()
        tool.close()  # idempotent
        with pytest.raises(ToolError, match="closed"):
            tool.open("/")
    assert wait_no_new_processes(before) == {}


def test_refuses_a_non_loopback_origin(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        BrowserTool("http://example.com", tmp_path)


def test_usable_from_inside_a_running_event_loop(tool: BrowserTool) -> None:
    """An async agent loop may call the sync `step()`; the sync Playwright API would refuse to run there."""
    import asyncio

    async def agent_turn() -> str:
        return tool.open("/")

    assert "Welcome" in asyncio.run(agent_turn())
