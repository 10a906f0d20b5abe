"""Scripted expert and wrong policies for the browser and MCP task families.

A script is a generator over one task: it yields the tool calls of the next assistant turn (a list of
`(name, arguments)`) and receives the text outputs of those calls. The expert reads every fact it submits
off the tool outputs (page text, server replies), never off the task's hidden answer, so a broken tool,
site or server makes it fail. Same protocol as `envs/experts.py` (whose `run_script` drives an env).
"""

from __future__ import annotations

import configparser
import json
import re
from typing import Any

from m2rl.envs.experts import Call, Script, ScriptFn, action_text, run_script
from m2rl.envs.tasks.base import Task
from m2rl.envs.tasks.mcp_tasks import contains_word

__all__ = [
    "Call",
    "Script",
    "ScriptFn",
    "action_text",
    "browser_expert",
    "browser_wrong",
    "mcp_expert",
    "mcp_wrong",
    "run_script",
]


# ----------------------------------------------------------------------------- browser


def _field(page: str, name: str) -> str:
    """A value from a leaf page's table (`Name<TAB>value` lines in Chromium's innerText)."""
    match = re.search(rf"^{re.escape(name)}\s+(.+)$", page, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {name!r} row on the page:\n{page[:500]}")
    return match.group(1).strip()


def _links(page: str) -> list[tuple[str, str]]:
    """(text, path) of the numbered links the browser tool lists."""
    return re.findall(r"^\[\d+\] (.*) -> (\S+)$", page, re.MULTILINE)


def _browse(action: str, **args: Any) -> list[Call]:
    return [("browser", {"action": action, **args})]


def browser_expert(task: Task) -> Script:
    meta = task.meta
    if task.kind == "item_price":
        yield _browse("open", url="/")
        yield _browse("click", target="Product catalogue")
        yield _browse("click", target=meta["category"])
        (page,) = yield _browse("click", target=meta["item"])
        yield [("submit", {"answer": _field(page, "Price").lstrip("$")})]
    elif task.kind in ("earliest_joiner", "out_of_stock_count"):
        section = "Staff directory" if task.kind == "earliest_joiner" else "Product catalogue"
        group = meta["department"] if task.kind == "earliest_joiner" else meta["category"]
        yield _browse("open", url="/")
        yield _browse("click", target=section)
        (listing,) = yield _browse("click", target=group)
        prefix = "/staff/" if task.kind == "earliest_joiner" else "/catalogue/"
        leaves = [
            (text, path) for text, path in _links(listing) if path.startswith(prefix) and path.count("/") == 3
        ]
        pages = {}
        for text, path in leaves:
            (page,) = yield _browse("open", url=path)
            pages[text] = page
        if task.kind == "earliest_joiner":
            answer = min(pages, key=lambda name: _field(pages[name], "Joined"))
        else:
            answer = str(sum(1 for page in pages.values() if _field(page, "Availability") == "Out of stock"))
        yield [("submit", {"answer": answer})]
    elif task.kind in ("sku_lookup", "employee_office"):
        query = meta["sku"] if task.kind == "sku_lookup" else meta["employee"]
        yield _browse("open", url="/search")
        (results,) = yield _browse("type", target="q", text=query, submit=True)
        hits = [path for text, path in _links(results) if query in text]
        (page,) = yield _browse("open", url=hits[0])
        if task.kind == "sku_lookup":
            answer = re.search(r"^Title: (.+)$", page, re.MULTILINE).group(1).strip()  # type: ignore[union-attr]
        else:
            answer = _field(page, "Office")
        yield [("submit", {"answer": answer})]
    else:
        raise ValueError(f"no browser expert for kind {task.kind!r}")


def browser_wrong(task: Task) -> Script:
    """Looks at the home page, then submits an answer that no task has."""
    yield _browse("open", url="/")
    yield [("submit", {"answer": "I could not find it"})]


# ----------------------------------------------------------------------------- MCP


def _workspace(listing: str) -> str:
    lines = [line.strip() for line in listing.splitlines() if line.strip().startswith("/")]
    return lines[0]


def mcp_expert(task: Task) -> Script:
    meta, kind = task.meta, task.kind
    if kind == "fs_count_word":
        (listing,) = yield [("list_allowed_directories", {})]
        (found,) = yield [("search_files", {"path": _workspace(listing), "pattern": "**/*.txt"})]
        paths = [line.strip() for line in found.splitlines() if line.strip().endswith(".txt")]
        count = 0
        for start in range(0, len(paths), 8):  # up to 8 parallel calls per turn
            chunk = paths[start : start + 8]
            texts = yield [("read_text_file", {"path": path}) for path in chunk]
            count += sum(1 for text in texts if contains_word(text, meta["word"]))
        yield [("submit", {"answer": str(count)})]
    elif kind == "fs_find_value":
        (listing,) = yield [("list_allowed_directories", {})]
        (found,) = yield [
            ("search_files", {"path": _workspace(listing), "pattern": f"**/{meta['filename']}"})
        ]
        (text,) = yield [("read_text_file", {"path": found.splitlines()[0].strip()})]
        parser = configparser.ConfigParser()
        parser.read_string(text)
        yield [("submit", {"answer": parser["server"]["port"]})]
    elif kind == "kg_manager":
        (nodes,) = yield [("open_nodes", {"names": [meta["person"]]})]
        graph = json.loads(nodes)
        manager = next(
            r["from"]
            for r in graph["relations"]
            if r["relationType"] == "manages" and r["to"] == meta["person"]
        )
        yield [("submit", {"answer": manager})]
    elif kind == "kg_count":
        (text,) = yield [("read_graph", {})]
        graph = json.loads(text)
        employer = {r["from"]: r["to"] for r in graph["relations"] if r["relationType"] == "works_at"}
        count = sum(
            1
            for e in graph["entities"]
            if e["entityType"] == "person"
            and employer.get(e["name"]) == meta["org"]
            and f"lives in {meta['city']}" in e["observations"]
        )
        yield [("submit", {"answer": str(count)})]
    elif kind == "time_convert":
        (text,) = yield [
            (
                "convert_time",
                {"source_timezone": meta["source"], "time": meta["time"], "target_timezone": meta["target"]},
            )
        ]
        target = json.loads(text)["target"]["datetime"]  # ISO 8601: YYYY-MM-DDTHH:MM:SS+hh:mm
        yield [("submit", {"answer": target[11:16]})]
    elif kind in ("git_author", "git_count"):
        (log,) = yield [("git_log", {"repo_path": ".", "max_count": 100})]
        entries = re.findall(r"^Commit: ([0-9a-f]{40})\nAuthor: (.+)$", log, re.MULTILINE)
        if kind == "git_count":
            yield [
                (
                    "submit",
                    {"answer": str(sum(1 for _, author in entries if author.strip() == meta["author"]))},
                )
            ]
            return
        for commit, author in reversed(entries):  # oldest first: the first commit touching the file added it
            (shown,) = yield [("git_show", {"repo_path": ".", "revision": commit})]
            if f"+++ b/{meta['path']}" in shown:
                yield [("submit", {"answer": author.strip()})]
                return
        yield [("submit", {"answer": "not found"})]
    else:
        raise ValueError(f"no MCP expert for kind {kind!r}")


def mcp_wrong(task: Task) -> Script:
    """Submits an answer no task has, without using the server."""
    yield [("submit", {"answer": "I could not find it"})]
