"""The reference store: durable, atomic under SIGKILL, and clear about versions; on both engines
(the embedded SQLite files and a real PostgreSQL: the ``database_url`` fixture)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backend.store.references import SCHEMA_VERSION, CorruptReference, ReferenceStore, ReferenceStoreError
from smartsam.selector import Reference

ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from backend.store.references import ReferenceStore
from smartsam.selector import Reference
store = ReferenceStore(sys.argv[1], database_url=sys.argv[4] or None)
k = int(sys.argv[3])
print("ready", flush=True)
while True:
    k += 1
    for label in ("a", "b", "c"):
        m = np.zeros((64, 64), bool); m[: (k % 60) + 1] = True
        store.put("1", label, Reference("mask", np.full(256, float(k), np.float32), "x"), {"k": k}, mask=m)
"""


def test_sigkill_while_writing_never_leaves_a_half_reference(tmp_path, database_url):
    store_dir = tmp_path / "store"
    seen_max = 0
    for round_ in range(15 if database_url is None else 6):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(store_dir), str(ROOT), str(round_ * 100000),
                              database_url or ""], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.37 * ((round_ * 7) % 5) / 5)  # kill at varied moments
        p.send_signal(signal.SIGKILL)
        p.wait()
        store = ReferenceStore(store_dir, database_url=database_url)
        assert store.check() == []
        for m in store.list():
            ref = store.get(m.project, m.label)
            k = ref.feature[0]
            assert np.all(ref.feature == k)  # complete: one version throughout
            assert m.source["k"] == int(k)  # the row and its file belong together
            mask = store.mask_png(m.project, m.label)
            assert mask is not None
            seen_max = max(seen_max, k)
    assert seen_max > 0


def test_kill_the_real_backend_while_it_writes_references(tmp_path):
    import json
    import threading

    from backend_helpers import Backend

    data = tmp_path / "data"
    for cycle in range(3):
        b = Backend(data, env={"SMARTSAM_ADMIN_TOKEN": "t"}).start()
        stop = threading.Event()
        written = []

        def writer():
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    status, _ = b.request("PUT", f"/admin/references/5/L{i % 2}", json.dumps({"text": f"thing {cycle} {i}"}).encode(),
                                          {"Authorization": "Bearer t", "Content-Type": "application/json"})
                    if status == 200:
                        written.append(i)
                except OSError:
                    return

        th = threading.Thread(target=writer)
        th.start()
        # killed only once writes are being acknowledged (the first one loads the text model: on a
        # busy 2-core machine that took more than the 2.5 s this test once waited), then while
        # they keep coming, so the kill lands inside one
        deadline = time.time() + 120
        while len(written) < 2 and th.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        b.kill(signal.SIGKILL)
        stop.set()
        th.join(30)
        assert len(written) >= 2, "no reference was written before the kill: the test would prove nothing"
        store = ReferenceStore(data)
        assert store.check() == []
        refs = store.list("5")
        assert refs, "references written and acknowledged before the kill must survive it"
        for m in refs:
            assert store.get("5", m.label).kind == "text" and m.text.startswith("thing ")


def test_newer_store_is_refused_and_corrupt_database_is_named(tmp_path, database_url):
    store = ReferenceStore(tmp_path / "a", database_url=database_url)
    store.put("1", "x", Reference("text", np.ones(4), "clip", text="t"), {})
    with store.db.write() as c:
        c.execute("UPDATE smartsam_schema SET version = ? WHERE store = 'references'", (SCHEMA_VERSION + 1,))
    with pytest.raises(ReferenceStoreError, match="newer than this backend"):
        ReferenceStore(tmp_path / "a", database_url=database_url)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "references.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ReferenceStoreError, match="unreadable"):
        ReferenceStore(tmp_path / "b")


def test_missing_or_damaged_data_is_reported(tmp_path, database_url):
    store = ReferenceStore(tmp_path, database_url=database_url)
    store.put("1", "x", Reference("text", np.ones(4), "clip", text="t"), {})
    store.put("1", "y", Reference("text", np.ones(4) * 2, "clip", text="u"), {})
    with store.db.write() as c:
        c.execute("DELETE FROM blobs WHERE name = ?", (store.meta("1", "x").feature_file,))
        c.execute("UPDATE blobs SET data = ? WHERE name = ?", (b"garbage", store.meta("1", "y").feature_file))
    with pytest.raises(CorruptReference, match="missing"):
        store.get("1", "x")
    with pytest.raises(CorruptReference, match="damaged"):
        store.get("1", "y")
    problems = store.check()
    assert len(problems) == 2 and "missing" in problems[0] and "damaged" in problems[1]
    assert store.delete("1", "x") == 1 and [m.label for m in store.list()] == ["y"]


def test_admin_cli_sets_lists_shows_and_clears(tmp_path, datasets):
    env = dict(os.environ, SMARTSAM_DATA_DIR=str(tmp_path), SMARTSAM_BACKBONE="sam2.1_hiera_tiny-random", PYTHONPATH=str(ROOT))

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "backend.cli.references", *a], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)

    img = datasets / "COCO_MVal-dev/img/airplane00_000000281693.jpg"
    gt = datasets / "COCO_MVal-dev/gt/airplane00_000000281693.png"
    p = cli("set", "4", "Object", "--image", str(img), "--mask", str(gt))
    assert p.returncode == 0, p.stderr
    assert cli("set", "4", "Other", "--text", "an airplane").returncode == 0
    p = cli("list", "--project", "4")
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(r["label"], r["kind"]) for r in rows] == [("Object", "mask"), ("Other", "text")]
    p = cli("show", "4", "Object", "--mask-out", str(tmp_path / "m.png"))
    assert p.returncode == 0 and (tmp_path / "m.png").stat().st_size > 100
    assert cli("check").returncode == 0
    assert cli("clear", "4", "Other").stdout.strip() == "deleted 1"
    p = cli("set", "4", "Object", "--image", str(tmp_path / "missing.jpg"))
    assert p.returncode == 2 and "not found" in p.stderr
    # history and restore: the text reference comes back after the clear
    hist = [json.loads(line) for line in cli("history", "4", "Other").stdout.splitlines()]
    assert [(h["kind"], h["how"], h["current"]) for h in hist] == [("none", "clear", False), ("text", "admin", False)]
    assert cli("restore", str(hist[1]["version"])).returncode == 0
    assert [r["label"] for r in map(json.loads, cli("list", "--project", "4").stdout.splitlines())] == ["Object", "Other"]
    assert cli("restore", "999999").returncode == 2
    assert cli("gc").stdout.startswith("removed ")


def _ref(v, d=8):
    f = np.zeros(d, np.float32)
    f[v % d] = 1.0
    f[(v + 1) % d] = 0.5 + v
    return Reference("mask", f, "x")


def _mask(k):
    m = np.zeros((32, 32), bool)
    m[: k + 1, : k + 2] = True
    return m


def test_history_withdraw_restore_and_clear(tmp_path, database_url):
    store = ReferenceStore(tmp_path, database_url=database_url)
    img = np.full((32, 32, 3), 90, np.uint8)
    a = store.put("1", "L", _ref(1), {"annotation": 11}, mask=_mask(1), image=img, annotation=11, how="first", policy="auto")
    assert a is not None and store.meta("1", "L").id == a
    # K = 1: another annotation finds no free slot; the same mask again from 11 is no new version
    assert store.put("1", "L", _ref(2), {}, mask=_mask(2), annotation=12, how="first", policy="auto") is None
    assert store.put("1", "L", _ref(1), {}, mask=_mask(1), image=img, annotation=11, how="edited", policy="auto") is None
    # 11 edited: its slot gets the new mask
    e = store.put("1", "L", _ref(3), {}, mask=_mask(3), annotation=11, how="edited", policy="auto")
    assert store.meta("1", "L").id == e
    # 12 forces: replaces; deleting 12 falls back to 11's latest version, deleting 11 to none
    f = store.put("1", "L", _ref(4), {}, mask=_mask(4), annotation=12, how="forced", policy="replace")
    assert store.meta("1", "L").id == f
    # applied again (a crash between the reference and the record of its event): no new version
    assert store.put("1", "L", _ref(4), {}, mask=_mask(4), annotation=12, how="forced", policy="replace") is None
    assert [m.id for m in store.withdraw_annotation(12, "deleted")] == [f]
    assert store.meta("1", "L").id == e and np.allclose(store.get("1", "L").feature, _ref(3).feature)
    assert {m.id for m in store.withdraw_annotation(11, "deleted")} == {a, e}
    assert store.meta("1", "L") is None and store.get("1", "L") is None
    # every version is still in the history; restoring one makes it current again as a new version
    hist = store.history("1", "L")
    assert [v.id for v in hist] == [f, e, a] and all(v.withdrawn_reason == "deleted" for v in hist)
    r = store.restore(a, {"admin": "test"})
    cur = store.meta("1", "L")
    assert cur.id == r and cur.how == "restore" and cur.source["restored"] == a and cur.thumb_file is not None
    assert np.allclose(store.get("1", "L").feature, _ref(1).feature)
    assert store.version_file(r, "thumb")[:2] == b"\xff\xd8"  # a JPEG
    # clearing keeps the history too, and "none" is restorable like any version
    assert store.delete("1", "L") == 1 and store.get("1", "L") is None
    cleared = store.history("1", "L")[0]
    assert cleared.kind == "none"
    store.restore(r)
    assert store.meta("1", "L") is not None
    with pytest.raises(KeyError):
        store.restore(10**6)


def test_k_exemplars_fill_in_order_and_are_used_together(tmp_path, database_url):
    store = ReferenceStore(tmp_path, exemplars=3, database_url=database_url)
    ids = [store.put("1", "L", _ref(k), {}, mask=_mask(k), annotation=k, how="first", policy="auto") for k in range(1, 5)]
    assert ids[3] is None  # a fourth annotation finds no free slot
    cur = store.current("1", "L")
    assert [(m.slot, m.annotation) for m in cur] == [(0, 1), (1, 2), (2, 3)]
    ref = store.get("1", "L")
    assert ref.feature.shape == (3, 8) and np.allclose(ref.feature[1], _ref(2).feature)
    # annotation 2 edited: its own slot; deleting annotation 1 frees slot 0 for the next one
    store.put("1", "L", _ref(7), {}, mask=_mask(7), annotation=2, how="edited", policy="auto")
    assert np.allclose(store.get("1", "L").feature[1], _ref(7).feature)
    store.withdraw_annotation(1, "deleted")
    store.put("1", "L", _ref(4), {}, mask=_mask(4), annotation=4, how="first", policy="auto")
    assert [(m.slot, m.annotation) for m in store.current("1", "L")] == [(0, 4), (1, 2), (2, 3)]
    # a forced one replaces all three; withdrawing it brings all three back
    store.put("1", "L", _ref(5), {}, mask=_mask(5), annotation=5, how="forced", policy="replace")
    assert [m.annotation for m in store.current("1", "L")] == [5] and store.get("1", "L").exemplars == 1
    store.withdraw_annotation(5, "deleted")
    assert [m.annotation for m in store.current("1", "L")] == [4, 2, 3]
    # the same store read with K = 1 uses slot 0 only
    assert ReferenceStore(tmp_path, database_url=database_url).get("1", "L").exemplars == 1


def test_schema_1_store_is_migrated_with_its_references(tmp_path):
    # a store as the previous release wrote it: one row per label in "refs"
    (tmp_path / "refs").mkdir()
    buf = __import__("io").BytesIO()
    np.save(buf, _ref(3).feature)
    import hashlib

    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    (tmp_path / "refs" / f"{sha}.npy").write_bytes(buf.getvalue())
    c = sqlite3.connect(tmp_path / "references.db")
    c.execute("""CREATE TABLE refs (project TEXT NOT NULL, label TEXT NOT NULL, kind TEXT NOT NULL, extractor TEXT NOT NULL,
              text TEXT, source TEXT NOT NULL, created_at REAL NOT NULL, feature_file TEXT NOT NULL,
              feature_sha TEXT NOT NULL, mask_file TEXT, image_file TEXT, PRIMARY KEY (project, label))""")
    c.execute("INSERT INTO refs VALUES ('7','Object','mask','x',NULL,?,1.0,?,?,NULL,NULL)",
              (json.dumps({"annotation": 42, "event": "ANNOTATION_CREATED"}), f"{sha}.npy", sha))
    c.execute("PRAGMA user_version = 1")
    c.commit()
    c.close()
    store = ReferenceStore(tmp_path)
    assert store.db.schema_version() == SCHEMA_VERSION == 3
    # the file is in the database now: the folder may go
    import shutil

    shutil.rmtree(tmp_path / "refs")
    m = store.meta("7", "Object")
    assert (m.how, m.annotation, m.slot) == ("migrated", 42, 0)
    assert np.allclose(store.get("7", "Object").feature, _ref(3).feature) and store.check() == []
    # and its source annotation still governs it: deleting annotation 42 leaves none
    store.withdraw_annotation(42, "deleted")
    assert store.get("7", "Object") is None


def test_garbage_collection_never_removes_data_a_writer_is_about_to_name(tmp_path, database_url):
    import threading

    store = ReferenceStore(tmp_path, database_url=database_url)
    stop = threading.Event()
    errors = []

    def writer():
        try:
            for k in range(1, 151):
                # blobs are reused by content (k % 3): the case where a blob exists before its new row
                store.put("1", "L", _ref(k % 3), {"k": k}, mask=_mask(k % 3), how="admin")
                if k in (50, 100):  # at least two collections run while versions are being written
                    deadline = time.monotonic() + 30  # (a loaded machine once let only one through)
                    while len(collected) < k // 50 and time.monotonic() < deadline:
                        time.sleep(0.001)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()  # the collector races the writer for exactly its 150 versions

    collected = []

    def collector():
        other = ReferenceStore(tmp_path, database_url=database_url)  # another connection, as another replica's
        while not stop.is_set():
            try:
                collected.append(other.collect_garbage())
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=collector)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors and store.check() == [] and len(collected) > 1 and sum(collected) == 0
    # every version ever written still has its data (the history stays viewable)
    for v in store.history("1", "L"):
        for name in (v.feature_file, v.mask_file):
            assert store._read_file(name), (v.id, name)
    assert len(store.history("1", "L")) == 150
    # data no version names goes
    with store.db.write() as c:
        c.execute("INSERT INTO blobs (name, data) VALUES (?, ?)", ("0" * 64 + ".npy", b"orphan"))
    assert store.collect_garbage() == 1
