"""The N x N check: one training step of a case at a long sequence, in a fresh process, its peak
memory against timm's fused Attention (SDPA), which never holds the (N, N) attention matrix.

Each case runs in its own process, forked from a server process that has imported torch and
this module but run nothing (multiprocessing's forkserver), so that peaks do not mix and no
case pays torch's import. :func:`check_memory` runs them one after the other from speed.py.

On the CPU an allocation over ``cap_mib`` is refused (RLIMIT_DATA, which on Linux bounds
private writable memory, where tensors live, set to the process's data size plus the cap just
before the step) and the case reported as ``over_cap``, so a case that materialises the
attention matrix fails at once instead of exhausting a shared machine. A short warm-up step
at 256 tokens first initialises the kernels' one-time state, outside the measured peak.
"""

from __future__ import annotations

import multiprocessing
import re
import resource
import sys
from pathlib import Path

import torch

from .measure import Clock, peak_memory, training_step
from .speed_cases import Shape, all_cases

WARMUP_TOKENS = 256


def _data_size() -> int:
    return int(re.search(r"VmData:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _cap(device: torch.device, cap_mib: int) -> None:
    if device.type == "cpu" and Path("/proc/self/status").exists():
        resource.setrlimit(resource.RLIMIT_DATA, (_data_size() + cap_mib * 2 ** 20,
                                                  resource.getrlimit(resource.RLIMIT_DATA)[1]))


def _over_cap(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or \
        "can't allocate memory" in str(error) or "out of memory" in str(error)


def measure_case(name: str, shape: Shape, device: torch.device, dtype: torch.dtype,
                 cap_mib: int) -> dict:
    """One training step of case ``name`` at ``shape`` after a short warm-up, under the cap."""
    case = all_cases(device)[name]
    module = case.build(shape).to(device=device, dtype=dtype)
    clock, memory = Clock(device), peak_memory(device)

    def step(tokens: int) -> dict:
        x = torch.randn(shape.batch, tokens, shape.dim, device=device, dtype=dtype,
                        requires_grad=True)
        grad = torch.randn_like(x)
        return training_step(lambda: module(x, is_causal=shape.causal), grad, clock, memory)

    step(min(WARMUP_TOKENS, shape.tokens))
    module.zero_grad(set_to_none=True)
    _cap(device, cap_mib)
    try:
        return {"case": name, **step(shape.tokens), "over_cap": False, "error": None}
    except Exception as error:  # reported, the parent carries on with the next case
        return {"case": name, "over_cap": _over_cap(error),
                "error": f"{type(error).__name__}: {str(error).strip()[:300]}"}


def _child(connection, name: str, shape: Shape, device: str, dtype: str, cap_mib: int,
           threads: int) -> None:
    torch.set_num_threads(threads)
    connection.send(measure_case(name, shape, torch.device(device), getattr(torch, dtype), cap_mib))


def _in_fresh_process(context, name: str, shape: Shape, device: torch.device, dtype: str,
                      cap_mib: int, threads: int, timeout_s: float) -> dict:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, name, shape, device.type, dtype,
                                                   cap_mib, threads))
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout_s):
            return receiver.recv()
        return {"case": name, "over_cap": False, "error": f"stopped after {timeout_s:.0f} s"}
    except EOFError:  # the process died without an answer
        process.join()
        return {"case": name, "over_cap": False, "error": f"exit code {process.exitcode}"}
    finally:
        process.kill()
        process.join()


def check_memory(names: list[str], shape: Shape, device: torch.device, dtype: torch.dtype,
                 cap_mib: int, threads: int, timeout_s: float = 600) -> list[dict]:
    """:func:`measure_case` for every name, each in a fresh process, with the ratio of the step's
    peak to the reference's (``timm``, when among the names)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    dtype_name = str(dtype).removeprefix("torch.")
    results = []
    for name in names:
        result = _in_fresh_process(context, name, shape, device, dtype_name, cap_mib, threads,
                                   timeout_s)
        print(f"memory {shape.tokens} {name}: {result.get('step_peak_mib')} MiB "
              f"{result['error'] or ''}", file=sys.stderr)
        results.append({"dtype": dtype_name, "shape": shape.__dict__, **result})
    reference = next((r["step_peak_mib"] for r in results if r["case"] == "timm" and r["error"] is None),
                     None)
    for result in results:
        result["peak_ratio"] = result["step_peak_mib"] / reference \
            if reference and result["error"] is None else None
    return results
