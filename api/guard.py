"""The api's front door: a WSGI middleware that checks Host, Origin and body size first.

A web page in the house's browser can send requests to the api (cross-site POSTs with a
text/plain body need no CORS preflight, websockets none at all), and DNS rebinding lets a
page's own domain point at 127.0.0.1. So, before Flask or Socket.IO see a request:
- its Host must be a name this api serves (an IP literal cannot be rebound);
- a state-changing request or a websocket connect from a browser must come from the api's own
  origin or one listed in HACER_ALLOWED_ORIGINS;
- its body must fit MAX_BODY_BYTES however it is framed: a chunked body is read up to that
  bound here, since the servers would otherwise read it whole.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_LINE = 1024  # a chunk-size line or a trailer of a chunked body


class LineTooLong(ValueError):
    """A line of a chunked body (its size, a trailer) longer than MAX_LINE."""


class _BoundedLines:
    """A socket's file whose readline() stops at MAX_LINE: eventlet reads a chunk-size line unbounded."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def readline(self, size: int | None = -1) -> bytes:
        line: bytes = self.raw.readline(MAX_LINE if size is None or size < 0 else min(size, MAX_LINE))
        if len(line) >= MAX_LINE and not line.endswith(b"\n"):
            raise LineTooLong(f"a line of the chunked body is longer than {MAX_LINE} bytes")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def default_host_names() -> set[str]:
    """The names this machine answers to by default: localhost and its own host names."""
    names = {"localhost"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.update({name.lower(), name.lower().split(".")[0] + ".local"})
    return names


class RequestGuard:
    """Wraps a WSGI app with the checks in the module docstring."""

    def __init__(
        self,
        app: WsgiApp,
        *,
        max_body: int,
        allowed_hosts: Iterable[str],
        allowed_origins: Iterable[str],
        websocket_prefix: str = "/socket.io",
    ) -> None:
        self.app = app
        self.max_body = max_body
        hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.any_host = "*" in hosts
        self.allowed_hosts = hosts
        self.allowed_origins = {_origin_key(o) for o in allowed_origins if o.strip()}
        self.websocket_prefix = websocket_prefix
        self.refused: dict[str, int] = {}

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        refusal = self._check_host(environ) or self._check_origin(environ) or self._bound_body(environ)
        if refusal is None:
            return self.app(environ, start_response)
        status, reason, message = refusal
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning("refused %s %s: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), message)
        names = {400: "bad request", 403: "forbidden", 413: "too large"}
        body = json.dumps({"error": names[status], "message": message}).encode()
        start_response(
            f"{status} {names[status].title()}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")],
        )
        return [body]

    def _named_here(self, host: str) -> bool:
        """Whether `host` is a name this api serves by itself or by the settings, `*` aside (it names none)."""
        return host in self.allowed_hosts or host.endswith(".localhost") or _is_ip(host)

    def _check_host(self, environ: Environ) -> tuple[int, str, str] | None:
        if self.any_host:
            return None
        host = _host_name(environ.get("HTTP_HOST") or environ.get("SERVER_NAME", ""))
        if self._named_here(host):
            return None
        return (
            400,
            "host",
            (
                f"Host {host[:80]!r} is not served here: add it to HACER_ALLOWED_HOSTS "
                "if this api is reached by that name"
            ),
        )

    def _check_origin(self, environ: Environ) -> tuple[int, str, str] | None:
        websocket = environ.get("PATH_INFO", "").startswith(self.websocket_prefix)
        if environ.get("REQUEST_METHOD", "GET") in SAFE_METHODS and not websocket:
            return None
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            # Browsers always send Origin on these; Sec-Fetch-Site is the fallback of some.
            if environ.get("HTTP_SEC_FETCH_SITE") == "cross-site":
                return 403, "origin", "a cross-site request: only the api's own pages may change things"
            return None  # not a browser: curl, scripts, REST clients
        key, host = _origin_key(origin), environ.get("HTTP_HOST", "")
        # The api's own page: its origin is the Host, and that Host a name served here. With
        # HACER_ALLOWED_HOSTS=* any Host passes, so a DNS-rebound page (evil.example pointed at this
        # machine) would be "its own page": such a page is only its own if its name is listed.
        if (key == _host_key(host) and self._named_here(_host_name(host))) or key in self.allowed_origins:
            return None
        return (
            403,
            "origin",
            (f"Origin {origin[:80]!r} may not change anything here: add it to HACER_ALLOWED_ORIGINS to allow it"),
        )

    def _bound_body(self, environ: Environ) -> tuple[int, str, str] | None:
        too_large = (413, "body", f"the request body is larger than {self.max_body} bytes")
        length = environ.get("CONTENT_LENGTH") or ""
        if length.strip():
            try:
                declared = int(length)
            except ValueError:
                return 400, "body", f"Content-Length {length[:40]!r} is not a number"
            return too_large if declared > self.max_body else None
        if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return None
        stream = environ["wsgi.input"]
        if hasattr(stream, "rfile") and not isinstance(stream.rfile, _BoundedLines):  # eventlet's Input
            stream.rfile = _BoundedLines(stream.rfile)
        chunks, size = [], 0
        while size <= self.max_body:
            try:
                chunk = stream.read(min(64 * 1024, self.max_body + 1 - size))
            except (ValueError, OSError) as exc:  # a line too long, a chunk size that is not hex (gunicorn: OSError)
                return 400, "body", f"bad chunked body: {exc}"
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > self.max_body:
            return too_large
        body = b"".join(chunks)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:5000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_key(host: str) -> str:
    """Return a Host header or an origin's host[:port], with a default port left out."""
    host = host.strip().lower().rstrip(".")
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[: -len(default)]
    return host


def _origin_key(origin: str) -> str:
    # The scheme is left out: behind a TLS proxy the api sees http while pages are https.
    _, _, rest = origin.strip().lower().partition("://")
    return _host_key(rest.split("/", 1)[0]) if rest else origin.strip().lower()
