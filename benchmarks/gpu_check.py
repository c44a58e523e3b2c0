"""GPU readiness check (issue 18): every CUDA path, once, under 10 minutes on one GPU.

    make gpu-check                         # .venv/bin/python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --quick # CPU-safe parts, small sizes, no compiles (about 15 s)

Without CUDA the full run takes about 2.5 minutes on 2 cores (FlexAttention compiles per
shape on the CPU); benchmarks/results/gpu/gpu-check-cpu.md is its last result.

Run from the repository root. Writes benchmarks/results/gpu/gpu-check-<device>.json (every
measurement), gpu-check-<device>.md (the summary it prints) and the logs of its subprocesses
there, and prints a one-screen summary: one line per check, ``ok``, ``FAIL`` or ``skipped``
with the reason. On a machine without CUDA it runs the parts that mean something on the CPU
and says what it skipped and why. The checks:

- pytest: ``pytest -m gpu`` (the GPU tests; they skip without CUDA).
- kernels: sdpa, flex, xformers and chunked against eager (float32), forward and backward, in
  float32 and bfloat16, at N = 24, 197 and 1000, without a mask, causal, and with bool and float
  masks that have all-False rows (zeros expected there, finite gradients everywhere); error
  relative to the reference's largest value (at least 1), at most 2e-3 (float32) or 5e-2.
- auto: the kernel auto picks for softcap and sink modules with masks and causal.
- sink: the SDPA backend the sink logit's extra channel runs on, and the cost of that channel:
  SDPA at head width 64 against 65 (padded to 72 on CUDA), flex at 64 against 65 (128 inside).
- flex_recompiles: ten batch sizes and lengths through FlexAttention, without a mask, causal,
  with key padding and with softcap: compiles, recompile-limit warnings, and whether torch's
  unfused fallback (an N x N matrix) ever runs.
- xformers: N = 197 with a mask, and a sink module, on kernel='xformers' against eager.
- compiled: a softcap module under torch.compile, forward and backward, against eager.
- overflow: the overflow refusal (torch._assert_async) in a subprocess, and whether the process
  can still use the device afterwards (a device-side assert poisons a CUDA context).
- speed: the speed suite in bfloat16 against timm, few rounds (benchmarks/speed.py).
- sparse: FlexAttention with sparsity patterns at N = 16384 against its ideal, dense SDPA's
  time times the pattern's density.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

import torch

import robust_attn
from robust_attn.health.records import recording
from robust_attn.kernels import KERNELS, flex
from robust_attn.kernels.eager import attention_logits, eager_attention
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import AttentionProblem

RESULTS = Path(__file__).parent / "results" / "gpu"
ROOT = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """A check that cannot run here; its message says why."""


def _masks(batch: int, tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool mask (rand < 0.7) and a float one with all-False rows: one row of item 0 and the
    first three rows of the last item."""
    allowed = torch.rand(batch, 1, tokens, tokens, generator=generator) < 0.7
    allowed[0, 0, tokens // 2] = False
    allowed[-1, 0, :3] = False
    return allowed, torch.randn(allowed.shape, generator=generator).masked_fill(~allowed, -math.inf)


def _forward_backward(run, problem: AttentionProblem, grad: torch.Tensor | None):
    problem = problem.with_(**{name: getattr(problem, name).detach().clone().requires_grad_(
        grad is not None) for name in ("q", "k", "v")})
    out = run(problem, 0.0)
    if grad is None:
        return (out,)
    out.backward(grad.to(out.dtype))
    return out, problem.q.grad, problem.k.grad, problem.v.grad


def _combinations(device: torch.device, quick: bool):
    """(tokens, dtype, kernel), small N first, so that a check cut short by its time still covers
    every kernel."""
    sizes = (24,) if quick else (24, 197, 1000)
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    for tokens in sizes:
        for dtype in dtypes:
            for kernel in ("sdpa", "flex", "xformers", "chunked"):
                yield tokens, dtype, kernel


def check_kernels(device: torch.device, quick: bool, seconds: float) -> dict:
    deadline = time.perf_counter() + seconds
    results, skipped, worst = [], {}, {}
    for tokens, dtype, kernel in _combinations(device, quick):
        if quick and kernel == "flex" and device.type == "cpu":
            skipped[kernel] = "quick mode: compiling FlexAttention takes seconds per shape on a CPU"
            continue
        if time.perf_counter() > deadline:
            skipped[f"N={tokens} {str(dtype).removeprefix('torch.')} {kernel}"] = "out of time"
            continue
        generator = torch.Generator().manual_seed(tokens)
        q, k, v = torch.randn(3, 2, 4, tokens, 64, generator=generator)
        allowed, bias = _masks(2, tokens, generator)
        grad = torch.randn(2, 4, tokens, 64, generator=generator)
        for case, options in (("none", {}), ("causal", dict(causal=True)),
                              ("bool", dict(attn_mask=allowed)),
                              ("float", dict(attn_mask=bias)),
                              ("bool+causal", dict(attn_mask=allowed, causal=True))):
            options = {name: value.to(device, dtype) if name == "attn_mask" and
                       value.is_floating_point() else
                       value.to(device) if isinstance(value, torch.Tensor) else value
                       for name, value in options.items()}
            problem = AttentionProblem(*(t.to(device, dtype) for t in (q, k, v)),
                                       64 ** -0.5, **options)
            backward = not (kernel == "flex" and device.type == "cpu")
            with torch.set_grad_enabled(backward):
                reason = KERNELS[kernel].unsupported(problem.with_(
                    q=problem.q.detach().requires_grad_(backward)), 0.0)
            if reason is not None:
                skipped[kernel] = reason
                continue
            row = dict(kernel=kernel, dtype=str(dtype), tokens=tokens, case=case,
                       backward=backward)
            try:
                actual = _forward_backward(KERNELS[kernel].run, problem,
                                           grad.to(device) if backward else None)
                reference = problem.with_(**{n: getattr(problem, n).float()
                                             for n in ("q", "k", "v")})
                if reference.attn_mask is not None and reference.attn_mask.is_floating_point():
                    reference = reference.with_(attn_mask=reference.attn_mask.float())
                expected = _forward_backward(eager_attention, reference,
                                             grad.to(device) if backward else None)
                # error relative to the reference's scale (at least 1), worst of out and grads
                row["max_error"] = max((a.float() - e).abs().max().item() / max(1.0, e.abs().max().item())
                                       for a, e in zip(actual, expected, strict=True))
                row["finite"] = all(bool(torch.isfinite(a).all()) for a in actual)
                if problem.attn_mask is not None:
                    empty = ~(attention_logits(reference) > -math.inf).any(dim=-1)
                    row["empty_rows"] = int(empty.sum())
                    row["empty_rows_zero"] = bool(
                        (actual[0].masked_select(empty.unsqueeze(-1)) == 0).all())
            except Exception as error:  # noqa: BLE001 - reported, the check goes on
                row["error"] = f"{type(error).__name__}: {error}"[:500]
            tolerance = 2e-3 if dtype == torch.float32 else 5e-2
            row["ok"] = "error" not in row and row["finite"] and \
                row["max_error"] <= tolerance and row.get("empty_rows_zero", True)
            results.append(row)
            key = f"{kernel} {str(dtype).removeprefix('torch.')}"
            worst[key] = max(worst.get(key, 0.0), row.get("max_error", math.inf))
    failed = [r for r in results if not r["ok"]]
    summary = ", ".join(f"{key} {error:.1e}" for key, error in worst.items())
    if skipped:
        summary += "; not run: " + "; ".join(f"{k} ({r})" for k, r in skipped.items())
    return dict(ok=not failed, summary=f"max error {summary}", rows=results, failed=failed)


@contextlib.contextmanager
def _recorded_kernels(module: torch.nn.Module):
    """The kernels ``module``'s calls ran on inside the block (from its observers' records)."""
    with recording(module) as records:
        yield records


def _kernels(records) -> list[str]:
    return [record.attended.kernel for _, record in records]


def check_auto(device: torch.device, quick: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = 24 if quick else 197
    x = torch.randn(2, tokens, 128, generator=generator).to(device)
    allowed, _ = _masks(2, tokens, generator)
    rows = []
    for preset, options in (("softcap", dict(softcap=30.0)), ("sink", dict(sink_logit=True))):
        module = robust_attn.RobustAttention(128, num_heads=2, **options).to(device)
        for case, kwargs in (("none", {}), ("mask", dict(attn_mask=allowed.to(device))),
                             ("causal", dict(is_causal=True))):
            with _recorded_kernels(module) as records:
                for grad in (False, True):
                    with torch.set_grad_enabled(grad):
                        module(x, **kwargs)
            chosen = _kernels(records)
            rows.append(dict(preset=preset, case=case, inference=chosen[0], training=chosen[1]))
    summary = "; ".join(f"{r['preset']}/{r['case']}: {r['inference']}, {r['training']} (train)"
                        for r in rows)
    return dict(ok=True, summary=summary, rows=rows)


def _time(run, device: torch.device, repeats: int) -> float:
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_sink(device: torch.device, quick: bool) -> dict:
    """The SDPA op the sink module's attention runs on, and what the extra channel costs."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens, batch = (64, 2) if quick else (1024, 8)
    module = robust_attn.RobustAttention(512, num_heads=8, sink_logit=True).to(device, dtype)
    x = torch.randn(batch, tokens, 512, device=device, dtype=dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, \
            _recorded_kernels(module) as records:
        module(x).sum().backward()
    chosen = _kernels(records)
    ops = sorted({event.name for event in profile.events()
                  if "scaled_dot_product" in event.name or "efficient_attention" in event.name
                  or "flash_attention" in event.name or "cudnn_attention" in event.name})
    timings = {}
    repeats = 3 if quick else 20
    for width in (64, 65):
        q, k, v = (torch.randn(batch, 8, tokens, width, device=device, dtype=dtype)
                   for _ in range(3))
        v = v[..., :64]
        problem = AttentionProblem(q, k, v.contiguous(), 64 ** -0.5)
        timings[f"sdpa_d{width}_s"] = _time(lambda p=problem: KERNELS["sdpa"].run(p, 0.0),
                                            device, repeats)
        if device.type == "cuda" and not quick:
            timings[f"flex_d{width}_s"] = _time(lambda p=problem: KERNELS["flex"].run(p, 0.0),
                                                device, repeats)
    ratios = {name: timings[name.replace("64", "65")] / timings[name]
              for name in timings if "d64" in name}
    summary = (f"kernel {sorted(set(chosen))}, SDPA ops {ops}; forward time at width 65 / 64: "
               + ", ".join(f"{n.split('_')[0]} {r:.2f}" for n, r in ratios.items()))
    return dict(ok=True, summary=summary, ops=ops, kernels=chosen, timings=timings, ratios=ratios)


def check_flex_recompiles(device: torch.device, quick: bool) -> dict:
    if device.type == "cpu":
        raise Skip("on the CPU flex compiles once per shape by design (robust_attn.kernels.flex); "
                   "tests/test_gpu_readiness.py checks the dynamic-shape compilation there")
    import torch.nn.attention.flex_attention as torch_flex

    unfused = mock.Mock(wraps=torch_flex._warn_once)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    errors = []
    softcap = (TanhSoftCap(30.0),)
    with mock.patch.object(torch_flex, "_warn_once", unfused), \
            warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for batch in range(1, 11):
            tokens = 200 + 8 * batch
            q, k, v = torch.randn(3, batch, 4, tokens, 64, device=device)
            padding = torch.arange(tokens, device=device) < tokens - torch.arange(
                batch, device=device)[:, None, None, None]  # (B, 1, 1, N) key padding
            for options in (dict(), dict(causal=True), dict(attn_mask=padding),
                            dict(score_mods=softcap, causal=True)):
                problem = AttentionProblem(q, k, v, 0.125, **options)
                out = KERNELS["flex"].run(problem, 0.0)
                errors.append((out - eager_attention(problem)).abs().max().item())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    limit = [str(w.message) for w in caught if issubclass(w.category, flex.FlexRecompileWarning)]
    ok = not unfused.called and not limit and max(errors) < 1e-3
    return dict(ok=ok, summary=f"40 calls (10 batch sizes and lengths x none, causal, key "
                f"padding, softcap): {graphs} graphs compiled, {len(limit)} recompile-limit "
                f"warnings, unfused fallback {'ran' if unfused.called else 'never ran'}, max "
                f"error {max(errors):.1e}", graphs=graphs, limit_warnings=limit,
                max_error=max(errors))


def check_xformers(device: torch.device, quick: bool) -> dict:
    reason = KERNELS["xformers"].unsupported(
        AttentionProblem(*torch.empty(3, 1, 1, 8, 8, device=device), 1.0), 0.0)
    if reason is not None:
        raise Skip(reason)
    generator = torch.Generator().manual_seed(197)
    rows = []
    for options in (dict(), dict(sink_logit=True)):
        module = robust_attn.RobustAttention(384, num_heads=6, **options).to(device)
        x = torch.randn(2, 197, 384, generator=generator).to(device)
        allowed, _ = _masks(2, 197, generator)
        for kwargs in (dict(attn_mask=allowed.to(device)), dict(is_causal=True)):
            module.kernel = "xformers"
            out = module(x, **kwargs)
            module.kernel = "eager"
            rows.append(dict(options=str(options), mask="attn_mask" in kwargs,
                             max_error=(out - module(x, **kwargs)).abs().max().item()))
    worst = max(r["max_error"] for r in rows)
    return dict(ok=worst < 2e-3, summary=f"N = 197, mask / causal, with and without sink: "
                f"max error {worst:.1e}", rows=rows)


def check_compiled(device: torch.device, quick: bool) -> dict:
    if quick:
        raise Skip("quick mode: torch.compile takes tens of seconds on a CPU")
    module = robust_attn.RobustAttention(256, num_heads=4, softcap=30.0).to(device)
    x = torch.randn(4, 197, 256, device=device, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x, is_causal=True)
    out.square().sum().backward()
    compiled_grad, x.grad = x.grad, None
    with _recorded_kernels(module) as records:
        expected = module(x, is_causal=True)
    chosen = _kernels(records)
    expected.square().sum().backward()
    error = max((out - expected).abs().max().item(), (compiled_grad - x.grad).abs().max().item())
    return dict(ok=error < 1e-3, summary=f"softcap, causal, fullgraph: max error {error:.1e} "
                f"(uncompiled kernel {chosen[0]})", max_error=error)


_OVERFLOW_CHILD = """
import json, sys, torch, robust_attn
device = sys.argv[1]
module = robust_attn.RobustAttention(64, num_heads=2).to(device)
with torch.no_grad():
    module.qkv.weight.mul_(1e6)
result = {}
try:
    module(torch.randn(1, 8, 64, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    result["raised"] = None
except RuntimeError as error:
    result["raised"] = str(error)[:300]
try:
    result["after"] = torch.ones(4, device=device).sum().item()
except RuntimeError as error:
    result["after_error"] = str(error)[:300]
print(json.dumps(result))
"""


def check_overflow(device: torch.device, out: Path, seconds: float) -> dict:
    done = subprocess.run([sys.executable, "-c", _OVERFLOW_CHILD, device.type], cwd=ROOT,
                          capture_output=True, text=True, timeout=min(180, seconds))
    (out / f"overflow-{device.type}.log").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    if not lines:
        return dict(ok=False, summary=f"child exited {done.returncode}: {done.stderr[-300:]}")
    result = json.loads(lines[-1])
    raised = result["raised"] is not None
    usable = "after" in result
    return dict(ok=raised, summary=f"refused: {raised} ({(result['raised'] or '')[:60]}...); "
                f"device usable afterwards: {usable}", **result)


def check_pytest(device: torch.device, out: Path, seconds: float) -> dict:
    if device.type != "cuda":
        raise Skip("needs CUDA: the tests marked gpu skip without it")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, capture_output=True, text=True,
                          timeout=min(300, seconds))
    (out / "pytest-gpu.log").write_text(done.stdout + done.stderr)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
    return dict(ok=done.returncode == 0, summary=last)


_SPEED_CHILD = """
import dataclasses, sys, torch
from benchmarks import speed
plan = speed.PLANS["cuda"]
speed.PLANS["cuda"] = dataclasses.replace(
    plan, repeats={name: 3 for name in plan.repeats}, dtypes=(torch.bfloat16,), compile=False,
    flex=("baseline", "softcap", "sink"), xformers=("baseline", "sink"),
    memory_cases=("timm", "baseline", "softcap", "sink"))
speed.main(["--device", "cuda", "--out", sys.argv[1], "--memory-timeout-s", "120"])
"""


def check_speed(device: torch.device, out: Path, seconds: float) -> dict:
    if device.type != "cuda":
        raise Skip("needs CUDA: the CPU speed suite is `make bench-speed` (benchmarks/results/speed-cpu.md)")
    done = subprocess.run([sys.executable, "-c", _SPEED_CHILD, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=min(300, seconds))
    (out / "speed.log").write_text(done.stdout + done.stderr)
    return dict(ok=done.returncode == 0, summary=f"bfloat16, 3 rounds, no compile: {out}/speed-cuda.md "
                f"(exit {done.returncode})")


def check_sparse(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("needs CUDA: FlexAttention is not auto's sparse kernel on the CPU "
                   "(make bench-sparse measures the structured CPU kernels)")
    from benchmarks.sparse import density, patterns

    tokens, heads, width = 16384, 8, 64
    chosen = {}
    times = {}
    for name, pattern in patterns(512, tokens).items():
        if name not in ("dense", "local_causal", "block_local", "longformer", "bigbird"):
            continue
        q, k, v = (torch.randn(1, heads, tokens, width, device=device, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        problem = AttentionProblem(q, k, v, width ** -0.5, pattern=pattern)
        kernel = robust_attn.kernels.select_kernel("auto", problem, 0.0)
        chosen[name] = kernel.name
        grad = torch.randn_like(q)
        times[name] = _time(lambda p=problem, r=kernel.run, g=grad: r(p, 0.0).backward(g), device, 5)
    rows = {name: dict(kernel=chosen[name], seconds=seconds,
                       density=density(patterns(512, tokens)[name], tokens),
                       ideal_s=times["dense"] * density(patterns(512, tokens)[name], tokens))
            for name, seconds in times.items()}
    summary = ", ".join(f"{n} ({r['kernel']}) {r['seconds'] / r['ideal_s']:.1f}x ideal"
                        for n, r in rows.items() if n != "dense")
    return dict(ok=True, summary=f"N = 16384, bf16 fwd+bwd: {summary}", rows=rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; skip what compiles")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="checks not started within this many seconds are skipped")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    # Most telling first: a check that would start past the budget is skipped, and the
    # subprocesses get at most the time left.
    checks = {
        "kernels": lambda: check_kernels(device, args.quick, left() / 3),
        "auto": lambda: check_auto(device, args.quick),
        "sink": lambda: check_sink(device, args.quick),
        "xformers": lambda: check_xformers(device, args.quick),
        "overflow": lambda: check_overflow(device, args.out, left()),
        "flex_recompiles": lambda: check_flex_recompiles(device, args.quick),
        "compiled": lambda: check_compiled(device, args.quick),
        "pytest": lambda: check_pytest(device, args.out, left()),
        "sparse": lambda: check_sparse(device, args.quick),
        "speed": lambda: check_speed(device, args.out, left()),
    }
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, quick=args.quick, checks={})
    for name, check in checks.items():
        began = time.perf_counter()
        try:
            if left() < 30:
                raise Skip(f"out of the time budget ({args.budget_s:.0f} s)")
            result = check()
            result["status"] = "ok" if result.pop("ok") else "FAIL"
        except Skip as reason:
            result = dict(status="skipped", summary=str(reason))
        except Exception as error:  # noqa: BLE001 - one failing check must not hide the others
            result = dict(status="FAIL", summary=f"{type(error).__name__}: {error}"[:300],
                          traceback=traceback.format_exc())
        result["seconds"] = round(time.perf_counter() - began, 1)
        report["checks"][name] = result
        print(f"{name:16s} {result['status']:8s} {result['seconds']:6.1f} s  {result['summary']}",
              file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    stem = f"gpu-check-{device.type}{'-quick' if args.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# GPU check on {report['device']} (torch {report['torch']}"
             f"{', quick' if args.quick else ''}): {report['seconds']} s", "",
             "| check | status | s | result |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']} | {r['summary']} |"
              for name, r in report["checks"].items()]
    summary = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(summary)
    print(summary)
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any(r["status"] == "FAIL" for r in report["checks"].values()) else 0)
