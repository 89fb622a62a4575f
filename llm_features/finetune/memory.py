"""Peak memory of the training loop, apart from what the process already held before it.

A process's peak RSS (``ru_maxrss``) also counts its fixed cost: torch and its kernels, the
backbone, the frozen tables, the tokenizer, whatever loading the workspace left behind. That part
is about the same whatever the training mode, so it compresses every memory ratio between modes.
:class:`TrainingMemory` reports the part training adds:

* ``rss_before_train_mb``: the resident set just before the first training step, after the
  model, data, packer and optimizer are built (after ``gc.collect()`` and ``malloc_trim(0)``,
  so memory that loading freed is not counted as held);
* ``train_peak_rss_mb``: the highest resident set while training steps run (evaluation between
  epochs is excluded). On Linux the kernel's own high-water mark (``VmHWM``) is reset with
  ``/proc/self/clear_refs`` at the start of each training phase, so the peak is exact, not sampled;
* ``train_rss_increase_mb = train_peak_rss_mb - rss_before_train_mb``: activations, gradients,
  optimizer state and batch tensors of the training steps.

On CUDA the same increase is read from the allocator (``max_memory_allocated`` minus
``memory_allocated`` at the start).

Resetting ``VmHWM`` also resets what ``getrusage`` reports as the process's peak, so the
whole-process peak is kept here too (:meth:`TrainingMemory.process_peak_mb`).

It is opt-in (``FinetuneConfig.measure_memory``, set by ``bench/bench_finetune.py`` and
``bench/bench_cost.py``): other runs use :class:`ProcessPeakMemory`, which only reads counters.

Example::

    mem = TrainingMemory(device)
    mem.start()
    ...                          # training steps
    mem.pause(); evaluate(...); mem.resume()
    mem.stop()
    metrics.update(mem.metrics())
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (None where ``/proc`` is not available)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process over its whole life, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_high_water_mark() -> bool:
    """Reset the kernel's ``VmHWM`` of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class TrainingMemory:
    """Peak memory of the training steps, as an increase over the memory held before them.

    Args:
        device: the training device; on CUDA the allocator's statistics are also read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_before: float | None = None
        self.peak: float | None = None
        self.exact = False
        self.cuda_before: float | None = None
        self._running = False
        self._process_peak = 0.0

    def _reset(self) -> bool:
        self._process_peak = max(self._process_peak, peak_rss_mb())
        return _reset_high_water_mark()

    def process_peak_mb(self) -> float:
        """Peak RSS of the whole process so far (loading and evaluation included)."""
        return max(self._process_peak, peak_rss_mb())

    def start(self) -> None:
        """Call just before the first training step."""
        _release_free_memory()
        self.rss_before = current_rss_mb()
        self.exact = self.rss_before is not None and self._reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_before = torch.cuda.memory_allocated(self.device) / 2**20
        self._running = True

    def pause(self) -> None:
        """Fold the peak so far into the result (call before evaluating between epochs)."""
        if not self._running:
            return
        hwm = _status_kib("VmHWM") if self.exact else None
        # Without a resettable high-water mark, the process peak is an upper bound of the training peak.
        peak = hwm / 1024.0 if hwm is not None else peak_rss_mb()
        self.peak = peak if self.peak is None else max(self.peak, peak)
        self._running = False

    def resume(self) -> None:
        """Measure again from here (after an evaluation)."""
        if self._running:
            return
        if self.exact:
            self._reset()
        self._running = True

    stop = pause

    def metrics(self) -> dict[str, float | str | None]:
        """``rss_before_train_mb``, ``train_peak_rss_mb``, ``train_rss_increase_mb`` (and CUDA counterparts)."""
        self.pause()
        increase = None if self.peak is None or self.rss_before is None else self.peak - self.rss_before
        out: dict[str, float | str | None] = {
            "rss_before_train_mb": self.rss_before,
            "train_peak_rss_mb": self.peak,
            "train_rss_increase_mb": increase,
            "train_memory_method": "VmHWM reset at the start of training" if self.exact
            else "process peak RSS (upper bound: includes loading)",
        }
        if self.device.type == "cuda":
            out["cuda_before_train_mb"] = self.cuda_before
            out["train_cuda_increase_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20 - (
                self.cuda_before or 0.0)
        return out


class ProcessPeakMemory:
    """What every run reports without ``--measure-memory``: the process's peak RSS (and, on CUDA, the
    allocator's peak over the training steps), with none of :class:`TrainingMemory`'s intrusions
    (``gc.collect``, ``malloc_trim``, ``/proc/self/clear_refs``). The same interface, no metrics of its own.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":  # so that peak_cuda_mb is the training peak, as with TrainingMemory
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def pause(self) -> None:
        pass

    resume = stop = pause

    def process_peak_mb(self) -> float:
        return peak_rss_mb()

    def metrics(self) -> dict[str, float | str | None]:
        return {}


__all__ = ["ProcessPeakMemory", "TrainingMemory", "current_rss_mb", "peak_rss_mb"]
