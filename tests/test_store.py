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
    return subprocess.run([sys.executable, "-m", "backend.admin", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_migrate_copies_everything_into_an_empty_postgresql_and_refuses_a_full_one(tmp_path, pg_server, gt_mask):
    from backend.field_stats import FieldStats
    from backend.project_settings import ProjectSettings
    from backend.references import ReferenceStore
    from backend.work_queue import WorkQueue
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
    assert queue.first_application(12, "t", False)

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
    assert [t["id"] for _, t, _ in pq.tasks()] == [1, 2] and not pq.first_application(12, "t", False)

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


def test_the_compose_replicas_example_is_consistent_and_its_nginx_config_passes_nginx_t():
    """As far as this machine can check docker-compose.yml (no container runtime runs here): the
    replicas share the PostgreSQL service's database, the balancer serves docker/nginx.conf, and
    that file passes ``nginx -t`` (upstream names set to local addresses: the service names only
    resolve inside compose; the same file balances the replicas in test_label_studio.py)."""
    import yaml

    from servers import Nginx

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    pg_env = dict(e.split("=", 1) for e in compose["postgres"]["environment"])
    for name in ("smartsam-a", "smartsam-b"):
        env = dict(e.split("=", 1) for e in compose[name]["environment"])
        url = env["SMARTSAM_DATABASE_URL"]
        assert url.startswith(f"postgresql://{pg_env['POSTGRES_USER']}:") and url.endswith(f"@postgres:5432/{pg_env['POSTGRES_DB']}")
        assert compose[name]["build"] == "." and compose[name]["profiles"] == ["replicas"]
    assert compose["balancer"]["volumes"] == ["./docker/nginx.conf:/etc/nginx/conf.d/default.conf:ro"]
    lb = Nginx(["127.0.0.1:1", "127.0.0.1:2"])
    try:
        p = lb.test_config()
        assert p.returncode == 0 and "syntax is ok" in p.stderr, p.stderr
    finally:
        lb.close()


def test_postgresql_going_away_while_serving_loses_nothing(tmp_path, pg_server, datasets):
    """The database stops while the backend serves: a click still answers (without the reference,
    the reason in its ``errors``), ``/health`` says so, a webhook is refused (503: Label Studio's
    delivery is not lost silently) and the queued work waits; the database back, the reference is
    used again and the queue goes on. The password shows nowhere."""
    from backend_helpers import TOKEN, Backend, ImageServer, keypoint, predict_body

    img = (datasets / "GrabCut" / "img" / "106024.jpg").read_bytes()
    files = ImageServer({"penguin.jpg": img})
    url = pg_server.new_database()
    b = Backend(tmp_path / "data", env={"LABEL_STUDIO_URL": files.url, "LABEL_STUDIO_API_KEY": TOKEN,
                                        "SMARTSAM_ADMIN_TOKEN": "adm", "SMARTSAM_DATABASE_URL": url,
                                        "SMARTSAM_CHAIN_LENGTH": "0"}).start()
    admin = {"Authorization": "Bearer adm", "Content-Type": "application/json"}
    body = predict_body("/data/upload/1/penguin.jpg", [keypoint(50, 50)], project="3.1")
    try:
        assert b.request("PUT", "/admin/references/3/Object", json.dumps({"text": "a bird"}).encode(), admin)[0] == 200
        s, r = b.post("/predict", body)
        assert s == 200 and r["results"][0]["mode"] == "reference-text", r
        pg_server.stop()
        try:
            s, r = b.post("/predict", body)
            assert s == 200 and r["results"][0]["mode"] == "pure-is", r
            assert "unreachable" in r["results"][0]["errors"][0] and "***" in r["results"][0]["errors"][0]
            h = b.get("/health")[1]
            assert h["status"] == "UP" and h["database"]["ok"] is False and "unreachable" in h["database"]["error"]
            s, w = b.post("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"id": 5}, "project": {"id": 3}})
            assert s == 503, w
            log = b.log_path.read_text()
            assert "s3cret" not in json.dumps([r, h, w]) + log
        finally:
            pg_server.restart()
        s, r = b.post("/predict", body)  # the pool replaces the dropped connections by itself
        assert s == 200 and r["results"][0]["mode"] == "reference-text", r
        assert b.get("/health")[1]["database"]["ok"] is True
    finally:
        b.stop()
        files.close()
