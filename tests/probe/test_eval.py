"""`blockskip eval` on the tiny FLUX model with a real (briefly trained) adapter and tiny metric models."""
from __future__ import annotations

import argparse

import pyarrow.parquet as pq
import pytest

from blockskip_ray.commands import eval as eval_cmd
from blockskip_ray.method.images import make_synthetic_subject
from blockskip_ray.method.personalize import TrainSpec, personalize
from blockskip_ray.method.trainer import OptimConfig
from blockskip_ray.models.tiny import init_model
from blockskip_ray.probe.tiny_metrics import build_tiny_clip, build_tiny_dino


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    model = init_model("flux", d / "tiny")
    make_synthetic_subject(d / "refs", n=3, size=64, seed=5)
    personalize(TrainSpec(model=str(model), images=str(d / "refs"), prompt="a photo of sks toy", out=str(d / "run"),
                          mode="lora", steps=4, resolution=32, max_text_tokens=32, num_samples=0,
                          optim=OptimConfig(lr=1e-2)),
                log=lambda s: None)
    return {"dir": d, "model": str(model), "refs": str(d / "refs"), "adapter": str(d / "run" / "adapter"),
            "dino": str(build_tiny_dino(d / "dino")), "clip": str(build_tiny_clip(d / "clip"))}


def _args(env, out, **kw):
    a = dict(model=env["model"], adapter=env["adapter"], images=env["refs"], prompts=["a photo of sks toy", "a sks toy"],
             dino=env["dino"], clip=env["clip"], out=str(out), subject_id="toy-1", images_per_prompt=2, steps=2,
             resolution=32, seed=0, device="cpu", save_images=None)
    a.update(kw)
    return argparse.Namespace(**a)


def test_eval_writes_table(env, tmp_path, capsys):
    assert eval_cmd.run(_args(env, tmp_path / "scores.parquet")) == 0
    t = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert len(t) == 4
    assert {r["prompt"] for r in t} == {"a photo of sks toy", "a sks toy"}
    assert sorted(r["seed"] for r in t) == [0, 0, 1, 1]
    assert all(r["subject_id"] == "toy-1" and -1 <= r["dino"] <= 1 and -1 <= r["clip_t"] <= 1 for r in t)
    printed = capsys.readouterr().out
    mean = sum(r["dino"] for r in t) / 4
    assert f"{mean:7.4f}" in printed.splitlines()[-2]
    # that the adapter changes the generations is checked on ProbeWorker below (same load path)


def test_eval_bad_input(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        eval_cmd.run(_args(env, tmp_path / "x.parquet", adapter=str(tmp_path)))
    with pytest.raises(ValueError, match=".parquet"):
        eval_cmd.run(_args(env, tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        eval_cmd.run(_args(env, tmp_path / "x.parquet", images=str(tmp_path / "empty")))


def test_probe_worker_switches_adapters_exactly(env):
    from blockskip_ray.probe.generate import ProbeWorker, adapter_files

    w = ProbeWorker(env["model"], env["dino"], "cpu")
    base = w.embed("a photo of sks toy", 0, frozenset(), 2, 32)
    tuned = w.embed("a photo of sks toy", 0, frozenset(), 2, 32, adapter_files(env["adapter"]))
    assert tuned != base
    assert w.embed("a photo of sks toy", 0, frozenset(), 2, 32) == base  # unloading restores the base weights
