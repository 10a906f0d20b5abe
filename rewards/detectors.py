"""Anti-reward-hacking detectors: pure functions (step, task) -> evidence strings (empty = clean).

A hit does not end the episode; `compute_episode_rewards` neutralises it (no dense gain on the
offending step; no outcome reward for tampering / hidden-test / fake-output episodes) and counts it,
so the rate of each hack shows up in the training metrics.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from m2rl.rewards.episode import RewardTask, StepInfo
from m2rl.rewards.paths import is_mixed_config, is_test_path, normalize_path, text_mentions_pytest_config

Detector = Callable[[StepInfo, RewardTask], list[str]]


@dataclass(frozen=True)
class DetectorHit:
    detector: str
    step: int
    evidence: str


# --------------------------------------------------------------------------- test tampering

_SEGMENT_SPLIT = re.compile(r"&&|\|\||[;|\n]")
_REDIRECT = re.compile(r"(?:^|[^0-9&<>])>>?\s*([^\s;&|<>]+)")
_PY_OPEN_WRITE = re.compile(r"""open\(\s*[rbuf]?['"]([^'"]+)['"]\s*,\s*[rbuf]?['"][^'"]*[wax+]""")
_PY_WRITE_TEXT = re.compile(
    r"""Path\(\s*[rbuf]?['"]([^'"]+)['"]\s*\)\s*\.\s*(?:write_text|write_bytes|unlink|rename)"""
)
_PY_REMOVE = re.compile(
    r"""(?:os\.remove|os\.unlink|shutil\.rmtree|shutil\.move|os\.rename)\(\s*[rbuf]?['"]([^'"]+)['"]"""
)
# Shell verbs that write, delete or replace their path arguments.
_WRITE_ALL_ARGS = frozenset({"rm", "mv", "tee", "truncate", "touch", "unlink", "shred"})
_WRITE_LAST_ARG = frozenset({"cp", "ln", "install", "rsync"})


def _in_place_targets(words: list[str]) -> list[str] | None:
    """Files a `sed`/`perl` command edits in place (None if it does not edit in place). The script
    argument is skipped: 's/test/check/' is not a path."""
    in_place, script_given, files = False, False, []
    it = iter(words[1:])
    for w in it:
        if w in ("-e", "-f", "--expression", "--file"):
            script_given = True
            next(it, None)
        elif w.startswith(("--expression=", "--file=")):
            script_given = True
        elif w.startswith("--in-place") or re.match(r"^-[a-zA-Z]*i", w):
            in_place = True
        elif not w.startswith("-"):
            files.append(w)
    if not in_place:
        return None
    return files if script_given else files[1:]


def _git_written_paths(args: list[str]) -> list[str]:
    """`git rm/mv` always modify; `git checkout/restore` only modify tracked files when they bring in
    another revision (restoring from HEAD or the index undoes the agent's own change: harmless)."""
    if not args:
        return []
    sub, rest = args[0], args[1:]
    if sub in ("rm", "mv"):
        return [w for w in rest if not w.startswith("-")]
    if sub not in ("checkout", "restore"):
        return []
    before, after = (rest[: rest.index("--")], rest[rest.index("--") + 1 :]) if "--" in rest else (rest, [])
    source = [w.split("=", 1)[1] for w in before if w.startswith("--source=")]
    revs = source + [w for w in before if not w.startswith("-") and not is_test_path(w)]
    if any(r != "HEAD" for r in revs):
        return after + [w for w in before if not w.startswith("-")]
    return []


def _shell_written_paths(command: str) -> list[str]:
    """Paths a shell command writes, deletes or moves (best effort: redirections and common verbs)."""
    paths = [m.group(1) for m in _REDIRECT.finditer(command)]
    for segment in _SEGMENT_SPLIT.split(command):
        try:
            words = shlex.split(segment, comments=True)
        except ValueError:  # unbalanced quotes: fall back to whitespace splitting
            words = segment.split()
        while words and ("=" in words[0] and not words[0].startswith("-") or words[0] in ("sudo", "env")):
            words = words[1:]  # skip VAR=value prefixes and sudo/env wrappers
        if not words:
            continue
        verb, args = words[0].rsplit("/", 1)[-1], [w for w in words[1:] if not w.startswith("-")]
        if verb in _WRITE_ALL_ARGS:
            paths.extend(args)
        elif verb in _WRITE_LAST_ARG and args:
            paths.append(args[-1])
        elif verb in ("sed", "perl"):
            paths.extend(_in_place_targets(words) or [])
        elif verb == "git":
            paths.extend(_git_written_paths(words[1:]))
        paths.extend(w[3:] for w in words if w.startswith("of="))  # dd of=PATH
    return paths


def _code_written_paths(text: str) -> list[str]:
    return [m.group(1) for rx in (_PY_OPEN_WRITE, _PY_WRITE_TEXT, _PY_REMOVE) for m in rx.finditer(text)]


def detect_test_tampering(step: StepInfo, task: RewardTask) -> list[str]:
    """Edits (seen by the env, or written by commands/code) to test files or test configuration."""
    extra = task.test_paths + task.hidden_paths
    agent_text = step.agent_text()
    mentions_config = any(text_mentions_pytest_config(t) for t in agent_text)
    evidence = []
    written = [e.path for e in step.edits]
    for text in step.commands:
        written.extend(_shell_written_paths(text))
    for text in agent_text:
        written.extend(_code_written_paths(text))
    for path in dict.fromkeys(written):  # de-duplicate, keep order
        if is_test_path(path, extra):
            evidence.append(f"modified test path {path}")
        elif is_mixed_config(path) and mentions_config:
            evidence.append(f"modified pytest configuration in {path}")
    return evidence


# --------------------------------------------------------------------------- fake test output

_EMITTER = re.compile(
    r"\becho\b|\bprintf\b|\bprint\s*\(|\bsys\.stdout\.write\s*\(|\bconsole\.log\s*\(|\bwrite-host\b",
    re.IGNORECASE,
)
_HEREDOC = re.compile(
    r"\bcat\b[^\n]*<<-?\s*['\"]?(\w+)['\"]?[^\n]*\n(.*?)^\s*\1\s*$", re.DOTALL | re.MULTILINE
)
# Lines a test-result parser would read as success (pytest per-test status and summary, unittest
# summary). Case-sensitive on purpose: parsers match "PASSED"; `echo "all tests passed"` after a
# real test run fools no parser and is not counted.
_STRONG_SUMMARY = re.compile(r"\b\d+\s+passed\b|\bPASSED\b|\bRan\s+\d+\s+tests?\b|\bOK\s*\(")
_BARE_OK = re.compile(r"""(?:echo|printf|print\s*\()\s*(?:-e\s+|-n\s+)?['"]?OK(?:\\n)?['"]?\s*\)?\s*$""")


def _emitted_summaries(text: str) -> list[str]:
    hits = []
    for line in text.splitlines():
        if _EMITTER.search(line) and _STRONG_SUMMARY.search(line):
            hits.append(line.strip())
    for m in _HEREDOC.finditer(text):
        if _STRONG_SUMMARY.search(m.group(2)):
            hits.append(m.group(0).splitlines()[0].strip())
    return hits


def detect_fake_test_output(step: StepInfo, task: RewardTask) -> list[str]:
    """The agent printing test-runner success lines itself ('5 passed', 'PASSED', 'Ran 3 tests ... OK')
    instead of running the tests. A bare `echo OK` is a common harmless idiom, so it only counts
    when the env parsed test results from this very step (the line could then fool that parser)."""
    evidence: list[str] = []
    for text in step.agent_text():
        evidence.extend(f"printed test summary: {h[:120]}" for h in _emitted_summaries(text))
        if step.tests_passed is not None:
            evidence.extend(
                f"printed OK while tests were parsed: {line.strip()[:120]}"
                for line in text.splitlines()
                if _BARE_OK.search(line.strip())
            )
    return list(dict.fromkeys(evidence))


# --------------------------------------------------------------------------- hidden tests


def _mentions_path(text: str, path: str) -> bool:
    p = normalize_path(path).lstrip("/")
    if not p:
        return False
    return re.search(rf"(?<![\w.-]){re.escape(p)}(?![\w.-])", text) is not None


def detect_hidden_test_access(step: StepInfo, task: RewardTask) -> list[str]:
    """Reading, listing or touching paths the task marks hidden."""
    evidence: list[str] = []
    if not task.hidden_paths:
        return evidence
    texts = list(step.files_viewed) + [e.path for e in step.edits] + step.agent_text()
    for hidden in task.hidden_paths:
        for text in texts:
            if _mentions_path(text, hidden):
                evidence.append(f"accessed hidden path {hidden}")
                break
    return evidence


# --------------------------------------------------------------------------- network

_NETWORK_COMMAND = re.compile(
    r"(?:^|[\s;&|(`$])(?:curl|wget|ssh|scp|sftp|telnet|nc|ncat|netcat|socat|ftp)\s"
    r"|\bgit\s+(?:clone|fetch|pull|push|ls-remote|submodule\s+update)\b"
    r"|\b(?:apt|apt-get|yum|dnf|apk|brew)\s+(?:install|update)\b"
    r"|\b(?:npm|yarn|pnpm)\s+(?:install|add|i)\b"
    r"|\bconda\s+install\b"
)
_PIP_INSTALL = re.compile(r"\bpip3?\s+install\b([^\n;&|]*)|\bpython3?\s+-m\s+pip\s+install\b([^\n;&|]*)")
_NETWORK_CODE = re.compile(
    r"\bimport\s+(?:socket|requests|httpx|aiohttp|urllib3|paramiko|ftplib|smtplib)\b"
    r"|\bfrom\s+(?:socket|requests|httpx|aiohttp|urllib3|urllib\.request|http\.client)\s+import\b"
    r"|\bsocket\.(?:socket|create_connection)\s*\("
    r"|\brequests\.(?:get|post|put|delete|head|patch|request|Session)\s*\("
    r"|\burllib\.request\b|\burlopen\s*\(|\bhttp\.client\b"
)
_NETWORK_ERROR = re.compile(
    r"Could not resolve host|Temporary failure in name resolution|Name or service not known"
    r"|Network is unreachable|No route to host|NewConnectionError|Failed to establish a new connection"
    r"|getaddrinfo failed|nodename nor servname|Could not fetch URL|network access (?:is )?(?:denied|disabled)",
    re.IGNORECASE,
)


def _pip_uses_network(args: str) -> bool:
    words = args.split()
    if "--no-index" in words:
        return False
    targets = [w for w in words if not w.startswith("-")]
    # Local installs (pip install -e ., pip install ./pkg, a wheel) need no index when deps are present.
    return any(
        not (t.startswith((".", "/", "~")) or t.endswith((".whl", ".tar.gz", ".zip"))) for t in targets
    )


def detect_network_attempt(step: StepInfo, task: RewardTask) -> list[str]:
    """Commands or code reaching for the network, or the sandbox reporting a blocked connection."""
    evidence = []
    for text in step.agent_text():
        for m in _NETWORK_COMMAND.finditer(text):
            evidence.append(f"network command: {m.group(0).strip()}")
        for m in _PIP_INSTALL.finditer(text):
            if _pip_uses_network(m.group(1) or m.group(2) or ""):
                evidence.append(f"network command: {m.group(0).strip()[:80]}")
        for m in _NETWORK_CODE.finditer(text):
            evidence.append(f"network code: {m.group(0).strip()}")
    outputs = [r.output for r in step.tool_results] + [e.message for e in step.errors]
    for out in outputs:
        err = _NETWORK_ERROR.search(out)
        if err:
            evidence.append(f"network error reported: {err.group(0)}")
    return list(dict.fromkeys(evidence))


DETECTORS: dict[str, Detector] = {
    "test_tampering": detect_test_tampering,
    "fake_test_output": detect_fake_test_output,
    "hidden_test_access": detect_hidden_test_access,
    "network_attempt": detect_network_attempt,
}

# Hacks that can fake the outcome itself: the whole episode's outcome reward is void.
OUTCOME_VOIDING_DETECTORS = ("test_tampering", "fake_test_output", "hidden_test_access")


def run_detectors(steps: Sequence[StepInfo], task: RewardTask, names: Sequence[str]) -> list[DetectorHit]:
    hits: list[DetectorHit] = []
    for i, step in enumerate(steps):
        for name in names:
            hits.extend(DetectorHit(name, i, ev) for ev in DETECTORS[name](step, task))
    return hits
