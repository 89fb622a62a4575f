"""Run a benchmark step as a child process and sample its peak RSS (the whole process tree)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


@dataclass
class ChildRun:
    returncode: int | None
    seconds: float
    peak_rss_mb: float
    killed_at_cap: bool
    output_tail: str


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = open(f"/proc/{p}/task/{p}/children").read().split()
        except OSError:
            kids = []
        todo += [int(k) for k in kids]
    return out


def _rss_bytes(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            total += int(open(f"/proc/{p}/statm").read().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total * os.sysconf("SC_PAGE_SIZE")


def run_sampled(cmd: list[str], *, cap_gb: float, env: dict | None = None, log_path=None,
                timeout_s: float | None = None, every_s: float = 0.2) -> ChildRun:
    """Run ``cmd``; kill it (and report so) when its tree's RSS passes ``cap_gb`` or it runs past ``timeout_s``."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    peak, killed = 0, False
    while proc.poll() is None:
        rss = _rss_bytes(proc.pid)
        peak = max(peak, rss)
        if rss > cap_gb * 2**30 or (timeout_s is not None and time.perf_counter() - t0 > timeout_s):
            os.killpg(proc.pid, 9)
            killed = rss > cap_gb * 2**30
            break
        time.sleep(every_s)
    proc.wait()
    seconds = time.perf_counter() - t0
    if log_path:
        log.close()
    tail = open(log_path).read()[-2000:] if log_path else ""
    return ChildRun(proc.returncode, seconds, round(peak / 2**20, 1), killed, tail)
