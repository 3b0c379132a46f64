"""The durable work queue (backend/store/work_queue.py) on its own, on both engines: rows outlive their
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
from backend.store.work_queue import WorkQueue
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
    from backend.store.work_queue import WorkQueue

    db = tmp_path / "jobs.db"
    gone = _writer(db, 1, stay=False, url=database_url)
    gone.wait(30)
    alive = _writer(db, 2, stay=True, url=database_url)
    try:
        q = WorkQueue(db, database_url)
        assert q.take_over() == {"events": 1, "prelabel": 1}  # the gone process's event and task
        # its notice is this process's now; the running one's stays with it while its lease lasts
        n = q.claim_event()
        assert (n.action, n.annotation) == ("ANNOTATION_CREATED", 1) and q.claim_event() is None
        # tasks are anyone's: both are claimable, oldest first, each once
        assert [q.claim_task().task["id"], q.claim_task().task["id"], q.claim_task()] == [1, 2, None]
        # a task queued twice is queued once
        assert q.add_tasks("7", [{"id": 1}, {"id": 3}], "<View/>") == [{"id": 3}]
        q.task_done("7", 1)
        assert [t["id"] for _, t, _ in q.tasks()] == [2, 3] and q.has_task("7", 3) and not q.has_task("7", 1)
        q.event_done(n.row)
    finally:
        alive.kill()
        alive.wait(30)
    assert WorkQueue(db, database_url).take_over() == {"events": 1, "prelabel": 1}  # now the other one is gone too


def test_a_claim_holds_while_renewed_and_lapses_after_its_lease(tmp_path, database_url):
    from backend.store.work_queue import WorkQueue

    a = WorkQueue(tmp_path / "jobs.db", database_url, lease_s=1.0)
    b = WorkQueue(tmp_path / "jobs.db", database_url, lease_s=1.0)
    b.owner = "another-replica:1:x"
    a.add_tasks("1", [{"id": 5}], "<View/>")
    a.add_event("ANNOTATION_CREATED", 9, "1")
    a.add_tasks("1", [{"id": 6}], "<View/>")
    a.renew()  # renewing what a claimed leaves what it only queued to anyone
    held = a.claim_task()
    assert held.task["id"] == 5 and b.claim_task().task["id"] == 6 and b.claim_event() is None
    b.task_done("1", 6)
    for _ in range(3):  # renewed: never claimable by b
        time.sleep(0.5)
        a.renew([held.seq])
        assert b.claim_task() is None and b.claim_event() is None
    time.sleep(1.2)  # a stops renewing (it died): b takes both over
    assert b.claim_task().task["id"] == 5 and b.claim_event().annotation == 9
    assert a.claim_task() is None
    # a task a's worker no longer holds (its end could not be written) lapses though a lives on
    b.task_done("1", 5)
    a.add_tasks("1", [{"id": 7}], "<View/>")
    lost = a.claim_task()
    for _ in range(3):
        time.sleep(0.5)
        a.renew([])  # a's notices renewed, the task not held
    assert a.claim_task().seq == lost.seq


def test_concurrent_workers_claim_each_task_once(tmp_path, database_url):
    from backend.store.work_queue import WorkQueue

    WorkQueue(tmp_path / "jobs.db", database_url).add_tasks("1", [{"id": i} for i in range(60)], "<View/>")
    claimed = {}
    start = threading.Barrier(4)

    def worker(k):
        q = WorkQueue(tmp_path / "jobs.db", database_url)
        q.owner = f"replica-{k}:1:x"
        start.wait()
        while (item := q.claim_task()) is not None:
            claimed.setdefault(item.task["id"], []).append(k)
            # a worker works between claims; without it, one thread can win every claim (SQLite's
            # lock has no fairness: the holder takes it again while the others back off)
            time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(claimed) == list(range(60)) and all(len(v) == 1 for v in claimed.values())
    assert len({v[0] for v in claimed.values()}) > 1  # more than one worker took part


def test_an_annotation_version_is_applied_once_across_processes(tmp_path, database_url):
    from backend.store.work_queue import WorkQueue

    a = WorkQueue(tmp_path / "jobs.db", database_url)
    b = WorkQueue(tmp_path / "jobs.db", database_url)
    v = (7, "2026-12-05T01:00:00Z", False)
    assert not a.was_applied(*v)
    assert a.record_application(*v)  # recorded after the work
    assert b.was_applied(*v) and not b.record_application(*v)  # the second delivery, another replica
    assert not b.was_applied(7, "2026-12-05T01:00:00Z", True)  # the same version as an update is another


NAMESPACED = """
import sys, time
from backend.store.work_queue import WorkQueue, process_identity
q = WorkQueue(sys.argv[1], sys.argv[2] or None, lease_s=600)
print(process_identity(), q.take_over(), flush=True)
if sys.argv[3] == "add":
    q.add_tasks("7", [{"id": 1, "data": {"image": "x"}}], "<View/>")
    q.add_event("ANNOTATION_CREATED", 1, None)
    print("added", flush=True)
    time.sleep(120)
"""


def test_a_restart_in_a_fresh_pid_namespace_takes_its_queue_back(tmp_path, database_url):
    """A container restarted with the same host name numbers its processes the same way: the
    process that queued (pid 1 of its namespace) is killed, and the next pid 1 of a fresh
    namespace must take its rows over at once, not mistake them for its own (as an owner named
    host:pid did: it then renewed them for ever and never worked them)."""
    import os
    import signal

    db = tmp_path / "jobs.db"
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NAMESPACED, str(db), database_url or ""]
    first = subprocess.Popen(cmd + ["add"], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    who = first.stdout.readline().split(" ", 1)[0]
    assert first.stdout.readline().strip() == "added"
    os.killpg(first.pid, signal.SIGKILL)  # the whole namespace dies, as a container does
    first.wait(30)
    again = subprocess.run(cmd + ["look"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    who2, took = again.stdout.strip().split(" ", 1)
    assert who.split(":")[:2] == who2.split(":")[:2] and who != who2  # the same host:pid, another process
    assert took == "{'events': 1, 'prelabel': 1}", again.stdout + again.stderr


def test_failed_rows_wait_their_backoff_and_are_given_up_then_kept(tmp_path, database_url):
    from backend.store.work_queue import RetryPolicy, WorkQueue

    # delays of 1 s (0.8-1.2 s jittered): the checks "not before the delay" run well inside it on
    # a busy machine (with 0.3 s, i.e. 0.24 s jittered, a loaded PostgreSQL once took longer)
    q = WorkQueue(tmp_path / "jobs.db", database_url, retry=RetryPolicy(first_delay=1.0, max_delay=1.0, give_up_after=2.5))
    q.add_tasks("1", [{"id": 1}], "<View/>")
    q.add_event("ANNOTATION_CREATED", 5, None, "10.0.0.1")
    item, notice = q.claim_task(), q.claim_event()
    q.keep_prediction(item.seq, {"task": 1, "result": [], "model_version": "v"})
    assert q.task_failed(item, "Label Studio answered HTTP 502") and q.event_failed(notice, "timed out")
    assert q.claim_task() is None and q.claim_event() is None  # not before the delay
    assert q.counts() == {"events": {"waiting": 1, "retrying": 1, "given_up": 0},
                          "prelabel": {"waiting": 1, "retrying": 1, "given_up": 0}}
    time.sleep(1.3)
    item, notice = q.claim_task(), q.claim_event()
    assert item.attempts == 1 and item.prediction["model_version"] == "v"  # the prediction is kept for the retry
    assert notice.attempts == 1 and notice.sender == "10.0.0.1"
    time.sleep(1.4)  # failing for longer than give_up_after: kept, given up, listed with its reason
    assert not q.task_failed(item, "HTTP 502 again") and not q.event_failed(notice, "timed out again")
    time.sleep(1.3)  # longer than any retry delay: a given-up row is not tried again by itself
    assert q.claim_task() is None and q.claim_event() is None and q.waiting_tasks() == 0
    listed = q.troubled()
    assert [(t["task"], t["given_up"], t["last_error"], t["predicted"]) for t in listed["tasks"]] == [
        (1, True, "HTTP 502 again", True)]
    assert [(e["annotation"], e["given_up"], e["attempts"]) for e in listed["events"]] == [(5, True, 2)]
    assert q.retry_given_up() == {"events": 1, "prelabel": 1}  # the admin's retry
    assert q.claim_task().task["id"] == 1 and q.claim_event().annotation == 5
    q.task_done("1", 1)
    # an unexpected error (a bug, not an outage) is tried unexpected_tries times, not for give_up_after
    q.add_tasks("1", [{"id": 2}], "<View/>")
    for k in range(3):
        deadline = time.time() + 5
        while (it := q.claim_task()) is None and time.time() < deadline:
            time.sleep(0.05)
        assert it.task["id"] == 2
        assert q.task_failed(it, "KeyError: 'x'", unexpected=True) == (k < 2)


def test_notices_are_taken_round_robin_per_sender_and_a_sender_is_capped(tmp_path, database_url):
    """1,000 notices from one sender ahead of one from another: the other's is taken first or
    second, never after the flood, and the flooding sender's 1,001st is refused while the other
    can still queue."""
    from backend.store.work_queue import SenderFull, WorkQueue

    q = WorkQueue(tmp_path / "jobs.db", database_url, max_per_sender=1000)
    for i in range(1000):
        assert q.add_event("ANNOTATION_CREATED", 10_000 + i, None, "203.0.113.9") == "queued"
    try:
        q.add_event("ANNOTATION_CREATED", 99_999, None, "203.0.113.9")
        raise AssertionError("the 1,001st notice of one sender was queued")
    except SenderFull:
        pass
    assert q.add_event("ANNOTATION_UPDATED", 42, "3", "127.0.0.1") == "queued"
    assert q.add_event("ANNOTATION_UPDATED", 42, "3", "127.0.0.1") == "merged"  # not started: one application covers both
    first = q.claim_event()
    second = q.claim_event(first.sender)
    assert first.sender == "127.0.0.1" and first.annotation == 42  # senders in turn
    assert second.sender == "203.0.113.9" and second.annotation == 10_000
    assert q.claim_event(second.sender).sender == "203.0.113.9"  # the only sender left
    # started: a new notice for the same annotation is queued again (it may carry a newer version)
    assert q.add_event("ANNOTATION_UPDATED", 42, "3", "127.0.0.1") == "queued"


def test_what_comes_while_the_shared_database_is_away_is_spooled_and_moved_back(tmp_path, pg_server):
    import pytest

    from backend.store.db import Database, DatabaseUnavailable
    from backend.store.work_queue import WorkQueue
    from backend_helpers import free_port

    q = WorkQueue(tmp_path / "jobs.db", pg_server.new_database())
    shared = q.db
    q.db = Database(f"postgresql://u:p@127.0.0.1:{free_port()}/x", "work_queue")  # away: nothing listens there
    assert q.add_event("ANNOTATION_CREATED", 5, "1", "127.0.0.1") == "spooled"
    assert q.add_tasks("1", [{"id": 3}], "<View/>") == [{"id": 3}]
    assert q.spooled() == 2
    with pytest.raises(DatabaseUnavailable):
        q.drain_spool()
    assert q.spooled() == 2
    q.db = shared  # back
    assert q.drain_spool() == {"event": 1, "task": 1, "dropped": 0} and q.spooled() == 0
    assert q.claim_event().annotation == 5 and q.claim_task().task["id"] == 3


def test_review_findings_of_the_queue_hold(tmp_path, database_url):
    """What a reviewer broke on paper, held here: 64-bit ids (PostgreSQL's INTEGER is 32-bit);
    a notice is merged only with the same sender's, and a /setup's with the same params; a
    given-up task is queued again by a new press of the button; an unexpected error does not
    count the outages before it; a process that lost a claim neither counts nor writes it."""
    from backend.store.work_queue import RetryPolicy, WorkQueue

    q = WorkQueue(tmp_path / "jobs.db", database_url, lease_s=1.0,
                  retry=RetryPolicy(first_delay=0.05, max_delay=0.05, give_up_after=0.3))
    big = 2 ** 40
    assert q.add_event("ANNOTATION_CREATED", big, None, "a") == "queued"
    assert q.add_tasks("9", [{"id": big}], "<View/>") == [{"id": big}]
    assert q.claim_event().annotation == big and q.claim_task().task["id"] == big
    assert q.record_application(big, "t", False) and q.was_applied(big, "t", False)
    # merged only with the same sender's notice, and a SETUP only with the same params
    assert q.add_event("ANNOTATION_UPDATED", 5, None, "10.0.0.1") == "queued"
    assert q.add_event("ANNOTATION_UPDATED", 5, None, "10.0.0.2") == "queued"
    assert q.add_event("SETUP", 3, '{"chain_length": 1}', "a") == "queued"
    assert q.add_event("SETUP", 3, '{"chain_length": 2}', "a") == "queued"
    assert q.add_event("SETUP", 3, '{"chain_length": 2}', "a") == "merged"
    # a given-up task (failing for longer than give_up_after) is queued afresh
    q.add_tasks("9", [{"id": 1}], "<View/>")

    def claim_one():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            t = q.claim_task()
            if t is not None and t.task["id"] == 1:
                return t
            time.sleep(0.01)
        raise AssertionError("task 1 never claimable")

    assert q.task_failed(claim_one(), "502") is True
    time.sleep(0.35)
    assert q.task_failed(claim_one(), "502") is False and not q.has_task("9", 1)
    assert q.add_tasks("9", [{"id": 1}], "<View/>") == [{"id": 1}] and q.has_task("9", 1)
    # an unexpected error after two outages is the first of its kind, not the third
    q2 = WorkQueue(tmp_path / "jobs.db", database_url, retry=RetryPolicy(first_delay=0.01, max_delay=0.01, unexpected_tries=2))
    q2.add_tasks("9", [{"id": 2}], "<View/>")

    def claim(n, task_id):
        while (it := n.claim_task()) is None or it.task["id"] != task_id:
            time.sleep(0.02)
        return it

    assert q2.task_failed(claim(q2, 2), "timeout") and q2.task_failed(claim(q2, 2), "timeout")
    assert q2.task_failed(claim(q2, 2), "KeyError", unexpected=True)  # 1 of 2
    assert not q2.task_failed(claim(q2, 2), "KeyError", unexpected=True)  # 2 of 2: given up
    # a lost claim: a's lease ran out and b took the task over
    a = WorkQueue(tmp_path / "jobs.db", database_url, lease_s=0.3)
    b = WorkQueue(tmp_path / "jobs.db", database_url, lease_s=30)
    b.owner = "another-replica:1:x"
    a.add_tasks("9", [{"id": 3}], "<View/>")
    held = claim(a, 3)
    time.sleep(0.4)
    taken = claim(b, 3)
    assert a.renew([held.seq]) == [held.seq]  # a hears it lost the task
    assert a.writing([held.seq], "v1") == [] and b.writing([taken.seq], "v1") == [taken.seq]
    assert a.task_failed(held, "late") and b.attempted(taken.seq) == ["v1"]  # a's failure did not touch b's row
    assert b.renew([taken.seq]) == []  # nor b's claim on it
    # b holds task 3 on its own lease: whatever else it can claim now (the tasks of q, whose
    # lease ran out, or none), task 3 is not among them
    others = []
    while (t := b.claim_task()) is not None:
        others.append(t.task["id"])
    assert 3 not in others


def test_the_spool_caps_each_sender_and_counts_what_it_cannot_move(tmp_path, pg_server):
    import pytest

    from backend.store.db import Database
    from backend.store.work_queue import SenderFull, WorkQueue
    from backend_helpers import free_port

    q = WorkQueue(tmp_path / "jobs.db", pg_server.new_database(), max_per_sender=2)
    shared = q.db
    q.db = Database(f"postgresql://u:p@127.0.0.1:{free_port()}/x", "work_queue")  # away
    assert q.add_event("ANNOTATION_CREATED", 1, None, "x") == "spooled"
    assert q.add_event("ANNOTATION_CREATED", 2, None, "x") == "spooled"
    with pytest.raises(SenderFull):
        q.add_event("ANNOTATION_CREATED", 3, None, "x")  # the spool caps a sender like the queue does
    assert q.add_event("ANNOTATION_CREATED", 4, None, "y") == "spooled"
    q.db = shared
    q.add_event("ANNOTATION_CREATED", 7, None, "x")
    q.add_event("ANNOTATION_CREATED", 8, None, "x")  # the sender is full in the shared queue now
    assert q.drain_spool() == {"event": 1, "task": 0, "dropped": 2} and q.spooled() == 0 and q.spool_dropped == 2
