"""The durable work queue (backend/work_queue.py) on its own, on both engines: rows outlive their
process, claims hold for a lease, a starting process frees the rows of its host's dead processes,
concurrent workers claim each task once, and an annotation version is applied once (the
end-to-end SIGKILL and replica tests are in test_label_studio.py and test_replicas.py)."""

import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADD = """
import sys, time
from backend.work_queue import WorkQueue
q = WorkQueue(sys.argv[1], sys.argv[4] or None)
q.add_tasks("7", [{"id": int(sys.argv[2]), "data": {"image": "x"}}], "<View/>")
q.add_event("ANNOTATION_CREATED", int(sys.argv[2]), None)
print("added", flush=True)
if sys.argv[3] == "stay":
    time.sleep(120)
"""


def _writer(db: Path, task: int, stay: bool, url) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", ADD, str(db), str(task), "stay" if stay else "go", url or ""], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "added"
    return p


def test_rows_of_a_gone_process_are_freed_and_a_running_ones_are_not(tmp_path, database_url):
    from backend.work_queue import WorkQueue

    db = tmp_path / "jobs.db"
    gone = _writer(db, 1, stay=False, url=database_url)
    gone.wait(30)
    alive = _writer(db, 2, stay=True, url=database_url)
    try:
        q = WorkQueue(db, database_url)
        assert q.take_over() == {"events": 1, "prelabel": 1}  # the gone process's event and task
        # its notice is this process's now; the running one's stays with it while its lease lasts
        assert [(a, ann) for _, a, ann, _ in q.claim_events()] == [("ANNOTATION_CREATED", 1)]
        # tasks are anyone's: both are claimable, oldest first, each once
        assert [q.claim_task()[1]["id"], q.claim_task()[1]["id"], q.claim_task()] == [1, 2, None]
        # a task queued twice is queued once
        assert q.add_tasks("7", [{"id": 1}, {"id": 3}], "<View/>") == [{"id": 3}]
        q.task_done("7", 1)
        assert [t["id"] for _, t, _ in q.tasks()] == [2, 3] and q.has_task("7", 3) and not q.has_task("7", 1)
    finally:
        alive.kill()
        alive.wait(30)
    assert WorkQueue(db, database_url).take_over() == {"events": 1, "prelabel": 1}  # now the other one is gone too


def test_a_claim_holds_while_renewed_and_lapses_after_its_lease(tmp_path, database_url):
    from backend.work_queue import WorkQueue

    a = WorkQueue(tmp_path / "jobs.db", database_url, lease_s=1.0)
    b = WorkQueue(tmp_path / "jobs.db", database_url, lease_s=1.0)
    b.owner = "another-replica:1"
    a.add_tasks("1", [{"id": 5}], "<View/>")
    a.add_event("ANNOTATION_CREATED", 9, "1")
    a.add_tasks("1", [{"id": 6}], "<View/>")
    a.renew()  # renewing what a claimed leaves what it only queued to anyone
    assert a.claim_task()[1]["id"] == 5 and b.claim_task()[1]["id"] == 6 and b.claim_events() == []
    b.task_done("1", 6)
    for _ in range(3):  # renewed: never claimable by b
        time.sleep(0.5)
        a.renew()
        assert b.claim_task() is None and b.claim_events() == []
    time.sleep(1.2)  # a stops renewing (it died): b takes both over
    assert b.claim_task()[1]["id"] == 5 and [r[2] for r in b.claim_events()] == [9]
    assert a.claim_task() is None


def test_concurrent_workers_claim_each_task_once(tmp_path, database_url):
    from backend.work_queue import WorkQueue

    WorkQueue(tmp_path / "jobs.db", database_url).add_tasks("1", [{"id": i} for i in range(60)], "<View/>")
    claimed = {}
    start = threading.Barrier(4)

    def worker(k):
        q = WorkQueue(tmp_path / "jobs.db", database_url)
        q.owner = f"replica-{k}:1"
        start.wait()
        while (item := q.claim_task()) is not None:
            claimed.setdefault(item[1]["id"], []).append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(claimed) == list(range(60)) and all(len(v) == 1 for v in claimed.values())
    assert len({v[0] for v in claimed.values()}) > 1  # more than one worker took part


def test_an_annotation_version_is_applied_once_across_processes(tmp_path, database_url):
    from backend.work_queue import WorkQueue

    a = WorkQueue(tmp_path / "jobs.db", database_url)
    b = WorkQueue(tmp_path / "jobs.db", database_url)
    assert a.first_application(7, "2026-12-05T01:00:00Z", False)
    assert not b.first_application(7, "2026-12-05T01:00:00Z", False)  # the second delivery, another replica
    assert b.first_application(7, "2026-12-05T01:00:00Z", True)  # the same version as an update is another
    a.forget_application(7, "2026-12-05T01:00:00Z", False)  # its application failed: may be tried again
    assert b.first_application(7, "2026-12-05T01:00:00Z", False)
