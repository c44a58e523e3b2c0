"""make gpu-check's script runs its CPU-safe parts here and says what it skipped and why."""

import json

from benchmarks import gpu_check


def test_gpu_check_quick_on_the_cpu(tmp_path):
    report = gpu_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    checks = report["checks"]
    assert list(checks) == ["kernels", "auto", "sink", "xformers", "overflow", "flex_recompiles",
                            "compiled", "pytest", "sparse", "speed"]
    for name in ("kernels", "auto", "sink", "overflow"):
        assert checks[name]["status"] == "ok", checks[name]
    for name in ("pytest", "sparse", "speed"):
        assert checks[name]["status"] == "skipped" and "needs CUDA" in checks[name]["summary"]
    kernels = {row["kernel"] for row in checks["kernels"]["rows"]}
    assert kernels == {"sdpa", "chunked"}
    masked = [row for row in checks["kernels"]["rows"] if "empty_rows" in row]
    assert masked and all(row["empty_rows"] > 0 and row["empty_rows_zero"] for row in masked)
    assert any("scaled_dot_product" in op for op in checks["sink"]["ops"])
    assert checks["overflow"]["raised"].startswith("x:") and checks["overflow"]["after"] == 4.0
    saved = json.loads((tmp_path / "gpu-check-cpu-quick.json").read_text())
    assert saved["checks"]["speed"]["status"] == "skipped"
    assert "| kernels | ok |" in (tmp_path / "gpu-check-cpu-quick.md").read_text()
