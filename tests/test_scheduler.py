"""The scheduler that owns the model: priorities, batches, deadlines, errors (in-process, SAM 2.1
tiny with random weights; the HTTP side is in test_backend.py)."""

import threading
import time

import numpy as np
import pytest

from backend.errors import Busy, QueueFull
from backend.web.app import error_answer
from backend.serving.scheduler import INTERACTIVE, PRELABEL, Scheduler, scheduler_rows
from smartsam.agent import SmartSAMAgent
from smartsam.clickers import NextChainClicker


@pytest.fixture
def agent(sam2_backbone):
    return SmartSAMAgent(sam2_backbone, clicker=NextChainClicker(chain_length=2), dedupe_iou=None)


def _images(grabcut_image, n):
    return [np.ascontiguousarray(np.roll(grabcut_image, 7 * k, axis=1)) for k in range(n)]


@pytest.mark.slow  # model work over many rows: make test, not the inner loop
def test_a_click_waits_for_at_most_one_step_of_prelabeling_and_never_shares_one(agent, grabcut_image):
    """A queue of pre-labeling jobs runs; a click arrives: it is in the very next step, and no step
    that advances it advances pre-labeling (a CPU's fill_rows is 0); the click is answered before
    the queue is done, with the answer it gets alone."""
    bb = agent.backbone
    imgs = _images(grabcut_image, 4)  # 3 queued (6 took 94 s on 2 cores and showed nothing more), 1 clicked
    for im in imgs:
        bb.embed(im)
    sched = Scheduler(bb, **scheduler_rows(0, "cpu"))
    steps = []
    step = sched.batch.step

    def spy(jobs=None):
        steps.append([sched._owner[id(j)].priority for j in jobs])
        return step(jobs)

    sched.batch.step = spy
    try:
        done = {}
        bg = [agent.job(imgs[k], (150 + 10 * k, 120)) for k in range(3)]
        t = threading.Thread(target=lambda: done.update(pre=sched.run(bg, PRELABEL)))
        t.start()
        while len(steps) < 2:
            time.sleep(0.01)
        click = agent.job(imgs[3], (200, 150))
        n0 = len(steps)
        got = sched.run([click], INTERACTIVE)[0]
        n1 = len(steps)
        t.join(300)
        assert len(done["pre"]) == 3
        mine = [k for k in range(n0, n1 + 1) if k < len(steps) and INTERACTIVE in steps[k]]
        assert mine[0] <= n0 + 1  # at most the step in progress, then the click's
        assert all(steps[k] == [INTERACTIVE] for k in mine)  # pre-labeling never rode along
        assert any(PRELABEL in s for s in steps[mine[-1] + 1:])  # the queue was not done before it
        alone = agent.run_jobs([agent.job(imgs[3], (200, 150))])[0]
        assert np.array_equal(got.mask, alone.mask) and got.score == alone.score
        h = sched.health()
        assert h["jobs_done"] == 4 and h["batch_jobs"]["n"] == len(steps) and h["waits_s"]["interactive"]["n"] == 1
    finally:
        sched.close()


@pytest.mark.slow  # model work over many rows: make test, not the inner loop
def test_clicks_sent_together_run_in_lockstep(agent, grabcut_image):
    """8 clicks submitted at once (8 threads) share every step: the decoder calls of one click."""
    bb = agent.backbone
    imgs = _images(grabcut_image, 8)
    for im in imgs:
        bb.embed(im)
    sched = Scheduler(bb, **scheduler_rows(0, "cpu"))
    try:
        out, d0 = [], bb.decoder_calls
        ths = [threading.Thread(target=lambda k=k: out.append(sched.run([agent.job(imgs[k], (180, 140))])[0]))
               for k in range(8)]
        [t.start() for t in ths]
        [t.join(300) for t in ths]
        assert len(out) == 8
        assert bb.decoder_calls - d0 <= 2 * (1 + agent.clicker.chain_length) + 2  # one click's calls (+ a straggler's)
        assert sched.health()["batch_jobs"]["max"] == 8
    finally:
        sched.close()


def test_a_click_the_queue_would_keep_past_its_deadline_is_refused_at_once(agent, grabcut_image):
    """Once the pace is measured: a click whose deadline the work queued ahead would pass gets
    QueueFull (503 with the expected wait) without waiting, while the same click with time enough
    is queued and answered; pre-labeling is never refused, it waits; waiting past a deadline is
    Busy; a failing call hands its exception to its caller and the thread goes on."""
    bb = agent.backbone
    bb.embed(grabcut_image)
    sched = Scheduler(bb, **scheduler_rows(0, "cpu"))
    try:
        sched.run([agent.job(grabcut_image, (100, 100))])  # measures the pace
        assert sched.row_seconds > 0 and sched.finish_seconds > 0
        gate = threading.Event()
        blocker = threading.Thread(target=lambda: sched.call(gate.wait, INTERACTIVE))
        blocker.start()
        time.sleep(0.1)
        queued = [threading.Thread(target=lambda k=k: sched.run([agent.job(grabcut_image, (110 + k, 100))]))
                  for k in range(3)]
        [t.start() for t in queued]
        while sched.health()["queued"]["interactive"] < 3:
            time.sleep(0.01)
        ahead = sched.expected_wait(INTERACTIVE)
        assert ahead > 0.5
        t = time.monotonic()
        with pytest.raises(QueueFull) as e:
            sched.run([agent.job(grabcut_image, (120, 100))], INTERACTIVE, deadline=time.monotonic() + ahead / 2)
        assert time.monotonic() - t < 0.5 and e.value.expected_wait == pytest.approx(ahead, rel=0.5)
        status, answer, _, headers = error_answer(e.value)  # the web layer's one mapping
        assert status == 503 and answer["expected_wait_s"] > 0 and dict(headers)["Retry-After"]
        assert sched.health()["refused"] == 1
        with pytest.raises(Busy):  # pre-labeling waits instead, up to its deadline
            sched.call(lambda: 1, PRELABEL, deadline=time.monotonic() + 0.3)
        late = []
        waiter = threading.Thread(target=lambda: late.append(sched.run([agent.job(grabcut_image, (130, 100))], INTERACTIVE,
                                                                       deadline=time.monotonic() + 10 * ahead + 60)))
        waiter.start()
        gate.set()
        blocker.join(30)
        [t.join(300) for t in queued]
        waiter.join(300)
        assert len(late) == 1 and sched.health()["refused"] == 1
        with pytest.raises(ZeroDivisionError):
            sched.call(lambda: 1 / 0)
        assert sched.call(lambda: 41 + 1) == 42
    finally:
        sched.close()


def test_a_click_that_arrives_during_prefetch_waits_for_no_queued_prefetch(agent, grabcut_image):
    """Prefetch encodings (the next tasks' images, backend/serving/prefetch.py) are queued at PREFETCH; a
    click arrives while one runs: every step of the click runs before any prefetch still queued
    starts (it waited at most for the encoding in progress); the prefetch queue then finishes."""
    from backend.serving.scheduler import PREFETCH

    bb = agent.backbone
    imgs = _images(grabcut_image, 5)
    bb.embed(imgs[0])  # the annotator's current image
    sched = Scheduler(bb, **scheduler_rows(0, "cpu"))
    order, lock = [], threading.Lock()  # written on the model's thread, in the order things ran
    step = sched.batch.step

    def spy(jobs=None):
        with lock:
            order.append(("step", None))
        return step(jobs)

    sched.batch.step = spy

    def encode(k):
        def fn():
            with lock:
                first = not order
                order.append(("start", k))
            if first:  # the click arrives while this one runs (whatever the machine's speed)
                t = time.monotonic()
                while not sched.health()["queued"]["interactive"] and time.monotonic() - t < 60:
                    time.sleep(0.005)
            bb.embed(imgs[k])
        return fn

    threads = [threading.Thread(target=lambda k=k: sched.call(encode(k), PREFETCH)) for k in range(1, 5)]
    for t in threads:
        t.start()
    while not order:
        time.sleep(0.005)
    got = sched.run([agent.job(imgs[0], (200, 150))], INTERACTIVE)[0]
    for t in threads:
        t.join(300)
    kinds = [what for what, _ in order]
    starts = [i for i, w in enumerate(kinds) if w == "start"]
    assert len(starts) == 4 and kinds.count("step") >= 2
    assert starts[0] == 0 and max(i for i, w in enumerate(kinds) if w == "step") < starts[1]
    assert got.mask.shape == imgs[0].shape[:2] and sched.health()["queued"]["prefetch"] == 0
