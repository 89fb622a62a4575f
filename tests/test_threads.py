"""Default torch threads (llm_features.threads): the free cores, at least one; an explicit count wins."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch

from llm_features import threads

STAT = """cpu  900 0 300 5000 100 0 0 0 0 0
cpu0 {u0} 0 {s0} {i0} 0 0 0 {st0} 0 0
cpu1 {u1} 0 {s1} {i1} 10 0 0 0 0 0
intr 1 2 3
"""


@pytest.fixture(autouse=True)
def _keep_torch_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cpu_times_count_steal_as_busy_and_idle_iowait_as_free():
    text = STAT.format(u0=100, s0=50, i0=800, st0=30, u1=10, s1=5, i1=900)
    busy, total = threads._cpu_times({0, 1}, text)
    assert busy == (100 + 50 + 30) + (10 + 5)
    assert total == (100 + 50 + 800 + 30) + (10 + 5 + 900 + 10)
    assert threads._cpu_times({1}, text) == (15, 925)  # only the allowed CPUs
    assert threads._cpu_times({7}, text) is None


def test_busy_cores_leaves_out_this_process(monkeypatch):
    # over the sample: both CPUs lived 100 jiffies; 150 of them busy, 60 of those this process's own
    samples = iter([(1000, 4000), (1150, 4200)])
    own = iter([500, 560])
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus, stat=None: next(samples))
    monkeypatch.setattr(threads, "_own_jiffies", lambda: next(own))
    assert threads.busy_cores({0, 1}, seconds=0) == pytest.approx(0.9)


@pytest.mark.parametrize("cores, busy, want", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.6, 1), (2, 2.0, 1),
                                               (2, 3.5, 1), (16, 3.2, 13), (1, 0.0, 1)])
def test_default_is_the_free_cores_at_least_one(monkeypatch, cores, busy, want):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda cpus=None, seconds=0.2: busy)
    choice = threads.default_threads()
    assert choice.threads == want and choice.cores == cores and choice.busy == busy
    assert f"{cores} cores, {busy:.1f} busy" in choice.describe()


def test_load_average_stands_in_without_proc_stat(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda cpus=None, seconds=0.2: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.7, 0.0, 0.0))
    choice = threads.default_threads()
    assert choice.threads == 1 and "load average" in choice.reason


def test_omp_num_threads_and_torchrun_local_processes(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setattr(threads, "busy_cores", lambda cpus=None, seconds=0.2: pytest.fail("not measured"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.default_threads().threads == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads().threads == 3


def test_quota_caps_the_affinity(monkeypatch):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: set(range(8)))
    monkeypatch.setattr(threads, "_quota_cores", lambda: 2.5)
    assert threads.available_cores() == 3
    monkeypatch.setattr(threads, "_quota_cores", lambda: None)
    assert threads.available_cores() == 8


def test_explicit_count_wins_and_the_choice_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda cpus=None, seconds=0.2: 1.0)
    with caplog.at_level(logging.INFO, logger="llm_features.threads"):
        assert threads.configure_threads(None) == 1 and torch.get_num_threads() == 1
        assert threads.configure_threads(3) == 3 and torch.get_num_threads() == 3  # more than the cores: as given
    assert "torch threads: 1 (2 cores, 1.0 busy with other work" in caplog.text
    assert "torch threads: 3 (given)" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_a_busy_loop_is_measured():
    """A real competitor: the cores it keeps busy show up (on a machine that had a core to spare)."""
    cpus = threads.allowed_cpus()
    target = min(cpus)
    before = threads.busy_cores({target}, seconds=0.3)
    proc = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {%d})\nwhile True: pass"
                             % target])
    try:
        time.sleep(0.5)
        during = threads.busy_cores({target}, seconds=0.5)
    finally:
        proc.kill()
        proc.wait()
    assert before is not None and during is not None
    assert during > 0.8, (before, during)  # its one CPU is (nearly) all busy, whoever else shares it
