"""The reference store: durable, atomic under SIGKILL, and clear about versions."""

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

from backend.references import SCHEMA_VERSION, CorruptReference, ReferenceStore, ReferenceStoreError
from smartsam.selector import Reference

ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from backend.references import ReferenceStore
from smartsam.selector import Reference
store = ReferenceStore(sys.argv[1])
k = int(sys.argv[3])
print("ready", flush=True)
while True:
    k += 1
    for label in ("a", "b", "c"):
        m = np.zeros((64, 64), bool); m[: (k % 60) + 1] = True
        store.put("1", label, Reference("mask", np.full(256, float(k), np.float32), "x"), {"k": k}, mask=m)
"""


def test_sigkill_while_writing_never_leaves_a_half_reference(tmp_path):
    store_dir = tmp_path / "store"
    seen_max = 0
    for round_ in range(15):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(store_dir), str(ROOT), str(round_ * 100000)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.37 * ((round_ * 7) % 5) / 5)  # kill at varied moments
        p.send_signal(signal.SIGKILL)
        p.wait()
        store = ReferenceStore(store_dir)
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
        time.sleep(2.5)
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


def test_newer_store_is_refused_and_corrupt_database_is_named(tmp_path):
    store = ReferenceStore(tmp_path / "a")
    store.put("1", "x", Reference("text", np.ones(4), "clip", text="t"), {})
    c = sqlite3.connect(tmp_path / "a" / "references.db")
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    with pytest.raises(ReferenceStoreError, match="newer than this backend"):
        ReferenceStore(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "references.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ReferenceStoreError, match="unreadable"):
        ReferenceStore(tmp_path / "b")


def test_missing_file_is_reported(tmp_path):
    store = ReferenceStore(tmp_path)
    store.put("1", "x", Reference("text", np.ones(4), "clip", text="t"), {})
    (tmp_path / "refs" / store.meta("1", "x").feature_file).unlink()
    with pytest.raises(CorruptReference, match="missing"):
        store.get("1", "x")
    assert store.check() and "missing" in store.check()[0]
    assert store.delete("1", "x") == 1 and store.list() == []


def test_admin_cli_sets_lists_shows_and_clears(tmp_path, datasets):
    env = dict(os.environ, SMARTSAM_DATA_DIR=str(tmp_path), SMARTSAM_BACKBONE="sam2.1_hiera_tiny-random", PYTHONPATH=str(ROOT))

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "backend.admin", *a], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)

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
