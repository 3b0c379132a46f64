"""The durable work queue (backend/work_queue.py) on its own: rows outlive their process, and a
starting process takes over only the rows of processes that are gone (the end-to-end SIGKILL
tests are in test_label_studio.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADD = """
import sys, time
from backend.work_queue import WorkQueue
q = WorkQueue(sys.argv[1])
q.add_tasks("7", [{"id": int(sys.argv[2]), "data": {"image": "x"}}], "<View/>")
q.add_event("ANNOTATION_CREATED", int(sys.argv[2]), None)
print("added", flush=True)
if sys.argv[3] == "stay":
    time.sleep(120)
"""


def _writer(db: Path, task: int, stay: bool) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", ADD, str(db), str(task), "stay" if stay else "go"], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "added"
    return p


def test_rows_of_a_gone_process_are_taken_over_and_a_running_ones_are_not(tmp_path):
    from backend.work_queue import WorkQueue

    db = tmp_path / "jobs.db"
    gone = _writer(db, 1, stay=False)
    gone.wait(30)
    alive = _writer(db, 2, stay=True)
    try:
        q = WorkQueue(db)
        assert q.tasks() == [] and q.events() == []  # nothing is this process's yet
        assert q.take_over() == 2  # the gone process's task and event
        assert [(p, t["id"]) for p, t, _ in q.tasks()] == [("7", 1)]
        assert [(a, ann) for _, a, ann, _ in q.events()] == [("ANNOTATION_CREATED", 1)]
        # a task queued twice is queued once
        assert q.add_tasks("7", [{"id": 1}, {"id": 3}], "<View/>") == [{"id": 3}]
        q.task_done("7", 1)
        q.event_done(q.events()[0][0])
        assert [t["id"] for _, t, _ in q.tasks()] == [3] and q.events() == []
    finally:
        alive.kill()
        alive.wait(30)
    assert WorkQueue(db).take_over() == 2  # now the other one is gone too
