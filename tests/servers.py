"""Real servers as they ship, started and stopped by the tests: a throwaway PostgreSQL cluster
(Debian's ``postgresql``: ``initdb`` in a temporary folder, password authentication over TCP) and
an nginx round-robin balancer (Debian's ``nginx``). ``scripts/test-deps.sh`` installs both."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import List, Optional

from backend_helpers import free_port

PG_USER, PG_PASSWORD = "smartsam", "s3cret-pw-7f3a"


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: scripts/test-deps.sh installs Debian's postgresql")
    return found[-1]


def _as_postgres(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
    if os.geteuid() == 0:
        cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


class PostgresServer:
    """One throwaway cluster; :meth:`new_database` gives each test its own empty database."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="smartsam-pg-"))
        self.port = free_port()
        self.data = self.dir / "data"
        self.log = self.dir / "log"

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        pw = self.dir / "pw"
        pw.write_text(PG_PASSWORD)
        if os.geteuid() == 0:
            shutil.chown(pw, "postgres")
        if not self.data.exists():
            _as_postgres([_pg_bin("initdb"), "-D", str(self.data), "-U", PG_USER, f"--pwfile={pw}",
                          "--auth-local=trust", "--auth-host=scram-sha-256"])
        self._ctl("start", "-w")
        return self

    def _ctl(self, *args: str) -> None:
        _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-o",
                      f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "-l", str(self.log),
                      *args])

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast", "-w")

    def restart(self) -> None:
        self._ctl("start", "-w")

    def url(self, database: str = "postgres", password: str = PG_PASSWORD) -> str:
        return f"postgresql://{PG_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={PG_USER} password={PG_PASSWORD} dbname=postgres",
                             autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]


def balancer_config(upstreams: List[str], port: int) -> str:
    """``docker/nginx.conf`` (the compose example) with its two upstreams and its port set."""
    conf = (ROOT / "docker" / "nginx.conf").read_text()
    assert len(upstreams) == 2 and "smartsam-a:9090" in conf and "smartsam-b:9090" in conf
    conf = conf.replace("smartsam-a:9090", upstreams[0]).replace("smartsam-b:9090", upstreams[1])
    return conf.replace("listen 9090;", f"listen 127.0.0.1:{port};")


class Nginx:
    """nginx in front of two ``upstreams`` (``host:port``) with the shipped ``docker/nginx.conf``."""

    def __init__(self, upstreams: List[str], port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="smartsam-nginx-"))
        # nginx started as root runs its workers as nobody: they buffer request bodies in here
        os.chmod(self.dir, 0o777)
        (self.dir / "smartsam.conf").write_text(balancer_config(upstreams, self.port))
        (self.dir / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log {self.dir}/access.log;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  include {self.dir}/smartsam.conf;
}}
""")
        self.proc: Optional[subprocess.Popen] = None

    def test_config(self) -> subprocess.CompletedProcess:
        """``nginx -t`` on the configuration."""
        return subprocess.run(["nginx", "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                              capture_output=True, text=True)

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen(["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        import socket

        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx did not start: {self.proc.stderr.read().decode()}")
                time.sleep(0.1)
        raise RuntimeError("nginx did not start listening")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpProxy:
    """A TCP forwarder to ``upstream`` (``(host, port)``) that can make the server unreachable the
    way a network does: :meth:`black_hole` cuts every open connection and from then on accepts
    new ones and never answers (nor forwards) a byte, until :meth:`restore`."""

    def __init__(self, upstream) -> None:
        import socket
        import threading

        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hole = False
        self._pairs: list = []  # [client, server, pipes running] of each forwarded connection
        self._held: list = []  # connections accepted in the hole
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self.hole:
                    self._held.append(client)  # accepted, never answered
                    continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = [client, server, 2]  # the two sockets and the pipes still running
            with self._lock:
                if self.hole:  # the hole opened while this one was connecting
                    server.close()
                    self._held.append(client)
                    continue
                self._pairs.append(pair)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b, pair), daemon=True).start()

    def _pipe(self, a, b, pair) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        # shutdown wakes the other direction without freeing a descriptor it may be using; the
        # last pipe closes both (closing under another thread's recv let the number be reused
        # by a new connection, whose bytes the stale thread could then read)
        self._shut(a, b)
        with self._lock:
            pair[2] -= 1
            last = pair[2] == 0
            if last and pair in self._pairs:
                self._pairs.remove(pair)
        if last:
            a.close()
            b.close()

    @staticmethod
    def _shut(*socks) -> None:
        import socket

        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def black_hole(self) -> None:
        with self._lock:
            self.hole = True
            for client, server, _ in self._pairs:  # cut: the pipes wake, see the end and close
                self._shut(client, server)

    def restore(self) -> None:
        with self._lock:
            self.hole = False
            for s in self._held:  # the connections the hole held: gone, as a network would reset them
                s.close()
            self._held = []

    def close(self) -> None:
        self.restore()
        self.sock.close()
