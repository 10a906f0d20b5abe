"""Serve a generated site on 127.0.0.1 (a free port) from a threaded `http.server`, one per env.

`SiteServer(render_fn)` starts at construction; `.origin` is `http://127.0.0.1:PORT`; `.close()` shuts
the server down and joins its thread (no leaked threads or sockets). `render_fn(path, query)` returns
`(status, html)`, or `(status, body, content_type)` for other files (the MiniWoB pages' scripts and
stylesheets, whose MIME type Chromium checks), and is pure, so the server is the only I/O here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

RenderFn = Callable[[str, dict[str, str]], tuple[int, str] | tuple[int, str | bytes, str]]
HTML = "text/html; charset=utf-8"


class SiteServer:
    def __init__(self, render_fn: RenderFn, host: str = "127.0.0.1") -> None:
        self.render_fn = render_fn
        self.requests: list[str] = []  # paths served, in order (what the agent visited)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                split = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(split.query).items()}
                with server._lock:
                    server.requests.append(self.path)
                try:
                    status, body, content_type = (*server.render_fn(split.path, query), HTML)[:3]
                except Exception as exc:  # a rendering bug must not kill the server thread
                    status, body, content_type = (
                        500,
                        f"<html><body><h1>Server error</h1><p>{type(exc).__name__}</p></body></html>",
                        HTML,
                    )
                data = body.encode("utf-8") if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                return

        # Handler threads are joined by server_close() (block_on_close), so close() leaves no thread
        # behind; the socket timeout bounds that join if a client (e.g. a browser's preconnect) idles.
        Handler.timeout = 2.0
        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = False
        self._httpd.block_on_close = True
        self.host, self.port = self._httpd.server_address[0], self._httpd.server_address[1]
        # A short poll interval: shutdown() waits for the serve loop's next poll (0.5 s by default).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"site-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
