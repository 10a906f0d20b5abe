"""Shell task family: file and text processing, graded by a checker script run in the sandbox afterwards.

Each task writes its input files into /work at reset. Expected results are computed here on the host from
the same seeded data and baked into the checker, which is uploaded only after the episode ends and reads the
final state of /work (see tasks/base.py `run_checker`).

Kinds:
- `count_matches`: count the lines containing a log level across /work/logs/*.log -> /work/answer.txt
- `sort_uniq`: distinct lines of /work/names.txt in byte order -> /work/unique.txt
- `rename_ext`: rename /work/docs/*.txt to *.md, contents and other files untouched
- `csv_column`: one column of /work/data.csv (no header) -> /work/column.txt
- `largest_file`: the largest file under /work/files, as a path relative to it -> /work/answer.txt
"""

from __future__ import annotations

import random

from m2rl.envs.tasks.base import Task, TaskSet, checker_script

SYSTEM_PROMPT = (
    "You are a careful assistant working in a Linux sandbox. Use the `bash` tool to inspect and change files "
    "under /work (each call is a fresh shell in /work), the editor tool to view or edit files, and call "
    "`submit` when the task is complete."
)
FIRST = (
    "ada",
    "bob",
    "cy",
    "dana",
    "eli",
    "fay",
    "gus",
    "hana",
    "ivo",
    "jun",
    "kai",
    "lea",
    "max",
    "nia",
    "oz",
)
LAST = ("smith", "ng", "okafor", "ivanova", "garcia", "kim", "dubois", "rossi", "sato", "berg")
CITIES = ("oslo", "lima", "pune", "kyiv", "nice", "bonn", "cork", "faro")
LEVELS = ("INFO", "WARN", "ERROR", "DEBUG")
MESSAGES = (
    "request served",
    "cache miss",
    "retrying connection",
    "disk almost full",
    "user logged in",
    "timeout talking to db",
    "config reloaded",
    "job finished",
)

# Checker bodies: each defines check(EXPECTED) -> (ok, details), reading only /work's final state.
CHECK_TEXT_FILE = """
def check(expected):
    path = expected["path"]
    if not os.path.isfile(path):
        return False, f"{path} does not exist"
    got = open(path, encoding="utf-8", errors="replace").read()
    if expected["mode"] == "strip":
        ok = got.strip() == expected["text"].strip()
    else:  # lines: the same lines in order; a missing final newline is fine
        ok = got.rstrip("\\n").split("\\n") == expected["text"].rstrip("\\n").split("\\n")
    return ok, "correct" if ok else f"{path} has the wrong content"
"""
CHECK_DIR = """
def check(expected):
    root = expected["root"]
    got = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            got[os.path.relpath(full, root)] = open(full, encoding="utf-8", errors="replace").read()
    want = expected["files"]
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        return False, f"file names differ: missing {missing[:5]}, unexpected {extra[:5]}"
    bad = [name for name in want if got[name] != want[name]]
    return not bad, "correct" if not bad else f"contents changed: {bad[:5]}"
"""


class ShellTaskSet(TaskSet):
    family = "shell"
    kinds = ("count_matches", "sort_uniq", "rename_ext", "csv_column", "largest_file")
    system_prompt = SYSTEM_PROMPT

    def generate(self, kind: str, seed: int) -> Task:
        if kind not in self.kinds:
            raise KeyError(f"unknown shell task kind {kind!r}; known: {list(self.kinds)}")
        rng = random.Random(f"shell/{kind}/{seed}")
        build = getattr(self, f"_{kind}")
        prompt, files, checker, meta = build(rng)
        return self.make_task(kind, seed, prompt, files=files, checker=checker, meta=meta)

    # ------------------------------------------------------ generators: (prompt, files, checker, meta)

    def _count_matches(self, rng: random.Random):
        level = rng.choice(LEVELS[1:])
        files, count = {}, 0
        for i in range(rng.randint(2, 5)):
            lines = []
            for j in range(rng.randint(10, 60)):
                lvl = rng.choice(LEVELS)
                count += lvl == level
                lines.append(f"2026-11-{rng.randint(1, 28):02d} {lvl} [{j}] {rng.choice(MESSAGES)}")
            files[f"/work/logs/app{i}.log"] = "\n".join(lines) + "\n"
        files["/work/logs/notes.txt"] = f"not a log: {level} {level}\n"  # a decoy outside the *.log glob
        prompt = (
            f"Count the lines that contain `{level}` across all files ending in .log in /work/logs, and "
            "write just that number to /work/answer.txt."
        )
        checker = checker_script(
            CHECK_TEXT_FILE, {"path": "/work/answer.txt", "mode": "strip", "text": str(count)}
        )
        return prompt, files, checker, {"level": level}

    def _sort_uniq(self, rng: random.Random):
        names = [f"{rng.choice(FIRST)} {rng.choice(LAST)}" for _ in range(rng.randint(8, 20))]
        lines = [rng.choice(names) for _ in range(rng.randint(20, 60))]
        expected = "\n".join(sorted(set(lines), key=lambda s: s.encode())) + "\n"
        prompt = (
            "Write the distinct lines of /work/names.txt to /work/unique.txt, sorted in byte order (as "
            "`LC_ALL=C sort -u` does), one per line."
        )
        checker = checker_script(
            CHECK_TEXT_FILE, {"path": "/work/unique.txt", "mode": "lines", "text": expected}
        )
        return prompt, {"/work/names.txt": "\n".join(lines) + "\n"}, checker, {}

    def _rename_ext(self, rng: random.Random):
        files, want = {}, {}
        words = rng.sample(["notes", "plan", "todo", "draft", "report", "ideas", "log", "summary", "memo"], 6)
        for i, word in enumerate(words):
            ext = ".txt" if i < 4 or rng.random() < 0.5 else rng.choice([".md", ".csv"])
            content = f"{word} {rng.randint(0, 10**6)}\n"
            files[f"/work/docs/{word}{ext}"] = content
            want[word + (".md" if ext == ".txt" else ext)] = content
        # The words are distinct, so a renamed .txt never collides with an existing .md.
        prompt = (
            "Rename every file in /work/docs whose name ends in .txt so that it ends in .md instead (keep "
            "the "
            "rest of the name and the contents); leave the other files as they are."
        )
        checker = checker_script(CHECK_DIR, {"root": "/work/docs", "files": want})
        return prompt, files, checker, {}

    def _csv_column(self, rng: random.Random):
        header = ["id", "name", "email", "age", "city"]
        rows = []
        for i in range(rng.randint(5, 25)):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            rows.append(
                [
                    str(i + 1),
                    f"{first} {last}",
                    f"{first}.{last}{rng.randint(1, 99)}@example.org",
                    str(rng.randint(18, 90)),
                    rng.choice(CITIES),
                ]
            )
        column = rng.choice(header[1:])
        k = header.index(column)
        csv = ",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows)
        expected = "".join(r[k] + "\n" for r in rows)
        prompt = (
            f"Extract the `{column}` column of /work/data.csv (comma-separated, first line is the header) "
            "into /work/column.txt: the values only, without the header, one per line, in the original order."
        )
        checker = checker_script(
            CHECK_TEXT_FILE, {"path": "/work/column.txt", "mode": "lines", "text": expected}
        )
        return prompt, {"/work/data.csv": csv}, checker, {"column": column, "index": k + 1}

    def _largest_file(self, rng: random.Random):
        dirs = ["", "a/", "b/", "a/deep/"]
        sizes = rng.sample(range(10, 5000), rng.randint(6, 12))  # distinct sizes: a unique largest file
        files, biggest = {}, ("", -1)
        for i, size in enumerate(sizes):
            rel = f"{rng.choice(dirs)}f{i}_{rng.choice(['log', 'dat', 'txt'])}"
            files[f"/work/files/{rel}"] = "x" * (size - 1) + "\n"
            if size > biggest[1]:
                biggest = (rel, size)
        prompt = (
            "Find the largest file (in bytes) anywhere under /work/files and write its path relative to "
            "/work/files (e.g. `a/f3_log`) to /work/answer.txt."
        )
        checker = checker_script(
            CHECK_TEXT_FILE, {"path": "/work/answer.txt", "mode": "strip", "text": biggest[0]}
        )
        return prompt, files, checker, {}
