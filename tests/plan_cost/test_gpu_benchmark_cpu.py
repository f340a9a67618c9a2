"""benchmarks/gpu_flux_memory.py runs end to end on the tiny config on CPU and prints its side-by-side table."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # a benchmark script's smoke test: `make test-bench`

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_flux_memory.py"


def test_benchmark_prints_table_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_flux_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--config", "flux-tiny", "--device", "cpu", "--lora-resolution", "64", "--resolution", "32",
                     "--text-tokens", "8", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "measured GiB" in out and "estimate GiB" in out
    rows = [line for line in out.splitlines() if line.startswith(("LoRA", "blockskip"))]
    assert [r.split()[0] for r in rows] == ["LoRA", "blockskip", "blockskip"]
    for r in rows:
        ratio = float(r.split()[-3])
        assert 0.9 <= ratio <= 1.1, r  # the estimate of each setting agrees with its measured peak
