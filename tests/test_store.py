"""The store on PostgreSQL as an operator meets it: ``admin migrate`` copies an SQLite store into
an empty PostgreSQL database with nothing lost (and refuses a non-empty one), a database that is
down or refuses the password stops the server's start with one message, and no password reaches
a log or an answer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gt_mask(datasets):
    from smartsam.eval.datasets import load_dataset, load_gt

    return load_gt(load_dataset(datasets / "GrabCut")[0])[0]


def _env(data: Path, **extra) -> dict:
    env = dict(os.environ, SMARTSAM_DATA_DIR=str(data), SMARTSAM_BACKBONE="sam2.1_hiera_tiny-random",
               PYTHONPATH=str(ROOT))
    env.pop("SMARTSAM_DATABASE_URL", None)
    env.update(extra)
    return env


def _admin(env, *args):
    return subprocess.run([sys.executable, "-m", "backend.cli.references", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_migrate_copies_everything_into_an_empty_postgresql_and_refuses_a_full_one(tmp_path, pg_server, gt_mask):
    from backend.store.field_stats import FieldStats
    from backend.store.project_settings import ProjectSettings
    from backend.store.references import ReferenceStore
    from backend.store.work_queue import WorkQueue
    from smartsam.selector import Reference

    data = tmp_path / "data"
    store = ReferenceStore(data, exemplars=2)
    for k in range(3):
        store.put("4", f"L{k}", Reference("mask", np.arange(8, dtype=np.float32) + k, "x"), {"k": k},
                  mask=gt_mask, image=np.full(gt_mask.shape + (3,), 40 * k, np.uint8), annotation=10 + k,
                  how="first", policy="auto")
    store.delete("4", "L1")  # a history, not only current rows
    ProjectSettings(data).set("4", {"chain_length": 2})
    stats = FieldStats(data)
    for t in range(5):
        stats.record("4", t, "L0", "reference", "smartsam", 1, 0.2, gt_mask)
    stats.close()
    stats.observe("4", 0, 77, [("r1", "L0", gt_mask)])
    queue = WorkQueue(data / "jobs.db")
    queue.add_tasks("4", [{"id": 1, "data": {"image": "x"}}, {"id": 2, "data": {"image": "y"}}], "<View/>")
    queue.add_event("ANNOTATION_CREATED", 12, "4")
    assert queue.record_application(12, "t", False)

    target = pg_server.new_database()
    p = _admin(_env(data), "migrate", "--to", target)
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.startswith("  ")}
    assert lines["versions"][1] == lines["versions"][4] == "4" and lines["blobs"][1] == lines["blobs"][4]
    assert lines["suggestions"][4] == "5" and lines["prelabel"][4] == "2" and lines["applied_events"][4] == "1"
    assert "s3cret" not in p.stdout + p.stderr  # the password is masked in what it prints

    # the same contents read through PostgreSQL
    pg = ReferenceStore(tmp_path / "elsewhere", exemplars=2, database_url=target)
    assert [m.public() for m in pg.list()] == [m.public() for m in store.list()]
    assert [v.id for v in pg.history("4")] == [v.id for v in store.history("4")]
    for m in store.list():
        assert np.array_equal(pg.get("4", m.label).feature, store.get("4", m.label).feature)
        assert pg.version_file(m.id, "thumb") == store.version_file(m.id, "thumb")
    assert pg.check() == []
    # ids go on after the copied ones (the sequences moved past them)
    new = pg.put("4", "L9", Reference("text", np.ones(4), "clip", text="t"), {})
    assert new > max(v.id for v in store.history("4"))
    assert ProjectSettings(tmp_path, target).get("4") == {"chain_length": 2}
    assert FieldStats(tmp_path, database_url=target).summary("4") == stats.summary("4")
    pq = WorkQueue(tmp_path / "x.db", target)
    assert [t["id"] for _, t, _ in pq.tasks()] == [1, 2] and pq.was_applied(12, "t", False)

    # a second migration into the now full database is refused, nothing written
    again = _admin(_env(data), "migrate", "--to", target)
    assert again.returncode == 1 and "already holds SmartSAM data" in again.stderr
    assert len(pg.history("4")) == len(store.history("4")) + 1
    # the admin CLI works on PostgreSQL as on SQLite: check, gc
    env = _env(tmp_path / "unused", SMARTSAM_DATABASE_URL=target)
    assert _admin(env, "check").returncode == 0
    assert _admin(env, "gc").stdout.startswith("removed 0 ")
    assert [json.loads(x)["label"] for x in _admin(env, "list", "--project", "4").stdout.splitlines()] == ["L0", "L2", "L9"]


def test_a_database_down_or_a_wrong_password_stops_the_start_with_one_message(tmp_path, pg_server):
    from backend_helpers import free_port

    wrong = pg_server.url(pg_server.new_database(), password="not-the-pw-93ab")
    down = f"postgresql://smartsam:hidden-pw-51cd@127.0.0.1:{free_port()}/nothing"
    for url, secret, reason in ((wrong, "not-the-pw-93ab", "password authentication failed"),
                                (down, "hidden-pw-51cd", "Connection refused")):
        p = subprocess.run([sys.executable, "-m", "backend.server", "--no-download"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=_env(tmp_path / "d", SMARTSAM_DATABASE_URL=url))
        out = p.stdout + p.stderr
        assert p.returncode == 1, out
        assert out.count("error:") == 1 and reason in out and "***" in out, out
        assert secret not in out
        m = _admin(_env(tmp_path / "d", SMARTSAM_DATABASE_URL=url), "list")
        assert m.returncode == 1 and reason in m.stderr and secret not in m.stdout + m.stderr


def compose_environment(service: dict) -> dict:
    """A service's environment as Compose reads it: a list of ``KEY=VALUE`` or a mapping (YAML merge
    keys already resolved by the YAML reader, as Compose's own reader does)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_the_compose_replicas_example_is_consistent_and_its_nginx_config_passes_nginx_t():
    """As far as this machine can check docker-compose.yml (no container runtime runs here): the
    file is merged as Compose merges it, and each replica keeps every setting of the single
    backend (basic auth, allowed hosts, local files, the webhook secret...; a service-level
    ``environment:`` used to replace them all) plus its shared database; the replicas trust the
    balancer's forwarded sender and the balancer has that address; the balancer serves
    docker/nginx.conf, and that file passes ``nginx -t`` (upstream names set to local addresses:
    the service names only resolve inside compose; the same file balances the replicas in
    test_label_studio.py)."""
    import ipaddress

    import yaml

    from servers import Nginx

    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose = doc["services"]
    pg_env = compose_environment(compose["postgres"])
    single = compose_environment(compose["smartsam"])
    assert {"BASIC_AUTH_USER", "BASIC_AUTH_PASS", "SMARTSAM_ALLOWED_HOSTS", "SMARTSAM_WEBHOOK_SECRET",
            "LOCAL_FILES_DOCUMENT_ROOT", "SMARTSAM_ADMIN_TOKEN"} <= set(single)
    for name in ("smartsam-a", "smartsam-b"):
        env = compose_environment(compose[name])
        missing = {k: v for k, v in single.items() if env.get(k) != v}
        assert not missing, f"{name} loses the shared settings {sorted(missing)}"
        url = env["SMARTSAM_DATABASE_URL"]
        assert url.startswith(f"postgresql://{pg_env['POSTGRES_USER']}:") and url.endswith(f"@postgres:5432/{pg_env['POSTGRES_DB']}")
        assert compose[name]["build"] == "." and compose[name]["profiles"] == ["replicas"]
        # a replica's spool (what comes while PostgreSQL is away) outlives the container
        assert any(v.endswith(":/data") for v in compose[name]["volumes"]), compose[name]["volumes"]
    balancer_ip = compose["balancer"]["networks"]["default"]["ipv4_address"]
    subnet = doc["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(balancer_ip) in ipaddress.ip_network(subnet)
    assert all(compose_environment(compose[n])["SMARTSAM_TRUSTED_PROXIES"] == balancer_ip for n in ("smartsam-a", "smartsam-b"))
    assert compose["balancer"]["volumes"] == ["./docker/nginx.conf:/etc/nginx/conf.d/default.conf:ro"]
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in (ROOT / "docker" / "nginx.conf").read_text()
    lb = Nginx(["127.0.0.1:1", "127.0.0.1:2"])
    try:
        p = lb.test_config()
        assert p.returncode == 0 and "syntax is ok" in p.stderr, p.stderr
    finally:
        lb.close()


def test_a_postgresql_that_stops_answering_fails_calls_in_bounded_time_then_serves_again(pg_server):
    """The server frozen (SIGSTOP on every PostgreSQL process: its kernel still accepts and
    acknowledges, nothing answers) while the store holds open connections: a read fails as
    unavailable within the reply bound plus a connection attempt, instead of waiting for ever;
    once the server runs again the next read is answered. (Before the bound the read was still
    waiting when the server was woken, 20 s later.)"""
    import signal
    import threading
    import time

    from backend.store.db import BREAKER_S, Database, DatabaseUnavailable

    db = Database(pg_server.new_database(), "frozen", reply_timeout=2)
    assert db.query("SELECT 1")[0][0] == 1  # an open, pooled connection
    master = int((pg_server.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    pids = [master, *map(int, children)]
    outcome = {}

    def read():
        t0 = time.monotonic()
        try:
            db.query("SELECT 1")
            outcome["answer"] = time.monotonic() - t0
        except DatabaseUnavailable as e:
            outcome["error"], outcome["after"] = str(e), time.monotonic() - t0

    def signal_all(sig):  # a child may have exited meanwhile (an autovacuum worker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    try:  # the cluster is the session's: it is woken whatever happens here
        signal_all(signal.SIGSTOP)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(20)
        waiting = reader.is_alive()
    finally:
        signal_all(signal.SIGCONT)
    reader.join(30)
    assert not waiting, f"the read was still waiting 20 s after the server froze ({outcome})"
    # the pooled connection's ping: 2 s without an answer; then a new connection: 3 s (connect_timeout)
    assert "error" in outcome and outcome["after"] < 10, outcome
    assert "no answer" in outcome["error"] or "timeout" in outcome["error"], outcome
    time.sleep(BREAKER_S)
    assert db.query("SELECT 1")[0][0] == 1
