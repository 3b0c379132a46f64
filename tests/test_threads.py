"""Threads that fit the box (backend/serving/threads.py): the cores a process may use, the environment
the launcher sets, and the governor that gives cores back to a busy neighbour (measured on a real
busy process; its effect on a click is benchmarks/contention.py's table)."""

import subprocess
import time

import pytest

from backend.config import valid_wait_policy
from backend_helpers import BUSY
from backend.serving.threads import CoreWatch, ThreadGovernor, ThreadPlan, _v2_quota, plan


def test_a_cgroup_quota_caps_the_cores_and_the_tightest_limit_wins(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    leaf = tmp_path / "system.slice" / "backend.scope"
    leaf.mkdir(parents=True)
    (tmp_path / "system.slice" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("300000 100000\n")
    import backend.serving.threads as t

    old = t.CGROUP
    t.CGROUP = tmp_path
    try:
        assert _v2_quota(leaf) == 1.5  # the parent's 1.5 cores bound the child's 3
        assert _v2_quota(tmp_path) is None  # "max": no quota
    finally:
        t.CGROUP = old
    assert plan(0, "adaptive", workers=2, cores=1.5).threads == 1  # never 0
    assert plan(0, "adaptive", workers=1, cores=7.9).threads == 7
    assert plan(3, "adaptive", workers=4, cores=2).threads == 3  # set by hand: kept


def test_the_launcher_sets_only_what_the_user_did_not():
    assert ThreadPlan(2, "passive").environment({}) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                                         "OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert ThreadPlan(2, "spin:500").environment({}) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                                          "GOMP_SPINCOUNT": "500"}
    assert ThreadPlan(2, "adaptive").environment({}) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    # the user's own OpenMP settings win over ours
    assert ThreadPlan(2, "passive").environment({"OMP_NUM_THREADS": "8", "GOMP_SPINCOUNT": "1"}) == {"MKL_NUM_THREADS": "2"}
    assert all(valid_wait_policy(v) for v in ("adaptive", "passive", "active", "spin:0", "spin:300000"))
    assert not any(valid_wait_policy(v) for v in ("spin:", "spin:-1", "spin:²", "fast", ""))


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux only")
def test_the_governor_gives_a_thread_back_while_a_neighbour_is_busy_and_takes_it_again():
    import os

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("needs 2 cores")
    hogs = [subprocess.Popen(BUSY) for _ in range(cores - 1)]
    try:
        g = ThreadGovernor(max_threads=cores, cores=cores, watch=CoreWatch())
        time.sleep(1.0)
        g.update()
        assert g.others >= cores - 1.6 and g.target <= max(1, cores - 1), g.health()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    time.sleep(1.0)
    g.update()  # nobody else busy: every thread again
    assert g.others < 0.6 and g.target == cores, g.health()
    import torch

    before = torch.get_num_threads()
    try:
        g.target = 1
        g.apply()  # on this (the calling) thread, as the model's thread does before each step
        assert torch.get_num_threads() == 1 and g.changes == 1
    finally:
        torch.set_num_threads(before)


def test_a_container_quota_is_kept_however_busy_the_rest_of_the_host_is():
    """A container limited to 2 cores, its affinity the host's 16 CPUs, 6 of them busy elsewhere:
    its 2 cores are still there (the formula, with a stand-in for /proc: this machine has 2 CPUs)."""
    class Host:
        cpus = set(range(16))

        def __init__(self, busy):
            self.busy = busy

        def others(self):
            return self.busy

    g = ThreadGovernor(max_threads=2, cores=2.0, watch=Host(6.0))
    g.update()
    assert g.target == 2
    g = ThreadGovernor(max_threads=2, cores=2.0, watch=Host(15.0))  # the host is full: step aside
    g.update()
    assert g.target == 1
