"""Issue 14 item 5: a damaged committed feature set or marker fails only its subject, naming the object, and is
rebuilt by the next run (or in the same run with the overwrite key); every overwrite hint names an option that
exists where it is printed. Ray Data's compute is replaced by a recorder: these are the driver's decisions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import blockskip_ray.distributed.precompute as pre
from blockskip_ray.method.catalog import Subject
from blockskip_ray.method.images import make_synthetic_subject
from blockskip_ray.method.stored import read_features, write_features
from blockskip_ray.store import Store, is_committed
from blockskip_ray.store.features import FeatureDamage, committed_damage, features_prefix


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from blockskip_ray.models.tiny import init_model
    return str(init_model("flux", tmp_path_factory.mktemp("model") / "tiny-flux"))


@pytest.fixture
def world(tiny, tmp_path, monkeypatch):
    store = Store.open(str(tmp_path / "store"))
    cfg = pre.PrecomputeConfig(model=tiny, skip=(1, 1), steps=3, resolution=64, max_text_tokens=8,
                               feature_dtype="fp32")
    subjects = []
    for sid in ("a", "b"):
        make_synthetic_subject(tmp_path / sid, n=2, size=64)
        s = Subject(sid, str(tmp_path / sid), "a photo of sks toy")
        plan = pre.subject_plan(cfg, s)
        feats = [(int(r["step"]), {"h": torch.full((4, 8), float(i))}) for i, r in enumerate(plan)]
        write_features(store, sid, {"t": torch.ones(2)}, feats, plan, pre.subject_meta(cfg, s, pre.model_key(tiny)))
        subjects.append(s)
    built: list[str] = []

    def fake_compute(store, rows, plans, metas, cfg, results, on_step, log):
        for sid in plans:
            built.append(sid)
            results[sid] = {"state": "succeeded"}

    monkeypatch.setattr(pre, "_compute_and_write", fake_compute)
    monkeypatch.setattr(pre.ray.data.DataContext, "get_current", lambda: type("C", (), {
        "execution_options": type("E", (), {"preserve_order": False})()})())
    return store, cfg, subjects, built


def test_corrupt_marker_fails_its_subject_and_is_rebuilt_next_run(world):
    store, cfg, subjects, built = world
    marker = f"{features_prefix('a')}/_COMMITTED"
    store.write_bytes(marker, b'{"shards": ["shard-00000.safe')  # truncated JSON
    assert "corrupt commit marker" in committed_damage(store, "a") and store.url(marker) in committed_damage(store, "a")
    assert committed_damage(store, "b") is None and not is_committed(store, "a")
    results = pre.run_precompute(store, subjects, cfg, log=lambda m: None)  # no exception for the whole run
    assert results["a"]["state"] == "failed" and store.url(marker) in results["a"]["error"]
    assert "the next run rebuilds it" in results["a"]["error"]
    assert results["b"]["state"] == "skipped" and built == []
    results = pre.run_precompute(store, subjects, cfg, log=lambda m: None)  # the next run
    assert built == ["a"] and results["a"]["state"] == "succeeded" and results["b"]["state"] == "skipped"


def test_damaged_index_is_rebuilt_in_the_same_run_with_overwrite(world):
    store, cfg, subjects, built = world
    index = f"{features_prefix('b')}/index.parquet"
    store.write_bytes(index, store.read_bytes(index) + b"x")
    assert "does not match its commit marker" in committed_damage(store, "b")
    results = pre.run_precompute(store, subjects, cfg, overwrite=True, log=lambda m: None)
    assert built == ["b"] and results["b"]["state"] == "succeeded" and results["a"]["state"] == "skipped"


def test_shard_damage_found_while_training_invalidates_the_set(world):
    from blockskip_ray.distributed.training import _damage_checked
    store, cfg, subjects, built = world
    shard = f"{features_prefix('a')}/shard-00000.safetensors"
    data = bytearray(store.read_bytes(shard))
    data[-3] ^= 0xFF  # a valid file with a wrong value
    store.write_bytes(shard, bytes(data))
    _, _, feats = read_features(store, "a")
    with pytest.raises(FeatureDamage, match=r"checksum mismatch in feature shard .*shard-00000.safetensors.*"
                                            r"invalidated and the next run rebuilds it"):
        list(_damage_checked(store, "a", feats))
    assert not is_committed(store, "a")
    pre.run_precompute(store, subjects, cfg, log=lambda m: None)
    assert built == ["a"]  # rebuilt, not "already committed ... skipped"


def test_overwrite_hints_name_existing_options(world, tmp_path):
    from blockskip_ray.distributed.jobs import precompute_stage
    from blockskip_ray.distributed.jobspec import load_spec
    store, cfg, subjects, built = world
    job = load_spec({"job_id": "j", "model": cfg.model, "store": store.uri,
                     "train": {"steps": 4, "resolution": 64, "max_text_tokens": 8, "skip": [1, 1]},
                     "precompute": {"feature_dtype": "fp32"}})
    with pytest.raises(ValueError, match=r"differs in .*steps.*set overwrite: true in the job \(or the override "
                                         r"overwrite=true\)") as e:
        precompute_stage(job, store, cfg.model, subjects, (1, 1), log=lambda m: None)
    assert "--overwrite" not in str(e.value)  # `blockskip run` has no such flag
    from blockskip_ray.distributed.jobspec import JobSpec
    assert "overwrite" in {f.name for f in __import__("dataclasses").fields(JobSpec)}
    cli = pre.PrecomputeConfig(**{**cfg.__dict__, "steps": 4})
    with pytest.raises(ValueError, match="pass --overwrite"):
        pre.run_precompute(store, subjects, cli, log=lambda m: None)
    from blockskip_ray.cli import build_parser
    assert "--overwrite" in build_parser()._subparsers._group_actions[0].choices["precompute"].format_help()
