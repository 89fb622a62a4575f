"""The ``--device`` option, shared by every stage that runs a model."""

from __future__ import annotations

import os
import re

import torch

from llm_features.errors import UserError

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?|mps)$")


def resolve_device(device: str, option: str = "--device") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (cuda when available) as a torch device;
    a device this machine does not have is a :class:`UserError` naming the option.

    Under ``torchrun`` (``LOCAL_RANK`` set), ``cuda`` without an index is this process's own GPU.
    """
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise UserError(f"{device!r} is not a device", option=option,
                        fix="Use cpu, cuda, cuda:N, mps or auto.")
    if device == "auto":
        return _local_rank_gpu(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{device} asked for, but this machine has no CUDA device", option=option,
                            fix="Use --device cpu (or auto).")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{device} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                            "device(s)", option=option)
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("mps asked for, but this machine has no MPS device", option=option,
                        fix="Use --device cpu (or auto).")
    return _local_rank_gpu(torch.device(device))


def _local_rank_gpu(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
