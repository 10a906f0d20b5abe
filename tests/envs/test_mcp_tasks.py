"""The MCP task set (pure parts): generation, splits, and answers checked against independent oracles."""

from __future__ import annotations

import configparser
import json
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from m2rl.envs.mcp_env import build_git_repo, prepare_workspace
from m2rl.envs.tasks.base import split_of
from m2rl.envs.tasks.mcp_tasks import FIXED_ZONES, MCPTaskSet, convert_hhmm


def test_fixed_zones_have_no_daylight_saving_and_conversion_matches_zoneinfo() -> None:
    """Oracle: the IANA database, on dates in both halves of the year."""
    for zone, minutes in FIXED_ZONES.items():
        for day in (datetime(2026, 1, 15), datetime(2026, 7, 15)):
            assert day.replace(tzinfo=ZoneInfo(zone)).utcoffset() == timedelta(minutes=minutes), zone
    for source in ("Asia/Kathmandu", "America/Phoenix", "UTC"):
        for target in ("Asia/Kabul", "Pacific/Honolulu", "Australia/Brisbane"):
            for hhmm in ("00:00", "07:35", "23:55"):
                h, m = map(int, hhmm.split(":"))
                moment = datetime(2026, 3, 1, h, m, tzinfo=ZoneInfo(source)).astimezone(ZoneInfo(target))
                assert convert_hhmm(hhmm, source, target) == moment.strftime("%H:%M")


def test_generation_is_deterministic_and_splits_are_disjoint() -> None:
    tasks = MCPTaskSet()
    for kind in tasks.kinds:
        a, b = tasks.generate(kind, 17), tasks.generate(kind, 17)
        assert a == b and a.meta["server"] == tasks.server_of_kind[kind]
        assert tasks.get(a.id) == a and a.split == split_of("mcp", 17)
    assert not set(tasks.seeds("train", 40)) & set(tasks.seeds("test", 15))
    with pytest.raises(KeyError):
        tasks.generate("nope", 1)


def test_filesystem_answers_match_the_written_workspace(tmp_path: Path) -> None:
    tasks = MCPTaskSet()
    for seed in tasks.seeds("test", 4):
        task = tasks.generate("fs_count_word", seed)
        ws = tmp_path / f"count-{seed}"
        prepare_workspace(task, ws)
        # Oracle: grep -w over the real files.
        found = subprocess.run(
            ["grep", "-rlw", "--include=*.txt", task.meta["word"], str(ws)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        assert task.answer == str(len(found))
        task = tasks.generate("fs_find_value", seed)
        ws = tmp_path / f"value-{seed}"
        prepare_workspace(task, ws)
        (path,) = list(ws.rglob(task.meta["filename"]))
        parser = configparser.ConfigParser()
        parser.read(path)
        assert task.answer == parser["server"]["port"]


def test_knowledge_graph_answers() -> None:
    tasks = MCPTaskSet()
    for seed in tasks.seeds("test", 4):
        task = tasks.generate("kg_manager", seed)
        items = [json.loads(line) for line in task.files["memory.jsonl"].splitlines()]
        managers = [
            i["from"]
            for i in items
            if i["type"] == "relation" and i["relationType"] == "manages" and i["to"] == task.meta["person"]
        ]
        assert managers == [task.answer]


def test_git_history_and_answers(tmp_path: Path) -> None:
    tasks = MCPTaskSet()
    seed = tasks.seeds("test", 1)[0]
    task = tasks.generate("git_author", seed)
    build_git_repo(tmp_path, task.meta["commits"])
    log = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%an", "--", task.meta["path"]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert log[0] == task.answer
    count = subprocess.run(
        ["git", "rev-list", "--count", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert int(count) == len(task.meta["commits"])
