"""A local stand-in for the Hugging Face Hub's resolve endpoint, for ``models fetch`` tests.

huggingface_hub honours ``HF_ENDPOINT``, so the real download code (HEAD for the
size and LFS hash, GET with ``Range`` to resume) runs against this server. What it
cannot show: the hub's CDN redirects, auth, and the xet transfer protocol.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves ``payloads`` (keyed ``repo/path``) with HEAD metadata and byte ranges.

    ``drop``: paths whose next plain GET sends only ``cut`` bytes and closes the
    connection, and whose ranged GETs then fail (503) — a connection lost for good.
    ``claimed_size``: sizes the HEAD reports instead of the real ones (a huge set).
    """

    def __init__(self, payloads: dict[str, bytes]) -> None:
        self.payloads = payloads
        self.drop: set[str] = set()
        self.cut = 0
        self.claimed_size: dict[str, int] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, repo/path, Range header)
        self.served: dict[str, int] = {}  # body bytes sent per file
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _key(self) -> str | None:
                repo, sep, rest = self.path.partition("/resolve/main/")
                key = unquote(repo.lstrip("/")) + "/" + unquote(rest.split("?")[0])
                return key if sep and key in hub.payloads else None

            def _head(self, key: str, status: int = 200, length: int | None = None) -> None:
                data = hub.payloads[key]
                size = hub.claimed_size.get(key, len(data))
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(size))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(size if length is None else length))

            def do_HEAD(self) -> None:
                key = self._key()
                hub.log.append(("HEAD", key, None))
                if key is None:
                    self.send_error(404)
                    return
                self._head(key)
                self.end_headers()

            def do_GET(self) -> None:
                key = self._key()
                rng = self.headers.get("Range")
                hub.log.append(("GET", key, rng))
                if key is None:
                    self.send_error(404)
                    return
                data = hub.payloads[key]
                if key in hub.drop and rng:
                    self.send_error(503)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                if rng:
                    self._head(key, 206, len(body))
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self._head(key, 200, len(body))
                self.end_headers()
                if key in hub.drop:
                    body = body[: hub.cut]  # then the connection closes short of Content-Length
                self.wfile.write(body)
                hub.served[key] = hub.served.get(key, 0) + len(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self) -> list[tuple[str, str | None]]:
        return [(k, r) for m, k, r in self.log if m == "GET"]
