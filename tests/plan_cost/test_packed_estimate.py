"""The packed planner (two traced steps + per-subject state) against a real packed step measured on CPU."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from blockskip_ray.cli import main
from blockskip_ray.plan_cost.estimate import EstimateSpec, model_config, step_inputs
from blockskip_ray.plan_cost.measure import _storage_bytes, profiled_peak
from blockskip_ray.plan_cost.packed import estimate_packed

_spec = importlib.util.spec_from_file_location("_est", Path(__file__).parent / "test_estimate.py")
_est = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_est)
flux_small_dir = _est.flux_small_dir


def measure_packed(spec: EstimateSpec, k: int) -> int:
    """Peak bytes of one real PackedTrainer step with k subjects (fp32 CPU), from the profiler's timeline."""
    import diffusers

    from blockskip_ray.method.modes import get_mode
    from blockskip_ray.method.packed import PackedTrainer
    from blockskip_ray.method.trainer import OptimConfig
    from blockskip_ray.models.loading import strip_blocks
    from blockskip_ray.models.stack import make_stack

    family, cfg, vae = model_config(spec.model)
    torch.manual_seed(0)
    t = diffusers.FluxTransformer2DModel.from_config(cfg).requires_grad_(False)
    n_blocks = make_stack(t).num_blocks
    strip_blocks(t, [i for i in range(n_blocks) if i not in range(spec.skip[0], n_blocks - spec.skip[1])])
    tr = PackedTrainer(t, make_stack(t), spec.skip, get_mode(spec.mode), OptimConfig(rank=spec.rank), slots=k)
    g = torch.Generator().manual_seed(1)
    make = lambda shape, dtype: (torch.randn(shape, generator=g) * 0.02).to(dtype)  # noqa: E731
    batch = {}
    for i in range(k):
        tr.add(f"s{i}", i)
        text, feats = step_inputs(family, cfg, spec, spec.skip, vae, make)
        feats["sigma"] = torch.rand(1, generator=g)
        batch[f"s{i}"] = (text, feats)
    tr.step(batch)  # warm
    base = _storage_bytes(list(tr.t.parameters()) + list(tr.t.buffers()) + tr.exp_avg + tr.exp_avg_sq)
    return base + profiled_peak(lambda: tr.step(batch))


def test_packed_estimate_matches_measured_packed_step(flux_small_dir):
    spec = EstimateSpec(model=str(flux_small_dir), resolution=128, skip=(1, 1), text_tokens=32, target="cpu")
    est = estimate_packed(spec, 3)
    real = measure_packed(spec, 3)
    print(est["packed_peak_memory_bytes"], real)
    assert 0.85 <= est["packed_peak_memory_bytes"] / real <= 1.15
    assert est["per_subject_activations_gib"] > 0 and est["packed_peak_memory_gib"] > est["peak_memory_gib"]


def test_fit_counts(flux_small_dir):
    spec = EstimateSpec(model=str(flux_small_dir), resolution=128, skip=(1, 1), text_tokens=32)
    r = estimate_packed(spec, 2, fit_gb=0.1, reserve_gib=0.0)
    peak1, per = r["peak_memory_bytes"], r["per_subject_gib"] * 2**30
    assert r["fit_today"] == int(0.1e9 // peak1)
    assert r["fit_packed"] == 1 + int((0.1e9 - peak1) // per)
    assert r["packed_peak_at_fit_gib"] * 2**30 <= 0.1e9 < r["packed_peak_at_fit_gib"] * 2**30 + per
    assert r["fit_packed"] > r["fit_today"]  # one weight copy instead of one per subject


def test_cli_subjects(capsys):
    assert main(["estimate", "--model", "flux-tiny", "--resolution", "64", "--text-tokens", "16",
                 "--subjects", "4", "--fit-gb", "1", "--reserve-gib", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["subjects"] == 4 and out["fit_packed"] >= out["fit_today"] >= 1
    assert main(["estimate", "--model", "flux-tiny", "--resolution", "64", "--fit-gb", "80"]) == 2
    assert "--fit-gb needs --subjects" in capsys.readouterr().err
    assert main(["estimate", "--model", "flux-tiny", "--resolution", "64", "--subjects", "0"]) == 2
    assert "subjects must be >= 1" in capsys.readouterr().err
