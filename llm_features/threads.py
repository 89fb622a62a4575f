"""Default torch intra-op threads: the cores this process may use that other work is not using now.

torch's own default is every core, and its OpenMP threads wait for one another at the end of each
parallel region: when another process holds one of those cores, every region waits for the thread
that shares it. On a shared 2-core machine ``llmfeat finetune`` ran 5 to 20 times slower on two
threads than on one (``bench/bench_threads.py``, ``bench/results/threads.md``).
So every CPU-heavy command (encode, finetune, embed-users, ranker train and evaluate) starts with
:func:`configure_threads`:

- an explicit ``--num-threads`` / ``--threads`` (or ``$OMP_NUM_THREADS``) is used as given;
- otherwise the cores this process may use (``sched_getaffinity``, capped by a cgroup CPU quota)
  minus the cores other processes keep busy, measured over 0.2 s from ``/proc/stat`` (this process's
  own CPU time left out), rounded, and at least 1. Without ``/proc/stat`` the 1-minute load average
  stands in. Under torchrun the local processes split the cores evenly instead (they would count
  one another as busy).

The choice is logged (``torch threads: ...``), so a slow run on a busy machine says why.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.2


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: int
    """Cores this process may use (affinity, cgroup quota)."""
    busy: float | None
    """Cores other processes kept busy while it was measured (None: not measured)."""
    reason: str

    def describe(self) -> str:
        return f"torch threads: {self.threads} ({self.reason})"


def _quota_cores() -> float | None:
    """The cgroup CPU quota in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def allowed_cpus() -> set[int]:
    """The CPU ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def available_cores() -> int:
    """Cores this process may use: its affinity set, capped by a cgroup CPU quota."""
    n = len(allowed_cpus())
    quota = _quota_cores()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _cpu_times(cpus: set[int], stat: str | None = None) -> tuple[int, int] | None:
    """(busy, total) jiffies of ``cpus`` from /proc/stat (or its text ``stat``); steal counts as busy
    (another guest has the core), idle and iowait do not."""
    try:
        lines = (Path("/proc/stat").read_text() if stat is None else stat).splitlines()
    except OSError:
        return None
    busy = total = 0
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in rest.split()]
        t = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
        busy += t - v[3] - v[4]
        total += t
        seen += 1
    return (busy, total) if seen else None


def _own_jiffies() -> int | None:
    """CPU time of this process (every thread), in clock ticks."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def busy_cores(cpus: set[int] | None = None, seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of ``cpus`` other processes keep busy, measured over ``seconds`` (None: unknown)."""
    cpus = allowed_cpus() if cpus is None else cpus
    a, own_a = _cpu_times(cpus), _own_jiffies()
    if a is None or own_a is None:
        return None
    time.sleep(seconds)
    b, own_b = _cpu_times(cpus), _own_jiffies()
    if b is None or own_b is None or b[1] <= a[1]:
        return None
    per_cpu = (b[1] - a[1]) / len(cpus)  # jiffies each CPU lived through
    # own time may run on CPUs outside the set's sample only if affinity changed; clamp at 0
    return max(0.0, (b[0] - a[0] - (own_b - own_a)) / per_cpu)


def default_threads(seconds: float = SAMPLE_SECONDS) -> ThreadChoice:
    """The thread count for a command that was not given one (see the module doc)."""
    cores = available_cores()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), cores, None, "$OMP_NUM_THREADS")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        return ThreadChoice(max(1, cores // local), cores, None,
                            f"{cores} cores shared by {local} local processes")
    busy = busy_cores(seconds=seconds)
    how = "busy"
    if busy is None and hasattr(os, "getloadavg"):
        busy, how = os.getloadavg()[0], "load average"
    if busy is None:
        return ThreadChoice(cores, cores, None, f"{cores} cores")
    n = max(1, min(cores, cores - round(busy)))
    return ThreadChoice(n, cores, busy, f"{cores} cores, {busy:.1f} {how} with other work; "
                                        "--num-threads/--threads to choose")


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``num_threads`` if given, else :func:`default_threads` (logged)."""
    import torch

    if num_threads:
        n = int(num_threads)
        log.info("torch threads: %d (given)", n)
    else:
        choice = default_threads()
        n = choice.threads
        log.info(choice.describe())
    torch.set_num_threads(n)
    return n
