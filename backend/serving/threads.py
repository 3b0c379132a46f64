"""Threads that fit the box: how many compute threads a worker process runs, and how they wait.

PyTorch (through OpenMP) and OpenCV each start a pool of compute threads sized by the machine's
cores, and OpenMP's threads spin while they wait for each other. On a box shared with Label
Studio, another replica or anything busy, one of those threads is descheduled and the others
spin against it: a click that took 2.6 s alone took 52 s beside one busy process on 2 cores
(``benchmarks/contention.py``). So:

- threads per worker = the cores this process may use (its CPU affinity and its cgroup's CPU
  quota, not the host's count) divided by the gunicorn workers, at least 1
  (``SMARTSAM_TORCH_THREADS`` sets it);
- ``SMARTSAM_WAIT_POLICY=adaptive`` (the default): OpenMP spins as it does by default while the
  cores are this process's, and the model's thread runs with fewer threads while other processes
  use them (:class:`ThreadGovernor`); ``passive`` (threads sleep while they wait), ``spin:<n>``
  (GNU OpenMP spins that often, then sleeps) and ``active`` fix the policy instead (their costs
  are in docs/results.md).

The launcher puts the variables in the environment before gunicorn starts (OpenMP reads them
once, when it loads), each worker applies the thread count to torch and OpenCV after it forks.
Variables the user set (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``...) are left
as they are.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> Optional[float]:
    """The CPU quota of this process's cgroup in cores (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``); None when there is none."""
    try:
        rel = ""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hier, _, path = line.split(":", 2)
            if hier == "0":  # v2: the unified hierarchy
                rel = path.lstrip("/")
        quota = _v2_quota(root / rel) if rel else None
        if quota is None:
            quota = _v2_quota(root)
        if quota is not None:
            return quota
    except OSError:
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def _v2_quota(d: Path) -> Optional[float]:
    # the tightest limit on the way up to the root
    best = None
    while True:
        try:
            quota, period = (d / "cpu.max").read_text().split()
            if quota != "max":
                q = int(quota) / int(period)
                best = q if best is None else min(best, q)
        except (OSError, ValueError):
            pass
        if d == d.parent or d == CGROUP:
            return best
        d = d.parent


def usable_cores() -> float:
    """The cores this process may run on: its affinity, capped by its cgroup's quota."""
    try:
        n: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return min(n, quota) if quota else n


@dataclass(frozen=True)
class ThreadPlan:
    """Compute threads per worker process and OpenMP's wait policy."""

    threads: int
    wait_policy: str  # "passive", "active" or "spin:<count>"

    def environment(self, environ: Mapping[str, str]) -> Dict[str, str]:
        """The variables to add to ``environ`` before the workers start (none the user set)."""
        want = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.wait_policy == "adaptive":
            pass  # OpenMP's own spin; the thread count follows the free cores (ThreadGovernor)
        elif self.wait_policy.startswith("spin:"):
            # GNU OpenMP: spin this many times, then sleep (its default, unset, is 300,000 spins)
            want["GOMP_SPINCOUNT"] = self.wait_policy.split(":", 1)[1]
        else:
            want["OMP_WAIT_POLICY"] = self.wait_policy.upper()
            if self.wait_policy == "passive":
                want["KMP_BLOCKTIME"] = "0"  # Intel's OpenMP (MKL builds): the same, its own way
        if any(environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
            want = {k: v for k, v in want.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
        return {k: v for k, v in want.items() if not environ.get(k)}


class CoreWatch:
    """How much of this process's cores other processes used since the last look: busy time of
    the CPUs in its affinity (``/proc/stat``) less its own CPU time (``/proc/self/stat``)."""

    def __init__(self) -> None:
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = set(range(os.cpu_count() or 1))
        self.hz = os.sysconf("SC_CLK_TCK")
        self._last = self._read()

    def _read(self):
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                    v = [int(x) for x in fields[:8]]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return time.monotonic(), busy, int(own[11]) + int(own[12])  # utime + stime

    def others(self) -> float:
        """Cores' worth of time other processes used on this process's CPUs since the last call."""
        t0, busy0, own0 = self._last
        self._last = t1, busy1, own1 = self._read()
        if t1 - t0 <= 0:
            return 0.0
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / self.hz / (t1 - t0))


class ThreadGovernor:
    """Compute threads that follow the free cores (``SMARTSAM_WAIT_POLICY=adaptive``, the default).

    OpenMP's threads spin while they wait for each other: on cores of their own that is the
    fastest way to wait, beside a busy process it is 14-20x slower (one thread is descheduled and
    its sibling spins through the time slices). A short spin or a passive wait fixes the second
    but costs about 20 % alone (measured: docs/results.md). So the spin stays as OpenMP has it,
    and the thread count follows what other processes leave free: every second
    (:meth:`update`, the monitor) the governor looks at how much of this process's cores others
    used, and the model's thread runs the next step with that many threads fewer (:meth:`apply`;
    one thread has no team to spin for). Rounding favours fewer threads: a quarter of a core
    taken by others already costs a thread.

    Args:
        max_threads: the plan's threads (all of them when nobody else is busy).
        cores: the cores this process may use.
    """

    def __init__(self, max_threads: int, cores: float, watch: Optional[CoreWatch] = None) -> None:
        self.max_threads = max(1, int(max_threads))
        self.cores = float(cores)
        self.watch = watch or CoreWatch()
        self.target = self.max_threads
        self.others = 0.0
        self.changes = 0

    def update(self) -> None:
        # what others leave of the CPUs this process may run on, within its own quota (a container
        # limited to 2 cores on a busy 16-core host still has its 2)
        self.others = self.watch.others()
        free = min(self.cores, len(self.watch.cpus) - self.others)
        self.target = max(1, min(self.max_threads, math.floor(free + 0.25)))

    def run(self, every_s: float = 1.0) -> None:
        """Update every ``every_s`` seconds, for ever (its own thread: nothing else may delay it)."""
        while True:
            try:
                self.update()
            except Exception:  # /proc unreadable: keep the last target
                pass
            time.sleep(every_s)

    def apply(self) -> None:
        """On the model's thread: its OpenMP thread count for the next step."""
        import torch

        if torch.get_num_threads() != self.target:
            torch.set_num_threads(self.target)
            self.changes += 1

    def health(self) -> Dict[str, object]:
        return {"threads": self.target, "max": self.max_threads, "others_cores": round(self.others, 2),
                "changes": self.changes}


def plan(threads: int, wait_policy: str, workers: int, cores: Optional[float] = None) -> ThreadPlan:
    """``threads`` (0: the usable cores shared out among ``workers``) and the wait policy."""
    if threads <= 0:
        cores = usable_cores() if cores is None else cores
        threads = max(1, math.floor(cores / max(1, workers)))
    return ThreadPlan(int(threads), wait_policy)


def apply_in_worker(threads: int) -> None:
    """Set torch's and OpenCV's compute threads in this (forked) worker."""
    import torch

    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
