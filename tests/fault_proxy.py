"""A real HTTP proxy between the backend and Label Studio that fails chosen requests on purpose.

The backend's ``LABEL_STUDIO_URL`` points here; Label Studio reaches the backend directly (its
webhooks and ``/predict`` calls do not pass). Rules pick requests by method and a regular
expression on the path (with its query) and say what happens to them:

- ``"502"``: answered 502 Bad Gateway at once (a balancer while Label Studio restarts);
- ``"reset"``: the connection is closed without an answer (a refused or dropped connection);
- ``"hold"``: the request waits until the rule is released (a step held open, e.g. to SIGKILL the
  backend while it waits), then goes on to Label Studio;
- ``"drop"``: forwarded to Label Studio, which does the work, then the connection is closed
  without its answer (a write whose answer was lost);
- ``"delay"``: forwarded after ``seconds``.

A rule lasts until ``until`` (``time.monotonic()``), for ``times`` requests, or until removed.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socketserver
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class Rule:
    pattern: str
    action: str
    method: Optional[str] = None
    until: Optional[float] = None
    times: Optional[int] = None
    seconds: float = 0.0
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    hit: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.until is not None and time.monotonic() >= self.until:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        return re.search(self.pattern, path) is not None

    def release(self) -> None:
        self.released.set()


class FaultProxy:
    """Forwards everything to ``upstream`` (``http://host:port``) but what a rule says."""

    def __init__(self, upstream: str) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port or 80)
        self.rules: List[Rule] = []
        self.log: List[Tuple[str, str, str]] = []  # (method, path, what happened)
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                outer._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # -- rules -----------------------------------------------------------------------------
    def add(self, pattern: str, action: str, method: Optional[str] = None, for_s: Optional[float] = None,
            times: Optional[int] = None, seconds: float = 0.0) -> Rule:
        rule = Rule(pattern, action, method, None if for_s is None else time.monotonic() + for_s, times, seconds)
        with self._lock:
            self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        rule.release()
        with self._lock:
            if rule in self.rules:
                self.rules.remove(rule)

    def clear(self) -> None:
        with self._lock:
            rules, self.rules = self.rules, []
        for r in rules:
            r.release()

    def seen(self, pattern: str, what: Optional[str] = None) -> int:
        return sum(1 for m, p, w in list(self.log) if re.search(pattern, p) and (what is None or w == what))

    def close(self) -> None:
        self.clear()
        self.server.shutdown()
        self.server.server_close()

    # -- serving ---------------------------------------------------------------------------
    def _rule_for(self, method: str, path: str) -> Optional[Rule]:
        with self._lock:
            for r in self.rules:
                if r.matches(method, path):
                    r.hits += 1
                    return r
        return None

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else None
        rule = self._rule_for(h.command, h.path)
        action = rule.action if rule else "pass"
        self.log.append((h.command, h.path, action))
        if rule is not None:
            rule.hit.set()
            if action == "502":
                return self._answer(h, 502, b"<html>502 Bad Gateway</html>", "text/html")
            if action == "reset":
                h.close_connection = True
                return
            if action == "hold":
                rule.released.wait(600)
            elif action == "delay":
                time.sleep(rule.seconds)
        try:
            status, headers, data = self._forward(h.command, h.path, h.headers, body)
        except OSError:
            return self._answer(h, 502, b"upstream unreachable", "text/plain")
        if action == "drop":  # Label Studio did the work; its answer never reaches the backend
            h.close_connection = True
            return
        try:
            h.send_response(status)
            for k, v in headers:
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        except OSError:  # the client is gone (a backend killed while its request was held)
            h.close_connection = True

    def _forward(self, method: str, path: str, headers, body: Optional[bytes]):
        c = http.client.HTTPConnection(*self.upstream, timeout=300)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection", "content-length")}
            fwd["Host"] = f"{self.upstream[0]}:{self.upstream[1]}"
            c.request(method, path, body=body, headers=fwd)
            r = c.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            c.close()

    @staticmethod
    def _answer(h, status: int, data: bytes, ctype: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
