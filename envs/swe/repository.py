"""The task repository inside a sandbox: put it at an instance's base commit with no history to mine, and
read back the agent's change as a diff.

The image holds the repository (at /testbed) with whatever history it was built with: for our factory, one
commit per instance on top of the library's clean commit; for an official SWE-bench image, the project's
history. An agent that could run `git log --all` or `git cat-file` on those objects would find the fix, so
`prepare` checks out the base commit and then replaces `.git` with a fresh repository holding exactly the
base tree in one commit (fixed identity and dates: the same tree always gives the same sha). No remotes,
no other refs, no reflog, no objects of any other commit remain.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from m2rl.sandboxes.errors import SandboxError

REPO_DIR = "/testbed"
MAX_PATCH_BYTES = 4 << 20  # a diff larger than this is not a plausible fix; it is graded as no patch
# Fixed identity and dates: the base commit's sha depends on its tree alone.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "m2rl",
    "GIT_AUTHOR_EMAIL": "m2rl@localhost",
    "GIT_COMMITTER_NAME": "m2rl",
    "GIT_COMMITTER_EMAIL": "m2rl@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}
# Hooks, external diff drivers and text conversion configured by the agent never run when we read its diff.
SAFE_GIT = "git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c diff.external="

_PREPARE = """set -e
cd "$1"
git -c advice.detachedHead=false checkout -q -f "$2"
git clean -fdq
git ls-files -z > /tmp/.m2rl_tracked
rm -rf .git
git init -q
git add -f --pathspec-from-file=/tmp/.m2rl_tracked --pathspec-file-nul
rm -f /tmp/.m2rl_tracked
git commit -q --no-verify --allow-empty -m "base commit"
git rev-parse HEAD
"""

_DIFF = f"""set -e
cd "$1"
{SAFE_GIT} add -A >/dev/null 2>&1
{SAFE_GIT} diff --cached --binary --no-color --no-ext-diff --no-textconv "$2" > "$3"
"""


@dataclass(frozen=True)
class PreparedRepository:
    repo_dir: str
    head: str  # sha of the fresh single commit holding the base tree: the agent's diff is taken against it


def prepare(sandbox: Any, base_commit: str, repo_dir: str = REPO_DIR, timeout: float = 120.0) -> PreparedRepository:
    """Check out `base_commit` in the sandbox's repository and leave it as a one-commit repository."""
    result = sandbox.exec(["bash", "-c", _PREPARE, "m2rl", repo_dir, base_commit], timeout=timeout,
                          cwd="/", env=GIT_IDENTITY)
    head = result.stdout.strip().splitlines()[-1:] if result.stdout.strip() else []
    if result.exit_code != 0 or result.timed_out or not head:
        raise SandboxError(
            f"could not put {repo_dir} at base commit {base_commit} (exit {result.exit_code}): "
            f"{(result.stderr or result.stdout)[-1500:]}"
        )
    return PreparedRepository(repo_dir=repo_dir, head=head[0])


def agent_diff(sandbox: Any, prepared: PreparedRepository, timeout: float = 120.0) -> str:
    """The agent's change (new, modified and deleted files) as a git diff against the base commit.

    Whatever the agent did to `.git` only changes what it submits: a repository it broke yields an empty
    patch, graded like no change at all."""
    out = f"/tmp/.m2rl_diff_{prepared.head[:12]}"
    result = sandbox.exec(
        ["bash", "-c", _DIFF, "m2rl", prepared.repo_dir, prepared.head, out], timeout=timeout, cwd="/",
        env=GIT_IDENTITY,
    )
    if result.exit_code != 0 or result.timed_out:
        return ""
    try:
        return sandbox.read_file(out, max_bytes=MAX_PATCH_BYTES).decode("utf-8", "replace")
    except SandboxError:  # too large, or replaced by something that is not a file
        return ""
    finally:
        sandbox.exec(f"rm -f {shlex.quote(out)}", timeout=30.0, cwd="/")
