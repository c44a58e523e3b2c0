"""The machine a benchmark ran on, recorded in its results."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def _cpu_name() -> str:
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def machine() -> dict:
    """Platform, processor, its model name and cores, torch's thread count, python's and torch's
    versions and the device (a GPU's name or cpu)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
