"""The machine a benchmark ran on, recorded in its results."""

from __future__ import annotations

import platform

import torch


def machine() -> dict:
    """Platform, processor, torch's thread count, torch's version and the device (a GPU's name or cpu)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
