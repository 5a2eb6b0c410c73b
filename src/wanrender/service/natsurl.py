"""NATS URLs that carry credentials (``nats://user:password@host:port``): shown only
without them, and a refusal of them told apart from an unreachable server."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)


class AuthRefused(Exception):
    """The server refused the connection's credentials (or their absence)."""


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_credentials(url: str, user: str, password: str) -> str:
    from urllib.parse import quote

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme or "nats", netloc, parts.path, parts.query, parts.fragment))


class ConnectWatch:
    """nats-py's ``error_cb``: while connecting, an authorization error ends the connect
    (nats-py would retry it forever); afterwards errors are logged (a permissions
    violation does not close the connection, so it must not go unseen)."""

    def __init__(self) -> None:
        self.connecting = True

    async def error_cb(self, e: Exception) -> None:
        if self.connecting and "authorization" in str(e).lower():
            raise AuthRefused(str(e))
        if self.connecting:  # refused connections while waiting for the server: the wait ends in one line
            log.debug("NATS: %s", e)
            return
        log.warning("NATS: %s", e)
