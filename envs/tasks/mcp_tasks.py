"""MCP tasks: questions answered through the tools of a real MCP server started over stdio.

Each task names its server in `meta["server"]` and carries the data that server works on, generated from
the seed: files for the filesystem server (`files`), a knowledge-graph JSONL for the memory server
(`files["memory.jsonl"]`), commits for the git server (`meta["commits"]`); the time server needs none.
The env writes that data into a fresh episode workspace before starting the server (`envs/mcp_env.py`).
Answers are computed here, on the host, from the generated data and graded by exact match.

Servers (see `envs/mcp_env.py` for how they are installed and started):
- `filesystem`: npm `@modelcontextprotocol/server-filesystem`, confined to the workspace.
- `memory`: npm `@modelcontextprotocol/server-memory`, a knowledge graph loaded from the workspace.
- `time`: PyPI `mcp-server-time` (conversions between zones without daylight saving, so exact on any date).
- `git`: PyPI `mcp-server-git`, confined to a repository built in the workspace.
"""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from m2rl.envs.tasks.base import Task, TaskSet

SYSTEM_PROMPT = (
    "You are an agent with tools provided by an MCP server. Use them to find the answer, then call `submit` "
    "with the answer exactly in the requested format."
)

_WORDS = [
    "apple",
    "harbor",
    "glacier",
    "violet",
    "copper",
    "meadow",
    "falcon",
    "ember",
    "lantern",
    "orchid",
    "pebble",
    "quartz",
    "saffron",
    "timber",
    "walnut",
    "zenith",
    "cobalt",
    "dune",
    "fjord",
    "lagoon",
    "maple",
    "nectar",
    "otter",
    "prism",
    "raven",
    "sierra",
    "tundra",
    "willow",
    "yarrow",
    "basil",
]
_DIRS = ["notes", "notes/archive", "reports", "reports/2025", "logs", "misc"]
_PEOPLE = [
    "Alice Moreno",
    "Bilal Khan",
    "Chen Wei",
    "Dana Fischer",
    "Emeka Obi",
    "Freya Lund",
    "Gustavo Reis",
    "Hiro Tanaka",
    "Isla Murray",
    "Jamal Ortiz",
    "Kira Novak",
    "Luca Bianchi",
    "Maya Cohen",
    "Nils Berg",
    "Olga Ivanova",
    "Pablo Ruiz",
    "Rina Sato",
    "Sami Haddad",
    "Tess Walker",
    "Ugo Conti",
]
_ORGS = ["Northwind Labs", "Bluefin Systems", "Cedar Analytics", "Orbit Foods"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Quito"]
# Zones whose UTC offset has no daylight-saving rule: a conversion is the same on every date.
FIXED_ZONES: dict[str, int] = {  # zone -> UTC offset in minutes
    "UTC": 0,
    "Asia/Tokyo": 540,
    "Asia/Kolkata": 330,
    "Asia/Shanghai": 480,
    "Asia/Dubai": 240,
    "Asia/Kathmandu": 345,
    "Africa/Nairobi": 180,
    "America/Bogota": -300,
    "America/Phoenix": -420,
    "Pacific/Honolulu": -600,
    "Asia/Singapore": 480,
    "Africa/Lagos": 60,
    "Asia/Karachi": 300,
    "Asia/Jakarta": 420,
    "Australia/Brisbane": 600,
    "Asia/Kabul": 270,
    "America/Argentina/Buenos_Aires": -180,
}
_GIT_AUTHORS = [
    ("Ana Lima", "ana@example.org"),
    ("Ben Okoro", "ben@example.org"),
    ("Cleo Park", "cleo@example.org"),
    ("Dev Patel", "dev@example.org"),
]
_COMMIT_MESSAGES = [
    "Refactor helpers",
    "Tidy up",
    "Small fixes",
    "Update module",
    "Improve docs",
    "Work in progress",
    "Adjust settings",
    "Clean code",
]


def contains_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def convert_hhmm(hhmm: str, source: str, target: str) -> str:
    """HH:MM in `source` zone -> HH:MM in `target` zone (both in FIXED_ZONES)."""
    hours, minutes = (int(x) for x in hhmm.split(":"))
    total = hours * 60 + minutes - FIXED_ZONES[source] + FIXED_ZONES[target]
    total %= 24 * 60
    return f"{total // 60:02d}:{total % 60:02d}"


class MCPTaskSet(TaskSet):
    family = "mcp"
    kinds = (
        "fs_count_word",
        "fs_find_value",
        "kg_manager",
        "kg_count",
        "time_convert",
        "git_author",
        "git_count",
    )
    system_prompt = SYSTEM_PROMPT
    server_of_kind: ClassVar[dict[str, str]] = {
        "fs_count_word": "filesystem",
        "fs_find_value": "filesystem",
        "kg_manager": "memory",
        "kg_count": "memory",
        "time_convert": "time",
        "git_author": "git",
        "git_count": "git",
    }

    def setup(self, task: Task, sandbox: object) -> None:
        """Nothing to do in a sandbox: the MCP env writes `task.files` into the server's own workspace."""

    def generate(self, kind: str, seed: int) -> Task:
        if kind not in self.kinds:
            raise KeyError(f"unknown MCP task kind {kind!r}; known: {list(self.kinds)}")
        rng = random.Random(f"mcp-task-{kind}-{seed}")
        server = self.server_of_kind[kind]
        prompt, answer, files, meta = getattr(self, f"_{kind}")(rng)
        meta = {"server": server, **meta}
        return self.make_task(kind, seed, prompt, answer=answer, files=files, meta=meta)

    # ------------------------------------------------------------------ filesystem server

    @staticmethod
    def _text_files(rng: random.Random, n_files: int) -> dict[str, str]:
        names = rng.sample(_WORDS, n_files)
        files = {}
        for i, name in enumerate(names):
            ext = rng.choice([".txt", ".txt", ".md", ".log"])
            lines = [" ".join(rng.sample(_WORDS, rng.randint(4, 8))) for _ in range(rng.randint(2, 5))]
            files[f"{rng.choice(_DIRS)}/{name}-{i}{ext}"] = "\n".join(lines) + "\n"
        return files

    def _fs_count_word(self, rng: random.Random) -> tuple[str, str, dict[str, str], dict]:
        files = self._text_files(rng, rng.randint(10, 16))
        word = rng.choice(_WORDS)
        count = sum(1 for path, text in files.items() if path.endswith(".txt") and contains_word(text, word))
        prompt = (
            "The MCP filesystem server gives you access to one data directory (call "
            "list_allowed_directories to see it). How many files with the extension .txt, in any "
            f"subdirectory, contain the word '{word}'? Answer with a number."
        )
        return prompt, str(count), files, {"word": word}

    def _fs_find_value(self, rng: random.Random) -> tuple[str, str, dict[str, str], dict]:
        files = self._text_files(rng, rng.randint(6, 10))
        services = rng.sample(["billing", "search", "gateway", "auth", "ingest", "render"], 4)
        ports = rng.sample(range(2000, 9999), len(services))
        for service, port in zip(services, ports):
            body = (
                f"[server]\nhost = 127.0.0.1\nport = {port}\nworkers = {rng.randint(1, 16)}\n\n"
                f"[logging]\nlevel = {rng.choice(['debug', 'info', 'warning'])}\n"
            )
            files[f"{rng.choice(_DIRS)}/config/{service}.ini"] = body
        target = rng.randrange(len(services))
        prompt = (
            "The MCP filesystem server gives you access to one data directory (call "
            f"list_allowed_directories to see it). Somewhere in it is a file named {services[target]}.ini. "
            "What is the value of `port` in its [server] section? Answer with the number."
        )
        return prompt, str(ports[target]), files, {"filename": f"{services[target]}.ini"}

    # ------------------------------------------------------------------ memory (knowledge graph) server

    @staticmethod
    def _graph(rng: random.Random) -> tuple[list[dict], list[dict]]:
        people = rng.sample(_PEOPLE, rng.randint(9, 13))
        entities = [
            {
                "type": "entity",
                "name": org,
                "entityType": "organization",
                "observations": [f"founded in {rng.randint(1950, 2020)}"],
            }
            for org in _ORGS
        ]
        relations = []
        for person in people:
            entities.append(
                {
                    "type": "entity",
                    "name": person,
                    "entityType": "person",
                    "observations": [f"lives in {rng.choice(_CITIES)}", f"age {rng.randint(22, 64)}"],
                }
            )
            relations.append(
                {"type": "relation", "from": person, "to": rng.choice(_ORGS), "relationType": "works_at"}
            )
        managers = people[:3]
        for person in people[3:]:
            relations.append(
                {"type": "relation", "from": rng.choice(managers), "to": person, "relationType": "manages"}
            )
        rng.shuffle(entities)
        rng.shuffle(relations)
        return entities, relations

    @staticmethod
    def _jsonl(entities: list[dict], relations: list[dict]) -> str:
        return "".join(json.dumps(x) + "\n" for x in entities + relations)

    def _kg_manager(self, rng: random.Random) -> tuple[str, str, dict[str, str], dict]:
        entities, relations = self._graph(rng)
        managed = [r for r in relations if r["relationType"] == "manages"]
        pick = rng.choice(managed)
        prompt = (
            f"The MCP memory server holds a knowledge graph about people and organizations. Who manages "
            f"{pick['to']} (a 'manages' relation)? Answer with the person's full name."
        )
        return (
            prompt,
            pick["from"],
            {"memory.jsonl": self._jsonl(entities, relations)},
            {"person": pick["to"]},
        )

    def _kg_count(self, rng: random.Random) -> tuple[str, str, dict[str, str], dict]:
        entities, relations = self._graph(rng)
        org, city = rng.choice(_ORGS), rng.choice(_CITIES)
        employer = {r["from"]: r["to"] for r in relations if r["relationType"] == "works_at"}
        count = sum(
            1
            for e in entities
            if e["entityType"] == "person"
            and employer.get(e["name"]) == org
            and f"lives in {city}" in e["observations"]
        )
        prompt = (
            f"The MCP memory server holds a knowledge graph about people and organizations. How many people "
            f"who work at {org} ('works_at' relation) live in {city} (an observation 'lives in {city}')? "
            "Answer with a number."
        )
        return (
            prompt,
            str(count),
            {"memory.jsonl": self._jsonl(entities, relations)},
            {"org": org, "city": city},
        )

    # ------------------------------------------------------------------ time server

    def _time_convert(self, rng: random.Random) -> tuple[str, str, dict[str, str], dict]:
        source, target = rng.sample(sorted(FIXED_ZONES), 2)
        hhmm = f"{rng.randrange(24):02d}:{rng.choice(range(0, 60, 5)):02d}"
        prompt = (
            f"It is {hhmm} in the time zone {source}. What time is it at that moment in {target}? "
            "Use the time server's tools. Answer in 24-hour HH:MM format."
        )
        return (
            prompt,
            convert_hhmm(hhmm, source, target),
            {},
            {"time": hhmm, "source": source, "target": target},
        )

    # ------------------------------------------------------------------ git server

    @staticmethod
    def _commits(rng: random.Random) -> list[dict]:
        when = datetime(2024, 1, 1, 9, 0, tzinfo=UTC) + timedelta(days=rng.randrange(300))
        names = rng.sample(_WORDS, 10)
        commits, existing = [], []
        for i in range(rng.randint(6, 9)):
            author, email = rng.choice(_GIT_AUTHORS)
            when += timedelta(hours=rng.randint(1, 72))
            if i == 0 or rng.random() < 0.6:
                path = f"src/{names[len(existing)]}.py"
                existing.append(path)
                added = [path]
            else:
                path = rng.choice(existing)
                added = []
            files = {path: f"# {path}\nVALUE = {rng.randint(0, 999)}\n"}
            commits.append(
                {
                    "author": author,
                    "email": email,
                    "date": when.isoformat(),
                    "message": rng.choice(_COMMIT_MESSAGES),
                    "files": files,
                    "added": added,
                }
            )
        return commits

    def _git_author(self, rng: random.Random) -> tuple[str, str, dict[str, str], dict]:
        commits = self._commits(rng)
        adders = [(path, c["author"]) for c in commits for path in c["added"]]
        path, author = rng.choice(adders)
        prompt = (
            "The MCP git server works on one repository (use repo_path '.'). Which author made the commit "
            f"that added the file {path}? Answer with the author's name."
        )
        return prompt, author, {}, {"commits": commits, "path": path}

    def _git_count(self, rng: random.Random) -> tuple[str, str, dict[str, str], dict]:
        commits = self._commits(rng)
        author = rng.choice(sorted({c["author"] for c in commits}))
        count = sum(1 for c in commits if c["author"] == author)
        prompt = (
            "The MCP git server works on one repository (use repo_path '.'). How many commits in the "
            f"current branch were authored by {author}? Answer with a number."
        )
        return prompt, str(count), {}, {"commits": commits, "author": author}
