"""A stand-in Label Studio on 127.0.0.1 for unit tests: GET routes that answer only with the right token
(paths under /open/ without one), and every request recorded with its Authorization header."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

API_KEY = "0123456789abcdef0123456789abcdef01234567"
Route = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], bytes]]


class StandInLabelStudio:
    """Label Studio's endpoints as a test serves them (`serve`, or a Route in `routes`), on 127.0.0.1."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                server.requests.append((path, self.headers.get("Authorization")))
                route = server.routes.get(path)
                if route is None:
                    status, headers, body = 404, {}, b'{"detail": "not found"}'
                elif self.headers.get("Authorization") != f"Token {API_KEY}" and not path.startswith(
                    "/open/"
                ):
                    status, headers, body = 401, {}, b'{"detail": "no token"}'
                else:
                    status, headers, body = route(self)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd, self.url = serve_in_thread(Handler)

    def serve(self, path: str, body: bytes | list | dict, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        kind = {} if isinstance(body, bytes) else {"Content-Type": "application/json"}
        self.routes[path] = lambda request: (200, {**kind, **(headers or {})}, data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """`handler` serving on a free port of 127.0.0.1 from a daemon thread; the server and its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
