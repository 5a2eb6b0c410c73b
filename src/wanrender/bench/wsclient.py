"""A small WebSocket client (RFC 6455) on the standard library, for ComfyUI's ``/ws``.

Only what following ComfyUI needs: one connection, text and binary messages
(fragmented ones too), ping answered with pong, close. No extensions, no TLS
for ``wss://`` beyond what ``ssl`` gives. Written here rather than depending on a
package: nothing in the environment ships a WebSocket client, and this one
feature needs a hundred lines of it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import time
from urllib.parse import urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # the RFC's fixed key suffix
TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
MAX_MESSAGE = 64 * 2**20  # a preview image is far smaller: anything larger is not ComfyUI


class WebSocketError(OSError):
    pass


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def encode_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final frame; clients must mask theirs, servers must not."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 2**16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class WebSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = False

    @classmethod
    def connect(cls, url: str, timeout: float = 10.0) -> WebSocket:
        u = urlsplit(url)
        secure = u.scheme in ("wss", "https")
        port = u.port or (443 if secure else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
        ws = cls(sock)
        head = ws._read_until(b"\r\n\r\n", time.monotonic() + timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if len(status) < 2 or status[1] != "101":
            sock.close()
            raise WebSocketError(f"the server answered {' '.join(status[1:]) or 'nothing'} instead of a WebSocket")
        if headers.get("sec-websocket-accept") != accept_key(key):
            sock.close()
            raise WebSocketError("the server's WebSocket handshake does not match the key sent")
        return ws

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False when the deadline passed first."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        if not data:
            self.closed = True
            raise WebSocketError("the server closed the connection")
        self.buf += data
        return True

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buf:
            if len(self.buf) > 65536 or not self._fill(deadline):
                raise WebSocketError("no WebSocket handshake from the server")
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _need(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            if not self._fill(deadline):
                return False
        return True

    def _frame(self, deadline: float) -> tuple[bool, int, bytes] | None:
        """(final, opcode, payload) of the next frame, or None at the deadline (nothing consumed)."""
        if not self._need(2, deadline):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            if not self._need(4, deadline):
                return None
            n, at = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not self._need(10, deadline):
                return None
            n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
        if n > MAX_MESSAGE:
            raise WebSocketError(f"a WebSocket frame of {n} bytes: not ComfyUI's")
        key = b""
        if b1 & 0x80:
            key, at = self.buf[at : at + 4], at + 4
        if not self._need(at + n, deadline):
            return None
        payload, self.buf = self.buf[at : at + n], self.buf[at + n :]
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv(self, timeout: float) -> str | bytes | None:
        """The next message (text as str, binary as bytes), or None when ``timeout`` passes first."""
        deadline = time.monotonic() + max(0.0, timeout)
        parts: list[bytes] = []
        kind = None
        while True:
            frame = self._frame(deadline if not parts else time.monotonic() + 30.0)
            if frame is None:
                if parts:
                    raise WebSocketError("a fragmented WebSocket message stopped half way")
                return None
            final, op, payload = frame
            if op == PING:
                self.sock.sendall(encode_frame(PONG, payload, mask=True))
                continue
            if op == PONG:
                continue
            if op == CLOSE:
                self.closed = True
                raise WebSocketError("the server closed the WebSocket")
            if op != CONTINUATION:
                kind = op
            parts.append(payload)
            if final:
                data = b"".join(parts)
                return data.decode("utf-8", errors="replace") if kind == TEXT else data

    def close(self) -> None:
        try:
            if not self.closed:
                self.sock.sendall(encode_frame(CLOSE, struct.pack("!H", 1000), mask=True))
        except OSError:
            pass
        finally:
            self.closed = True
            self.sock.close()
