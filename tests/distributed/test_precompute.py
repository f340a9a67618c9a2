"""The Ray Data precompute pipeline on a real local Ray: correct features, idempotent, crash-safe."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from blockskip_ray.distributed.precompute import PrecomputeConfig, run_precompute
from blockskip_ray.method.catalog import load_catalog
from blockskip_ray.method.features import FeatureComputer
from blockskip_ray.method.images import load_images, make_synthetic_subject
from blockskip_ray.method.modes import get_mode
from blockskip_ray.method.stored import read_features
from blockskip_ray.models.loading import load_pipeline
from blockskip_ray.store import Store

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
STEPS = 4


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny FLUX model and a catalog of two subjects plus one bad row."""
    from blockskip_ray.models.tiny import init_model

    root = tmp_path_factory.mktemp("world")
    model = init_model("flux", root / "flux-tiny")
    make_synthetic_subject(root / "imgs" / "a", n=2, size=64, seed=1)
    make_synthetic_subject(root / "imgs" / "b", n=3, size=64, seed=2)
    lines = [{"id": "toy-a", "images": "imgs/a", "prompt": "a photo of sks toy", "class": "toy"},
             {"id": "toy-b", "images": [str(p) for p in sorted((root / "imgs" / "b").iterdir())],
              "prompt": "a photo of zwx robot", "class": "robot"},
             {"id": "../evil", "images": "imgs/a", "prompt": "x"}]
    cat = root / "catalog.jsonl"
    cat.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    subjects, errors = load_catalog(cat)
    assert [s.id for s in subjects] == ["toy-a", "toy-b"] and [e[0] for e in errors] == [3]
    cfg = PrecomputeConfig(model=str(model), skip=(2, 2), steps=STEPS, resolution=32, s_max=64,
                           max_text_tokens=16, feature_dtype="fp32", concurrency=2, batch_size=2,
                           shard_max_bytes=8_000)
    return root, subjects, cfg


def snapshot(store: Store) -> dict[str, tuple[bytes, int]]:
    root = store.local_path
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def reference(ray_local, world, tmp_path_factory):
    """One uninterrupted run: the bytes every other run must reproduce."""
    _, subjects, cfg = world
    store = Store.open(str(tmp_path_factory.mktemp("ref") / "store"))
    res = run_precompute(store, subjects, cfg, log=lambda _: None)
    assert {k: v["state"] for k, v in res.items()} == {"toy-a": "succeeded", "toy-b": "succeeded"}
    return store, snapshot(store)


def test_features_equal_in_process_computation(world, reference):
    _, subjects, cfg = world
    store, _ = reference
    pipe = load_pipeline(cfg.model, "cpu", torch.float32)
    fc = FeatureComputer(pipe, cfg.skip, get_mode(cfg.mode), cfg.max_text_tokens, cfg.guidance)
    for s in subjects:
        text, plan, it = read_features(store, s.id)
        ref_text = fc.text(s.prompt)
        assert all(torch.equal(text[k], ref_text[k]) for k in ref_text)
        images = load_images(s.images) if isinstance(s.images, str) else [load_images(Path(s.images[0]).parent)[i]
                                                                           for i in range(len(s.images))]
        got = list(it)
        assert [st for st, _ in got] == list(range(STEPS))
        for (step, f), row in zip(got, plan):
            want = fc.step(images[row["image_index"]], row, ref_text)
            assert f.keys() == want.keys()
            for k in want:  # actors run with one thread: allow float reassociation, nothing more
                torch.testing.assert_close(f[k], want[k], rtol=1e-5, atol=1e-5)


def test_rerun_on_committed_set_writes_nothing(world, reference):
    _, subjects, cfg = world
    store, before = reference
    res = run_precompute(store, subjects, cfg, log=lambda _: None)
    assert {v["state"] for v in res.values()} == {"skipped"}
    assert snapshot(store) == before  # same files, same bytes, same mtimes


def test_other_configuration_is_refused_without_overwrite(world, reference):
    _, subjects, cfg = world
    store, before = reference
    other = PrecomputeConfig(**{**cfg.__dict__, "feature_dtype": "bf16"})
    with pytest.raises(ValueError, match="differs in feature_dtype.*--overwrite"):
        run_precompute(store, subjects, other, log=lambda _: None)
    assert snapshot(store) == before


def test_crash_mid_subject_then_rerun_is_byte_identical(world, reference, tmp_path):
    _, subjects, cfg = world
    _, ref = reference
    store = Store.open(str(tmp_path / "store"))

    def crash(sid: str, step: int) -> None:
        if sid == "toy-b" and step == 2:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        run_precompute(store, subjects, cfg, on_step=crash, log=lambda _: None)
    files = snapshot(store)
    assert "subjects/toy-a/features/_COMMITTED" in files  # the first subject finished
    assert "subjects/toy-b/features/_COMMITTED" not in files
    assert any(k.startswith("subjects/toy-b/features/shard-") for k in files)  # a partial set was left
    with pytest.raises(FileNotFoundError):
        read_features(store, "toy-b")
    res = run_precompute(store, subjects, cfg, log=lambda _: None)
    assert {k: v["state"] for k, v in res.items()} == {"toy-a": "skipped", "toy-b": "succeeded"}
    after = snapshot(store)
    assert after["subjects/toy-a/features/_COMMITTED"] == files["subjects/toy-a/features/_COMMITTED"]
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in ref.items()}


def _cli(argv: list[str]) -> int:
    import argparse

    from blockskip_ray.commands import precompute as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_skips_committed_subjects_and_reports_bad_rows(world, reference, capsys):
    root, _, cfg = world
    store, before = reference
    rc = _cli(["precompute", "--model", cfg.model, "--store", str(store.local_path), "--catalog",
               str(root / "catalog.jsonl"), "--skip", "2,2", "--steps", str(STEPS), "--resolution", "32",
               "--s-max", "64", "--max-text-tokens", "16", "--feature-dtype", "fp32", "--concurrency", "2"])
    out, err = capsys.readouterr()
    assert rc == 1  # the catalog's bad row is a failed subject
    res = json.loads(out)
    assert res["toy-a"]["state"] == res["toy-b"]["state"] == "skipped"
    assert res["../evil"]["state"] == "failed" and "invalid subject id" in res["../evil"]["error"]
    assert "catalog row 3" in err
    assert snapshot(store) == before
    with pytest.raises(ValueError, match="leaves no block to train"):
        _cli(["precompute", "--model", cfg.model, "--store", str(store.local_path), "--catalog",
              str(root / "catalog.jsonl"), "--skip", "5,4"])
