"""One thread owns the model: requests submit work and wait for it within their deadline.

Work is of two kinds: agent *jobs* (:class:`smartsam.batch.Job`: a click), advanced in lockstep by
one :class:`smartsam.batch.BatchEngine`, and *calls* (anything else that needs the model: a box or
a plain SAM click, a refinement, a reference's features, instance proposals, an encoding), run
whole between two steps. Every piece of work has a priority::

    INTERACTIVE (0)  an annotator waits: clicks, boxes, "all like this", references from the admin
    PRELABEL    (1)  pre-labeling (Retrieve predictions, the background queue, Ray workers)
    PREFETCH    (2)  work nobody waits for yet

The thread always does the most urgent thing next: a call of a priority at least as urgent as
every live job runs before the next step; a step advances the most urgent jobs first, up to
``max_rows`` decoder rows, and jobs of a lower priority join a step with interactive jobs only up
to ``fill_rows`` (so a click waits behind at most one step of pre-labeling, never a whole task).
A request never holds a lock: it waits on its own event, up to its deadline. An annotator's
work that the queue ahead of it would keep waiting past its deadline, at the measured pace, is
refused at once (:class:`QueueFull`, 503 with the expected wait) instead of being queued to time
out; background work just waits (up to its deadline).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence

from backend.errors import Busy, QueueFull
from smartsam.batch import BatchEngine, Job, StepReport

log = logging.getLogger("smartsam.scheduler")

INTERACTIVE, PRELABEL, PREFETCH = 0, 1, 2
PRIORITY_NAMES = {INTERACTIVE: "interactive", PRELABEL: "prelabel", PREFETCH: "prefetch"}


@dataclass(eq=False)
class _Work:
    priority: int
    seq: int
    deadline: Optional[float]
    fn: Optional[Callable[[], object]] = None
    jobs: List[Job] = field(default_factory=list)
    results: Dict[int, object] = field(default_factory=dict)
    result: object = None
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    started: Optional[float] = None


def _ewma(old: Optional[float], new: float, alpha: float = 0.2) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class Scheduler:
    """The model's one thread.

    Args:
        backbone: the loaded backbone every job's agent runs on.
        max_rows: decoder rows per step, at most (a job is never split: a step takes at least
            one job). On a CPU a row costs the same in any batch (the decoder runs in chunks of
            2 there), so this mostly bounds how long one step keeps a new click waiting; on a GPU
            rows of one call run side by side.
        fill_rows: rows that jobs of a lower priority may add to a step that advances interactive
            jobs. 0 on a CPU, where every row lengthens the click's step; on a GPU a batch costs
            about the same up to hundreds of rows, so pre-labeling fills what the clicks leave.
        background_rows: rows per step when only background jobs run (bounds how long a click
            that arrives waits for the step in progress).
        gather_s: when jobs arrive at an idle model, wait this long for more before the first
            step, so clicks sent together start together (and share every decoder call after).
        name: the thread's name.
        before_work: called on the model's thread before each step or call (the compute-thread
            governor, :mod:`backend.serving.threads`: OpenMP's thread count belongs to the calling thread).
    """

    def __init__(self, backbone, max_rows: int = 128, fill_rows: int = 0, background_rows: int = 32,
                 gather_s: float = 0.02, name: str = "smartsam-model",
                 before_work: Optional[Callable[[], None]] = None) -> None:
        if max_rows < 1 or fill_rows < 0 or background_rows < 1:
            raise ValueError("max_rows and background_rows must be >= 1, fill_rows >= 0")
        self.batch = BatchEngine(backbone)
        self.max_rows, self.fill_rows, self.background_rows = int(max_rows), int(fill_rows), int(background_rows)
        self.gather_s = float(gather_s)
        self.before_work = before_work
        self._cond = threading.Condition()
        self._calls: List[_Work] = []
        self._pending_jobs: List[_Work] = []  # submitted, jobs not yet in the engine
        self._owner: Dict[int, _Work] = {}  # id(job) -> its work, for jobs in the engine
        self._seq = itertools.count()
        self._stop = False
        # measured pace, for the expected wait: a decoder row, a job's finish (selection,
        # upsampling), an encoding, a call
        self.row_seconds: Optional[float] = None
        self.finish_seconds: Optional[float] = None
        self.encode_seconds: Optional[float] = None
        self.call_seconds: Optional[float] = None
        # counters for /health
        self.steps = 0
        self.rows = 0
        self.jobs_done = 0
        self.calls_done = 0
        self.refused = 0
        self.last_batch_rows: Deque[int] = deque(maxlen=64)
        self.last_batch_jobs: Deque[int] = deque(maxlen=64)
        self.waits: Dict[int, Deque[float]] = {p: deque(maxlen=256) for p in PRIORITY_NAMES}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- submitting ------------------------------------------------------------------------
    def call(self, fn: Callable[[], object], priority: int = INTERACTIVE, deadline: Optional[float] = None):
        """Run ``fn()`` on the model thread; its result (or its exception, raised here)."""
        if threading.current_thread() is self._thread:  # already there (work that submits work)
            return fn()
        w = _Work(priority, next(self._seq), deadline, fn=fn)
        self._admit(w)
        with self._cond:
            self._calls.append(w)
            self._cond.notify()
        return self._wait(w)

    def run(self, jobs: Sequence[Job], priority: int = INTERACTIVE, deadline: Optional[float] = None) -> List[object]:
        """Answer ``jobs`` (in lockstep with everything else live); their results in order. A
        job's own error is raised here (the first one)."""
        if not jobs:
            return []
        if threading.current_thread() is self._thread:
            return self._inline(jobs)
        w = _Work(priority, next(self._seq), deadline, jobs=list(jobs))
        self._admit(w)
        with self._cond:
            self._pending_jobs.append(w)
            self._cond.notify()
        self._wait(w)
        out = [w.results[id(j)] for j in w.jobs]
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return out

    def _inline(self, jobs: Sequence[Job]) -> List[object]:
        return BatchEngine(self.batch.backbone).run(jobs)

    def expected_wait(self, priority: int) -> float:
        """Seconds the queued and live work of this priority or a more urgent one should take at
        the measured pace (0 before anything was measured)."""
        with self._cond:
            queued = [j for w in self._pending_jobs if w.priority <= priority for j in w.jobs]
            live = [j for j in self.batch.jobs if self._owner[id(j)].priority <= priority]
            rows = sum(self.batch.rows_left(j) for j in queued + live)
            calls = sum(1 for w in self._calls if w.priority <= priority)
        return rows * (self.row_seconds or 0.0) + (len(queued) + len(live)) * (self.finish_seconds or 0.0) + \
            calls * (self.call_seconds or 0.0)

    def _admit(self, w: _Work) -> None:
        """An annotator's work is refused at once when the queue ahead outlasts its deadline."""
        if w.deadline is None or w.priority != INTERACTIVE:
            return
        left = w.deadline - time.monotonic()
        ahead = self.expected_wait(w.priority)
        if ahead > left:
            self.refused += 1
            raise QueueFull(f"the model is busy: the work queued ahead needs about {ahead:.0f} s, more than this "
                            f"request's {max(left, 0):.0f} s left (SMARTSAM_REQUEST_TIMEOUT); try again",
                            expected_wait=ahead)

    def _wait(self, w: _Work):
        timeout = None if w.deadline is None else max(0.0, w.deadline - time.monotonic())
        if not w.done.wait(timeout):
            with self._cond:
                if not w.done.is_set():
                    w.cancelled = True  # the thread drops it (not started) or lets it finish unread
                    self._cond.notify()
            if not w.done.is_set():
                raise Busy("the model stayed busy past this request's time limit (SMARTSAM_REQUEST_TIMEOUT); try again")
        if w.error is not None:
            raise w.error
        return w.result

    # -- the thread ------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not (self._calls or self._pending_jobs or self.batch.jobs):
                    self._cond.wait()
                if self._stop:
                    return
                self._drop_cancelled()
                if self._pending_jobs and not self.batch.jobs and self.gather_s > 0:
                    until = time.monotonic() + self.gather_s
                    while time.monotonic() < until and not self._stop:
                        self._cond.wait(until - time.monotonic())
                call = min(self._calls, key=lambda w: (w.priority, w.seq), default=None)
                for w in self._pending_jobs:  # admitted now, advanced by priority below
                    w.started = time.monotonic()
                    self.waits[w.priority].append(w.started - w.submitted)
                    for j in w.jobs:
                        self._owner[id(j)] = w
                        self.batch.add(j)
                self._pending_jobs.clear()
                live = sorted(self.batch.jobs, key=lambda j: (self._owner[id(j)].priority, self._owner[id(j)].seq))
                urgent = self._owner[id(live[0])].priority if live else None
                if call is not None and (urgent is None or call.priority <= urgent):
                    self._calls.remove(call)
                    call.started = time.monotonic()
                    self.waits[call.priority].append(call.started - call.submitted)
                else:
                    call = None
            try:
                if self.before_work is not None and (call is not None or live):
                    try:
                        self.before_work()
                    except Exception:  # never lose the work for it
                        log.exception("before_work failed")
                if call is not None:
                    self._run_call(call)
                elif live:
                    self._step(live)
            except Exception:  # the thread never dies: the work it was on gets the error
                log.exception("scheduler step failed")

    def _drop_cancelled(self) -> None:
        for w in [w for w in self._calls if w.cancelled]:
            self._calls.remove(w)
        self._pending_jobs[:] = [w for w in self._pending_jobs if not w.cancelled]
        for j in [j for j in self.batch.jobs if self._owner[id(j)].cancelled]:
            self.batch.discard(j)
            self._owner.pop(id(j), None)

    def _run_call(self, w: _Work) -> None:
        t = time.perf_counter()
        try:
            w.result = w.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            w.error = e
        self.call_seconds = _ewma(self.call_seconds, time.perf_counter() - t)
        self.calls_done += 1
        w.done.set()

    def _step(self, live: List[Job]) -> None:
        chosen, rows, background, interactive = [], 0, 0, False
        for j in live:  # most urgent first
            r = self.batch.rows(j)
            if self._owner[id(j)].priority == INTERACTIVE:
                if chosen and rows + r > self.max_rows:
                    continue
                interactive = True
            else:
                cap = min(self.fill_rows, self.max_rows - rows) if interactive else min(self.background_rows, self.max_rows)
                if background + r > cap and (chosen or interactive):
                    continue
                background += r
            chosen.append(j)
            rows += r
        try:
            report = self.batch.step(chosen)
        except Exception as e:  # the step itself failed (out of memory...): its jobs get the error
            log.exception("a batch step failed; its %d jobs get the error", len(chosen))
            for j in chosen:
                self.batch.discard(j)
            report = StepReport(jobs=len(chosen), finished=[(j, e) for j in chosen])
        if report.rows:
            self.row_seconds = _ewma(self.row_seconds, report.decode_seconds / report.rows)
        if report.encoded:
            self.encode_seconds = _ewma(self.encode_seconds, report.encode_seconds / report.encoded)
        if report.finished:
            self.finish_seconds = _ewma(self.finish_seconds, report.finish_seconds / len(report.finished))
        self.steps += 1
        self.rows += report.rows
        self.last_batch_rows.append(report.rows)
        self.last_batch_jobs.append(report.jobs)
        with self._cond:
            for job, result in report.finished:
                w = self._owner.pop(id(job), None)
                if w is None:
                    continue
                w.results[id(job)] = result
                self.jobs_done += 1
                if len(w.results) == len(w.jobs):
                    w.done.set()

    # -- /health ---------------------------------------------------------------------------
    def health(self) -> Dict:
        """Queue depth per priority, batch sizes, waits and the measured pace."""
        with self._cond:
            queued = {name: 0 for name in PRIORITY_NAMES.values()}
            for w in self._calls + self._pending_jobs:
                queued[PRIORITY_NAMES[w.priority]] += max(1, len(w.jobs))
            live = {name: 0 for name in PRIORITY_NAMES.values()}
            for j in self.batch.jobs:
                live[PRIORITY_NAMES[self._owner[id(j)].priority]] += 1
            rows, jobs = list(self.last_batch_rows), list(self.last_batch_jobs)
            waits = {PRIORITY_NAMES[p]: _percentiles(list(v)) for p, v in self.waits.items()}
        return {"queued": queued, "live_jobs": live, "steps": self.steps, "rows": self.rows,
                "jobs_done": self.jobs_done, "calls_done": self.calls_done, "refused": self.refused,
                "batch_rows": _percentiles(rows), "batch_jobs": _percentiles(jobs), "waits_s": waits,
                "pace_s": {k: None if v is None else round(v, 5) for k, v in
                           (("row", self.row_seconds), ("finish", self.finish_seconds), ("encode", self.encode_seconds),
                            ("call", self.call_seconds))},
                "max_rows": self.max_rows, "fill_rows": self.fill_rows, "background_rows": self.background_rows}


def scheduler_rows(batch_rows: int, device: str) -> Dict[str, int]:
    """The scheduler's row budgets for ``SMARTSAM_BATCH_ROWS`` (0: by device).

    CPU: 256 rows a step (eight agent clicks' chain steps: 8 clicks at once make a quarter of the
    decoder calls they make one after another, or fewer), none of them pre-labeling while a click runs
    (on a CPU a row costs the same in any batch, so each one would lengthen the click's step), and
    32 rows a step of pre-labeling alone (one chain step of one task: what a click arriving then
    waits for); clicks arriving within 50 ms of each other start together (2 % of a click there;
    8 requests sent at once through HTTP arrive over tens of milliseconds). CUDA: a step of up to 1024 rows, pre-labeling filling what the clicks leave (a
    batch of hundreds of prompts costs little more than one: facts measured on an H200), a 2 ms
    window to gather clicks."""
    if device == "cpu":
        rows = batch_rows or 256
        return {"max_rows": rows, "fill_rows": 0, "background_rows": min(32, rows), "gather_s": 0.05}
    rows = batch_rows or 1024
    return {"max_rows": rows, "fill_rows": rows, "background_rows": rows, "gather_s": 0.002}


def _percentiles(values: List[float]) -> Dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "p50": round(v[len(v) // 2], 4), "p95": round(v[min(len(v) - 1, int(0.95 * len(v)))], 4),
            "max": round(v[-1], 4)}
