"""Host side of the executor protocol (executor.py): a unix socket the in-sandbox executor connects to.

The host listens on `<dir>/executor.sock`, where `<dir>` is bind-mounted into the sandbox; the executor connects
once at start-up and every request after that is one framed message each way on that connection.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from m2rl.sandboxes.errors import SandboxDead, SandboxError

SOCKET_NAME = "executor.sock"


class Channel:
    def __init__(self, directory: Path) -> None:
        self.path = directory / SOCKET_NAME
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o777)  # the executor runs as the sandbox's non-root user
        self._listener.listen(1)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.executor_pid: int | None = None

    def accept(self, timeout: float, alive: Callable[[], str | None]) -> None:
        """Wait for the executor's hello; `alive()` returns a reason string once the sandbox has died."""
        deadline = time.monotonic() + timeout
        self._listener.settimeout(0.05)
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                reason = alive()
                if reason is not None:
                    raise SandboxDead(f"sandbox died while starting: {reason}") from None
                if time.monotonic() > deadline:
                    raise SandboxError(f"sandbox executor did not connect within {timeout:.0f}s") from None
        self._listener.close()
        conn.settimeout(None)
        self._sock = conn
        hello, _ = self._recv(deadline=None)
        self.executor_pid = hello.get("pid")

    def request(self, header: dict, payload: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes]:
        """One round trip. A lost connection or a silent executor past `timeout` means the sandbox is dead."""
        if self._sock is None:
            raise SandboxDead("sandbox is closed")
        with self._lock:
            try:
                self._send(header, payload)
                reply, data = self._recv(deadline=None if timeout is None else time.monotonic() + timeout)
            except (OSError, EOFError, ValueError) as exc:
                self.close()
                raise SandboxDead(f"lost the sandbox executor during {header.get('op')!r}: {exc}") from exc
        if not reply.get("ok"):
            raise SandboxError(f"sandbox {header.get('op')} failed: {reply.get('error')}")
        return reply, data

    def close(self) -> None:
        for s in (self._sock, self._listener):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self._sock = None

    def _send(self, header: dict, payload: bytes) -> None:
        data = json.dumps({**header, "n": len(payload)}).encode()
        assert self._sock is not None
        # One sendall for small messages keeps the round trip to a single syscall each way.
        if len(payload) < 65536:
            self._sock.sendall(struct.pack(">I", len(data)) + data + payload)
        else:
            self._sock.sendall(struct.pack(">I", len(data)) + data)
            self._sock.sendall(payload)

    def _recv(self, deadline: float | None) -> tuple[dict, bytes]:
        (size,) = struct.unpack(">I", self._recv_exact(4, deadline))
        header = json.loads(self._recv_exact(size, deadline))
        return header, self._recv_exact(header.get("n", 0), deadline)

    def _recv_exact(self, n: int, deadline: float | None) -> bytes:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the sandbox executor stopped answering")
                self._sock.settimeout(left)
            chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("the sandbox executor closed the connection")
            buf += chunk
        if deadline is not None:
            self._sock.settimeout(None)
        return bytes(buf)
