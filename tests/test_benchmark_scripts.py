"""The CPU benchmark scripts still run end to end on small settings.

The scripts import the library's internals (train_from_store, read_features, ...), so an API change breaks them
silently unless something runs them; these runs check the rows each prints, not any timing.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # `make test-bench` (CI runs it after `make test`)

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_fp8_features_benchmark_reports_errors_bytes_and_losses():
    out = _run("fp8_features.py", "--steps", "3", timeout=300)
    m = re.search(r"shard bytes per step: fp32 (\d+), bf16 (\d+), fp8_e4m3 (\d+)", out)
    assert m, out
    fp32, bf16, fp8 = map(int, m.groups())
    assert fp8 < bf16 < fp32
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2]  # one loss row per step, for all three dtypes
    assert re.search(r"^fp8_e4m3: max \|loss - fp32 loss\|", out, flags=re.M), out


def test_precompute_throughput_benchmark_prints_every_row():
    out = _run("precompute_throughput.py", "--subjects", "1", "--steps", "2", timeout=500)
    for row in ("precompute, 1 actor(s)", "precompute, 2 actor(s)", "bytes per step", "train, in-memory features",
                "read only, local", "train from local store", "read only, moto S3", "train from moto S3 store"):
        assert re.search(rf"^{re.escape(row)}\s+\S", out, flags=re.M), (row, out)


def test_serve_load_benchmark_prints_every_scenario():
    out = _run("serve_load.py", "--requests", "3", "--max-seconds", "20", timeout=500)
    rows = re.findall(r"^\| (.+?) \| (\d+) \| \d+ \| \d+ \| [\d.]+ \| \d+% \|$", out, flags=re.M)
    assert len(rows) == 5 and all(int(n) == 3 for _, n in rows), out
    assert "cold adapter load" in out


def test_catalog_concurrency_benchmark_prints_a_row_per_setting():
    out = _run("catalog_concurrency.py", "--subjects", "1", "--steps", "2", "--concurrency", "1", timeout=500)
    assert re.search(r"^\s+1\s+[\d.]+\s+1\.00x\s+[\d.]+$", out, flags=re.M), out


def test_cpu_step_memory_benchmark_prints_three_configs(tmp_path):
    out = _run("cpu_step_memory.py", "--dim", "64", "--steps", "2", "--out", str(tmp_path), timeout=500)
    rows = re.findall(r"^(lora|blockskip-30%|blockskip-50%)\s+\((\d+), (\d+)\)\s", out, flags=re.M)
    assert [r[0] for r in rows] == ["lora", "blockskip-30%", "blockskip-50%"], out
    assert rows[0][1:] == ("0", "0") and all(int(n) + int(m) > 0 for _, n, m in rows[1:])


def test_serve_abuse_benchmark_prints_every_scenario():
    out = _run("serve_abuse.py", "--stalled", "10", "--abandoned", "1", "--abandoned-steps", "60", "--burst", "12",
               timeout=600)
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", out, flags=re.M))
    assert rows["10 stalled connections held: /healthz, /v1/adapters, image (s, status)"].count("(200)") == 3, out
    assert rows["UTF-16 JSON / text/plain content type"] == "400 / 415", out
    assert re.fullmatch(r"(401 \d+ B [\d.]+ s, ){2}401 \d+ B [\d.]+ s",
                        rows["3 x unauthenticated 10.7 MB body (1 MB sent): status, answer bytes, seconds"]), out
    assert "command: PYTHONPATH=$PWD python benchmarks/serve_abuse.py" in out


def test_status_bookkeeping_benchmark_prints_both_schemes():
    out = _run("status_bookkeeping.py", "--subjects", "40", "--http-sample", "10", "--old-sample", "3",
               "--sync-sample", "5", "--compact-every", "20", timeout=300)
    assert re.search(r"^HTTP requests per change through the counting proxy.*: [\d.]+ ", out, flags=re.M), out
    for row in ("events, written behind (now)", "rewrite whole table (before)"):
        assert re.search(rf"^{re.escape(row)}\s+[\d.]+\s+[\d,]+\s+[\d.]+\s+[\d.]+", out, flags=re.M), (row, out)
    assert re.search(r"^events, synchronous\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, flags=re.M), out


def test_packed_step_benchmark_prints_a_row_per_k():
    out = _run("packed_step.py", "--dim", "64", "--resolution", "64", "--text-tokens", "16", "--ks", "1,2",
               "--steps", "1", timeout=300)
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, flags=re.M)
    assert rows == ["1", "2"], out


def test_fidelity_ablation_prints_every_configuration(tmp_path):
    """benchmarks/fidelity.py (docs/fidelity.md) end to end on the shipped toy model at 2 steps: the probe,
    every configuration of the table once, the scores from the toy metric models."""
    out = _run("fidelity.py", "--subjects", "1", "--seeds", "0", "--steps", "2", "--sample-steps", "2",
               "--probe-subjects", "6", "--out", str(tmp_path), timeout=900)
    names = re.findall(r"^(\S.*?)\s+(?:-|\d+,\d+)\s+-?[\d.]+ ± [\d.]+", out, flags=re.M)
    for row in ("base (no adapter)", "lora (full res)", "blockskip 30% default", "blockskip 50% probe",
                "naive skip 50%", "resize 30% (no dyn. crop)", "skip first only 50%", "skip last only 50%"):
        assert row in names, (row, out)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "probe.json").is_file()
