"""Run a library's tests in its image: a container with no network, the repo copied from the seed to /testbed.

`TestContainer` starts once and then edits files, restores them from git and reruns tests, which is what
mutation screening needs (hundreds of runs per library); `run_tests_in_image` is the one-shot form for
the baseline. Logs are read with SWE-bench's own pytest parser, so a status map here means what it will
mean to the grader.
"""

from __future__ import annotations

import io
import os
import posixpath
import secrets
import shlex
import socket
import tarfile
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from m2rl.envs.swe.factory.library_image import SEED_DIR, TESTBED
from m2rl.sandboxes.docker_backend import LABEL, OWNER_HOST_LABEL, OWNER_PID_LABEL, docker_client
from m2rl.sandboxes.errors import SandboxError
from m2rl.sandboxes.images import SANDBOX_UID
from swebench.harness.log_parsers import PARSER_REGISTRY
from swebench.types import TestSpec

LOG_PARSER = "parse_log_pytest"
TIMEOUT_EXIT_CODES = (124, 137)  # coreutils `timeout`: TERM sent (124), KILL after the grace period (137)


def parse_test_log(log: str) -> dict[str, str]:
    """test id -> PASSED / FAILED / SKIPPED / ERROR / XFAIL, as SWE-bench grading reads it."""
    spec = TestSpec(
        instance_id="",
        image="",
        eval_script_list=[],
        repo="",
        version="",
        FAIL_TO_PASS=[],
        PASS_TO_PASS=[],
        log_parser=LOG_PARSER,
    )
    return PARSER_REGISTRY[LOG_PARSER](log, spec)


@dataclass
class TestRun:
    __test__ = False  # not a pytest test class, whatever its name says

    exit_code: int
    log: str
    status: dict[str, str] = field(default_factory=dict)  # parse_test_log(log); empty when timed out
    duration_s: float = 0.0
    timed_out: bool = False

    def count(self, outcome: str) -> int:
        return sum(1 for s in self.status.values() if s == outcome)

    @property
    def passed(self) -> int:
        return self.count("PASSED")

    @property
    def failed(self) -> int:
        return self.count("FAILED") + self.count("ERROR")


class TestContainer:
    """One long-lived container of a library image, as uid 1000 with no network and no capabilities;
    /testbed is a fresh copy of the seed. `close()` (or leaving the `with` block) removes it; it also
    carries the sandbox labels, so `m2rl sandboxes gc` removes it if its owner dies first."""

    __test__ = False

    def __init__(self, image: str, memory_mb: int = 4096, pids: int = 1024, cpus: float = 2.0) -> None:
        self.client = docker_client()
        self.image = image
        self.container = None
        try:
            self.container = self.client.containers.create(
                image,
                command=["sleep", "infinity"],
                user=f"{SANDBOX_UID}:{SANDBOX_UID}",
                working_dir=TESTBED,
                network_mode="none",
                network_disabled=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                mem_limit=f"{memory_mb}m",
                memswap_limit=f"{memory_mb}m",
                pids_limit=pids,
                nano_cpus=int(cpus * 1e9),
                init=True,  # init reaps what test suites leave orphaned
                labels={
                    LABEL: "1",
                    OWNER_PID_LABEL: str(os.getpid()),
                    OWNER_HOST_LABEL: socket.gethostname(),
                    "m2rl.image": image,
                },
            )
            self.container.start()
            self._check(f"cp -a {SEED_DIR}/. {TESTBED}/", "seeding /testbed")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        import docker.errors

        container, self.container = self.container, None
        if container is None:
            return
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass

    # ---- commands ----------------------------------------------------------------------------------
    def exec(self, script: str) -> tuple[int, str]:
        if self.container is None:
            raise SandboxError("TestContainer is closed")
        code, out = self.container.exec_run(
            ["bash", "-c", script], user=f"{SANDBOX_UID}:{SANDBOX_UID}", workdir=TESTBED
        )
        return code, out.decode(errors="replace")

    def _check(self, script: str, what: str) -> str:
        code, out = self.exec(script)
        if code != 0:
            raise SandboxError(f"{what} failed in {self.image} ({code}): {out[-2000:]}")
        return out

    def run(self, test_cmd: str, timeout: float = 300) -> TestRun:
        """Run `test_cmd` from /testbed, killed (its whole process group) after `timeout` seconds."""
        # The command's output goes to a file, not to the exec stream: a daemon a test leaves behind
        # would otherwise hold the stream open and this call would never return.
        log = f"/tmp/.m2rl-test-{secrets.token_hex(4)}.log"
        script = (
            f"timeout -k 5 {timeout:g} bash -c {shlex.quote(f'cd {TESTBED} && {test_cmd}')} "
            f">{log} 2>&1 </dev/null; code=$?; cat {log}; rm -f {log}; exit $code"
        )
        start = time.monotonic()
        code, out = self.exec(script)
        timed_out = code in TIMEOUT_EXIT_CODES
        return TestRun(
            exit_code=code,
            log=out,
            status={} if timed_out else parse_test_log(out),
            duration_s=time.monotonic() - start,
            timed_out=timed_out,
        )

    # ---- files -------------------------------------------------------------------------------------
    def _path(self, path: str) -> str:
        """A repo-relative (or /testbed-absolute) path, refused if it leaves /testbed."""
        full = posixpath.normpath(posixpath.join(TESTBED, path))
        if not full.startswith(TESTBED + "/"):
            raise ValueError(f"path {path!r} is outside {TESTBED}")
        return full

    def write_file(self, path: str, text: str) -> None:
        """Replace the file's content in place (its mode stays, so `git diff` shows content only)."""
        dest = self._path(path)
        staged = f".m2rl-put-{secrets.token_hex(4)}"
        data = text.encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(staged)
            info.size, info.mode, info.uid, info.gid = len(data), 0o644, SANDBOX_UID, SANDBOX_UID
            tar.addfile(info, io.BytesIO(data))
        assert self.container is not None
        self.container.put_archive("/tmp", buf.getvalue())
        q = shlex.quote(dest)
        self._check(
            f'mkdir -p "$(dirname {q})" && cat /tmp/{staged} > {q}; code=$?; rm -f /tmp/{staged}; exit $code',
            f"writing {dest}",
        )

    def read_file(self, path: str) -> str:
        return self._check(f"cat {shlex.quote(self._path(path))}", f"reading {path}")

    def restore(self, path: str) -> None:
        """Back to the base commit: `git checkout` a tracked file, delete an untracked one."""
        rel = shlex.quote(posixpath.relpath(self._path(path), TESTBED))
        self._check(
            f"if git ls-files --error-unmatch -- {rel} >/dev/null 2>&1; then git checkout -q -- {rel}; "
            f"else rm -f -- {rel}; fi",
            f"restoring {path}",
        )

    def reset(self) -> None:
        """The whole tree back to the base commit (tracked files restored, untracked ones removed)."""
        self._check("git checkout -q -- . && git clean -fdq", "resetting /testbed")


def run_tests_in_image(image: str, test_cmd: str, timeout: float = 300) -> TestRun:
    """One throwaway container: seed copied to /testbed, `test_cmd` run there, container removed."""
    with TestContainer(image) as container:
        return container.run(test_cmd, timeout)
