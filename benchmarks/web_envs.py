"""Episode overheads of the browser and MCP envs, each against its baseline measured in the same run.

Browser: the time to get an episode's browser ready (site server + isolated context in one shared
Chromium, what `BrowserEnv.reset` does) vs launching a fresh Chromium per episode (the baseline), and the
latency of one `open` and one `click` action.
MCP: the time to start each stdio server and list its tools, as a plain host process (baseline) and under
bubblewrap (what `MCPEnv` does when bwrap is installed), and the latency of one tool call.
Median of --repeats. Prints a table, then one JSON line.

    python -m m2rl.benchmarks.web_envs [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from m2rl.envs.mcp_env import SERVERS, bwrap_available, isolate, server_available, server_spec
from m2rl.envs.sites.company import generate_site, render
from m2rl.envs.sites.server import SiteServer
from m2rl.envs.tools.browser import BrowserTool, ChromiumHost
from m2rl.envs.tools.mcp import MCPClient

CALLS = {
    "filesystem": ("list_allowed_directories", {}),
    "memory": ("read_graph", {}),
    "time": ("convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}),
    "git": ("git_status", {"repo_path": "."}),
}


def median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_browser(repeats: int, workdir: Path) -> dict[str, float]:
    site = generate_site(0)
    out: dict[str, float] = {}
    with SiteServer(lambda p, q: render(site, p, q)) as server:

        def fresh_launch() -> None:
            BrowserTool(server.origin, workdir).close()

        out["episode_ready_fresh_chromium_s"] = median_s(fresh_launch, repeats)
        with ChromiumHost() as host:

            def shared() -> None:
                BrowserTool(server.origin, workdir, host=host).close()

            out["episode_ready_shared_chromium_s"] = median_s(shared, repeats)
            tool = BrowserTool(server.origin, workdir, host=host)
            out["action_open_s"] = median_s(lambda: tool.open("/catalogue"), repeats)
            out["action_click_s"] = median_s(lambda: (tool.open("/"), tool.click("Staff directory")), repeats)
            out["action_click_s"] -= out["action_open_s"]
            tool.close()
    return out


def bench_mcp(repeats: int, workdir: Path) -> dict[str, float]:
    import subprocess

    out: dict[str, float] = {}
    for server in SERVERS:
        if not server_available(server):
            continue
        ws = workdir / server
        ws.mkdir(exist_ok=True)
        if server == "git" and not (ws / ".git").exists():
            subprocess.run(["git", "init", "-q", str(ws)], check=True)
        variants = {"plain": lambda s=server, w=ws: server_spec(s, w)}
        if bwrap_available():
            variants["bwrap"] = lambda s=server, w=ws: isolate(server_spec(s, w), w)
        for name, make in variants.items():

            def start_and_list(make: Callable[[], object] = make) -> None:
                with MCPClient(make()) as client:  # type: ignore[arg-type]
                    client.list_tools()

            out[f"{server}_start_{name}_s"] = median_s(start_and_list, repeats)
        with MCPClient(server_spec(server, ws)) as client:
            tool, args = CALLS[server]
            out[f"{server}_call_s"] = median_s(lambda: client.call_tool(tool, args), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="m2rl-bench-web-") as tmp:
        results = {**bench_browser(args.repeats, Path(tmp)), **bench_mcp(args.repeats, Path(tmp))}
    print(f"{'measure':<40} {'median':>10}")
    for key, value in results.items():
        print(f"{key:<40} {value * 1000:>8.1f}ms")
    fresh, shared = results["episode_ready_fresh_chromium_s"], results["episode_ready_shared_chromium_s"]
    print(
        f"shared Chromium makes an episode's browser ready {fresh / shared:.1f}x faster than a fresh launch"
    )
    print(
        json.dumps(
            {
                "benchmark": "web_envs",
                "host": platform.node(),
                "cpu": platform.processor(),
                "repeats": args.repeats,
                **{k: round(v, 4) for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
