"""What every HTTP request must pass before a route sees it: the Host header, the API key, the
content type and the size of the body. One place, so that no route can forget one.

- **Host** (DNS rebinding): a page on ``attacker.example`` that makes that name resolve to
  127.0.0.1 sends ``Host: attacker.example``; only names of this server are accepted (for a
  loopback server: ``localhost`` and loopback addresses; otherwise also this machine's host
  names and any address literal, which no rebinding can produce), plus ``--allowed-hosts``.
- **API key**: with ``--api-key`` every route but ``/health`` (and ``/metrics``, unless
  ``--metrics-require-key``) needs ``Authorization: Bearer KEY``, compared in constant time.
- **Content type**: a POST must be ``application/json``. A browser sends a cross-site POST
  without asking first only as ``text/plain``, form data or multipart: all refused.
- **Size**: a body over ``--max-request-bytes`` is a 413, refused from its declared length
  before it is read (and cut off when it runs over without declaring one).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
OPEN_ROUTES = frozenset({"/health", "/ping", "/version"})


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def machine_names() -> frozenset[str]:
    """This machine's own host names (for a server bound beyond loopback)."""
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return frozenset(n for n in names if n)


def _host_of(header: str) -> str:
    """The name in a Host header, without its port."""
    h = header.strip().lower()
    if h.startswith("["):  # [v6]:port
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


@dataclass
class EdgePolicy:
    bind_host: str = "127.0.0.1"
    api_key: str | None = None
    metrics_require_key: bool = False
    allowed_hosts: frozenset[str] = frozenset()  # extra names; "*" allows any
    max_request_bytes: int = 4 << 20
    _names: frozenset[str] = field(default=frozenset(), init=False)

    def __post_init__(self) -> None:
        names = set(LOOPBACK_NAMES) | {h.lower() for h in self.allowed_hosts}
        if not is_loopback(self.bind_host):
            names |= machine_names()
            if _ip_literal(self.bind_host) is None:
                names.add(self.bind_host.lower())
        self._names = frozenset(names)

    def host_allowed(self, header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        if not header:
            return False
        host = _host_of(header)
        ip = _ip_literal(host)
        if ip is not None:  # an address literal: never the product of DNS rebinding
            return ip.is_loopback or not is_loopback(self.bind_host)
        return host in self._names

    def key_ok(self, request: web.Request) -> bool:
        if not self.api_key or request.path in OPEN_ROUTES:
            return True
        if request.path == "/metrics" and not self.metrics_require_key:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    def check(self, request: web.Request) -> tuple[int, str, str, str] | None:
        """(status, message, type, code) of the refusal, or None when the request may go on."""
        if not self.host_allowed(request.headers.get("Host")):
            return 400, "the Host header does not name this server (see --allowed-hosts)", \
                "invalid_request_error", "invalid_host"
        if not self.key_ok(request):
            return 401, "invalid or missing API key", "authentication_error", "invalid_api_key"
        if request.method == "POST":
            if request.body_exists and request.content_type != "application/json":  # (an empty POST /ping)
                return 415, "the body must be JSON, sent as Content-Type: application/json", \
                    "invalid_request_error", "unsupported_media_type"
            if request.content_length is not None and request.content_length > self.max_request_bytes:
                return 413, f"the body is {request.content_length} bytes; at most {self.max_request_bytes} are " \
                    "accepted (--max-request-bytes)", "invalid_request_error", "request_too_large"
        return None


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering what its HTTP parser refuses (a long URL, too many
    headers, garbage) with an OpenAI error object and one log line instead of a traceback."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        reason = (message or (str(exc) if exc is not None else "") or HTTPStatus(status).phrase).splitlines()[0][:200]
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
        log.log(level, "refused a malformed request from %s: %d %s", request.remote, status, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started; cannot send an error")
        kind = "server_error" if status >= 500 else "invalid_request_error"
        resp = web.json_response({"error": {"message": reason, "type": kind, "param": None, "code": status}},
                                 status=status)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


def answer_parser_errors_in_json(runner: web.AppRunner) -> None:
    """After ``runner.setup()``: the connections it serves report parser errors as JSON."""
    assert runner.server is not None
    runner.server.__class__ = _JsonErrorServer
