"""WSGI plumbing: a routing table, bounded JSON bodies, authentication, answers.

Why not ``label_studio_ml.api``: it is Flask 1.1.2 on Werkzeug 2.0.2 (pinned by label-studio-ml
1.0.9), releases with published advisories, including a multipart-parsing denial of service.
This serves the same endpoints as a plain WSGI callable under gunicorn: it never parses multipart
or form bodies, only JSON up to ``SMARTSAM_MAX_REQUEST_BYTES``, and has no debugger.

Why not Werkzeug's routing (``Map``/``Rule``) or another framework for the table below: the
backend's environment keeps ``label-studio-ml`` for its model class, and its pins hold Werkzeug
at 2.0.2 and Flask at 1.1.2; a newer framework beside them would be a second stack to keep in
step, and the old one is what we avoid. What is written here is a routing table, a bounded body
reader and a path splitter, each held by the generated bodies and paths of
``tests/test_bad_bodies.py``.

Routes are a table of ``(method, path pattern) -> handler``: a path that matches with another
method gets 405 (with ``Allow``), one that matches nothing 404. Patterns match the *raw* request
path split at ``/`` before each segment is percent-decoded, so a label named ``a/b`` is reached as
``a%2Fb`` (the server has already decoded ``PATH_INFO``).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("smartsam.http")


class HttpError(Exception):
    """An HTTP error answer. ``reason`` replaces the status line's reason phrase: Label Studio's
    Connect dialog shows only that line of a failed /health or /setup, never the body."""

    def __init__(self, status: int, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class Raw:
    """An answer that is not JSON: bytes and their content type."""

    def __init__(self, body: bytes, ctype: str) -> None:
        self.body, self.ctype = body, ctype


def reason_phrase(text: str) -> str:
    # a status line is one line of latin-1 text
    return " ".join(text.encode("ascii", "replace").decode().split())[:300]


def basic_credentials(environ) -> Optional[Tuple[str, str]]:
    """(user, password) of a Basic Authorization header; None when there is none or it is not
    base64 of UTF-8 (then it is not the credentials)."""
    h = environ.get("HTTP_AUTHORIZATION", "")
    if not h.startswith("Basic "):
        return None
    try:
        user, _, pw = base64.b64decode(h[6:].encode("latin-1"), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeError):
        return None
    return user, pw


def client_address(environ, trusted_proxies: Sequence = ()) -> str:
    """Who sent the request: the peer address, or, when the peer is one of ``trusted_proxies``
    (``ipaddress`` networks: a balancer such as the shipped nginx), the nearest address in
    ``X-Forwarded-For`` that is not a trusted proxy (the ones the balancers added; an address a
    client wrote into the header itself sits further left and is never taken). IPv6 addresses
    are named by their /64, which one machine usually holds whole."""
    addr = environ.get("REMOTE_ADDR") or ""
    if trusted_proxies and _within(addr, trusted_proxies):
        hops = [h.strip() for h in (environ.get("HTTP_X_FORWARDED_FOR") or "").split(",") if h.strip()]
        while hops and _within(hops[-1], trusted_proxies):
            hops.pop()
        if hops:
            addr = hops[-1]
    ip = _ip(addr)
    if ip is None:
        return addr[:64]
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


def _ip(addr: str):
    """An address as ``ipaddress`` reads it: a port ("1.2.3.4:5", "[::1]:5") dropped, an
    IPv4-mapped IPv6 address ("::ffff:1.2.3.4", a dual-stack listener's) as its IPv4 one; None
    when it is none."""
    a = addr.strip()
    if a.startswith("[") and "]" in a:
        a = a[1:a.index("]")]
    elif a.count(":") == 1:
        a = a.split(":")[0]
    try:
        ip = ipaddress.ip_address(a)
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip


def _within(addr: str, networks: Sequence) -> bool:
    ip = _ip(addr)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two texts, any characters."""
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type",
           500: "Internal Server Error", 503: "Service Unavailable"}


def read_json(environ, limit: int):
    """The request's JSON body, at most ``limit`` bytes (413 beyond), JSON only (415 otherwise)."""
    ctype = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HttpError(415, f"expected Content-Type application/json, got {ctype or 'none'}")
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if n > limit:
            raise HttpError(413, f"request body of {n} bytes is over the limit of {limit} (SMARTSAM_MAX_REQUEST_BYTES)")
        body = stream.read(n)
    else:
        body = stream.read(limit + 1)  # chunked: read no more than the limit
        if len(body) > limit:
            raise HttpError(413, f"request body is over the limit of {limit} bytes (SMARTSAM_MAX_REQUEST_BYTES)")
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise HttpError(400, f"malformed JSON: {str(e)[:200]}") from None


def json_object(environ, limit: int) -> Dict:
    data = read_json(environ, limit)
    if not isinstance(data, dict):
        raise HttpError(400, "the body must be a JSON object")
    return data


def path_segments(environ) -> List[str]:
    """The request path's segments, each percent-decoded after splitting (``a%2Fb`` stays one
    segment). Uses the raw request URI when the server gives it (gunicorn: ``RAW_URI``)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        path = urllib.parse.urlsplit(raw).path or "/"
        parts = path.split("/")[1:]
        segs = [urllib.parse.unquote(p) for p in parts]
    else:
        segs = (environ.get("PATH_INFO") or "/").split("/")[1:]
    if len(segs) > 1 and segs[-1] == "":
        segs = segs[:-1]  # one trailing slash is the same resource
    return [] if segs == [""] else segs


Handler = Callable[..., Tuple[int, object]]


@dataclass(frozen=True)
class Route:
    """``methods`` on ``pattern`` (segments; ``{name}`` captures one) -> ``handler(request, **captures)``."""

    methods: Tuple[str, ...]
    pattern: Tuple[str, ...]
    handler: Handler

    @property
    def specificity(self) -> int:
        return sum(not (p.startswith("{") and p.endswith("}")) for p in self.pattern)

    def match(self, segs: Sequence[str]) -> Optional[Dict[str, str]]:
        if len(segs) != len(self.pattern):
            return None
        out = {}
        for p, s in zip(self.pattern, segs):
            if p.startswith("{") and p.endswith("}"):
                if s == "":
                    return None
                out[p[1:-1]] = s
            elif p != s:
                return None
        return out


@dataclass
class Request:
    method: str
    segments: List[str]
    environ: Dict

    @property
    def query(self) -> Dict[str, List[str]]:
        return urllib.parse.parse_qs(self.environ.get("QUERY_STRING", ""))


class Router:
    """A routing table: ``add(method(s), "/admin/references/{project}", handler)``."""

    def __init__(self) -> None:
        self.routes: List[Route] = []

    def add(self, methods, path: str, handler: Handler) -> None:
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        pattern = tuple(path.strip("/").split("/")) if path.strip("/") else ()
        self.routes.append(Route(methods, pattern, handler))

    def resolve(self, method: str, segs: Sequence[str]) -> Tuple[Handler, Dict[str, str]]:
        """The handler and captures for a request; a literal segment beats a capture
        (``/versions/{vid}/restore`` over ``/versions/{vid}/{file}``)."""
        matches = [(r, caps) for r in self.routes for caps in [r.match(segs)] if caps is not None]
        if matches:
            best = max(r.specificity for r, _ in matches)
            matches = [(r, c) for r, c in matches if r.specificity == best]
        allowed: List[str] = []
        for r, caps in matches:
            if method in r.methods or (method == "HEAD" and "GET" in r.methods):
                return r.handler, caps
            allowed += [m for m in r.methods if m not in allowed]
        if allowed:
            raise MethodNotAllowed(allowed, f"{method} not allowed on /{'/'.join(segs)}: {', '.join(allowed)}")
        raise HttpError(404, f"no endpoint /{'/'.join(segs)}")


class MethodNotAllowed(HttpError):
    def __init__(self, allowed: List[str], message: str) -> None:
        super().__init__(405, message)
        self.allowed = allowed


def respond(start_response, status: int, payload, reason: Optional[str] = None, extra_headers=()) -> List[bytes]:
    """Encode ``payload`` (dict/list: JSON; Raw; bytes: PNG; str: HTML) and start the response."""
    if isinstance(payload, Raw):
        body, ctype = payload.body, payload.ctype
    elif isinstance(payload, bytes):
        body, ctype = payload, "image/png"
    elif isinstance(payload, str):
        body, ctype = payload.encode(), "text/html; charset=utf-8"
    else:
        body, ctype = json.dumps(payload).encode(), "application/json"
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), *extra_headers]
    if status == 413:
        # the unread body is not drained: the connection ends after this answer
        headers.append(("Connection", "close"))
    if ctype.startswith("text/html"):
        headers += [("Content-Security-Policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                     "style-src 'unsafe-inline'; img-src 'self'"), ("X-Frame-Options", "DENY"),
                    ("Cache-Control", "no-store")]
    start_response(f"{status} {reason_phrase(reason) if reason else REASONS.get(status, '')}", headers)
    return [body]
