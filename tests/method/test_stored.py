"""Features through the store: written once, read back with prefetch, training gets the same losses."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from blockskip_ray.method.personalize import TrainSpec, precompute, prepare, train
from blockskip_ray.method.stored import (check_meta, make_meta, model_key, read_features, spec_meta,
                                         train_from_store, write_features)
from blockskip_ray.store import Store

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The store branch's moto fixtures (a real S3 endpoint on 127.0.0.1), imported rather than copied.
_spec = importlib.util.spec_from_file_location("_store_conftest_stored",
                                               Path(__file__).parents[1] / "store" / "conftest.py")
_store_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_store_conftest)
aws_env, s3_endpoint = _store_conftest.aws_env, _store_conftest.s3_endpoint
BUCKET, unique_prefix = _store_conftest.BUCKET, _store_conftest.unique_prefix


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dir) -> Path:
    return tiny_flux_dir  # the session's tiny FLUX (tests/conftest.py)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    from blockskip_ray.method.images import make_synthetic_subject

    d = tmp_path_factory.mktemp("subject")
    make_synthetic_subject(d, n=3, size=64, seed=1)
    return d


def make_spec(flux_dir, images_dir, tmp_path, **kw) -> TrainSpec:
    base = dict(model=str(flux_dir), images=str(images_dir), prompt="a photo of sks toy", out=str(tmp_path / "out"),
                subject_id="toy-1", skip=(2, 2), steps=6, resolution=32, s_max=64, max_text_tokens=16, num_samples=0)
    return TrainSpec(**(base | kw))


@pytest.fixture(scope="module")
def computed(flux_dir, images_dir, tmp_path_factory):
    """In-process features (the `blockskip train` path) of one spec, computed once."""
    spec = make_spec(flux_dir, images_dir, tmp_path_factory.mktemp("o"))
    family, images, plan, skip = prepare(spec, log=lambda _: None)
    text, feats = precompute(spec, images, plan, skip, torch.device("cpu"), progress=False)
    return spec, family, plan, skip, text, feats


def meta_for(spec, family, skip, dtype):
    return make_meta(model=spec.model, family=family, skip=skip, mode=spec.mode, resolution=spec.resolution,
                     s_max=spec.s_max, steps=spec.steps, seed=spec.seed, max_text_tokens=spec.max_text_tokens,
                     guidance=spec.optim.guidance, prompt=spec.prompt, feature_dtype=dtype, compute_dtype="fp32")


def test_round_trip_fp32_is_exact_and_shards_stream(computed, tmp_path):
    spec, family, plan, skip, text, feats = computed
    store = Store.open(str(tmp_path / "store"))
    marker = write_features(store, "toy-1", text, feats, plan, meta_for(spec, family, skip, "fp32"),
                            shard_max_bytes=20_000)
    assert marker["num_shards"] > 1  # several shards, so prefetch crosses shard boundaries
    assert store.exists("subjects/toy-1/plan.parquet")
    text2, plan2, it = read_features(store, "toy-1", prefetch=2, expect=spec_meta(spec, skip))
    assert plan2 == plan
    assert text2.keys() == text.keys() and all(torch.equal(text[k], text2[k]) for k in text)
    got = list(it)
    assert [s for s, _ in got] == [s for s, _ in feats]
    for (_, a), (_, b) in zip(feats, got):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert {"h", "e", "delta", "target"} <= set(got[0][1])  # skip (2, 2): leading state and trailing delta


def test_reader_refuses_other_configuration_and_tampering(computed, tmp_path):
    spec, family, plan, skip, text, feats = computed
    store = Store.open(str(tmp_path / "store"))
    write_features(store, "toy-1", text, feats, plan, meta_for(spec, family, skip, "bf16"))
    with pytest.raises(ValueError, match=r"different configuration \(skip: stored \[2, 2\], wanted \[1, 3\]"):
        read_features(store, "toy-1", expect=spec_meta(spec, (1, 3)))
    with pytest.raises(ValueError, match="feature_dtype: stored 'bf16', wanted 'fp32'"):
        read_features(store, "toy-1", expect={"feature_dtype": "fp32"})
    other = make_spec(spec.model, spec.images, tmp_path, prompt="a photo of sks dog")
    with pytest.raises(ValueError, match="prompt: stored"):
        train_from_store(other, store, "toy-1", torch.device("cpu"), log=lambda _: None)
    store.write_bytes("subjects/toy-1/features/text.safetensors", b"x" * 16)
    with pytest.raises(ValueError, match="does not match _COMMITTED"):
        read_features(store, "toy-1")
    with pytest.raises(FileNotFoundError, match="not committed"):
        read_features(store, "toy-2")


def test_write_refuses_steps_that_do_not_follow_the_plan(computed, tmp_path):
    spec, family, plan, skip, text, feats = computed
    store = Store.open(str(tmp_path / "store"))
    meta = meta_for(spec, family, skip, "fp32")
    with pytest.raises(ValueError, match="does not follow the plan"):
        write_features(store, "toy-1", text, [feats[0], feats[2]], plan, meta)
    with pytest.raises(ValueError, match="got 2 feature steps, the plan has 6"):
        write_features(store, "toy-1", text, feats[:2], plan, meta)
    with pytest.raises(FileNotFoundError):  # nothing committed after either failure
        read_features(store, "toy-1")


def test_model_key_tells_weights_apart(flux_dir, tmp_path):
    from blockskip_ray.models.tiny import init_model

    other = init_model("flux", tmp_path / "flux-tiny", seed=1)  # same name and configs, other weights
    assert model_key(flux_dir) == model_key(flux_dir)
    assert model_key(flux_dir) != model_key(other)
    check_meta({"a": [1, 2]}, {"a": (1, 2)}, "x")  # tuples and lists compare as JSON does


@pytest.fixture(scope="module")
def reference_losses(computed):
    spec, family, plan, skip, text, feats = computed
    torch.manual_seed(0)
    return train(spec, skip, text, feats, torch.device("cpu"), log=lambda _: None)[1]["loss"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_training_from_store_equals_in_process(computed, reference_losses, tmp_path, kind, request):
    spec, family, plan, skip, text, feats = computed
    if kind == "local":
        store = Store.open(str(tmp_path / "store"))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        store = Store.open(f"s3://{BUCKET}/{unique_prefix('stored')}", endpoint_url=endpoint, )
    write_features(store, "toy-1", text, feats, plan, meta_for(spec, family, skip, "fp32"), shard_max_bytes=30_000)
    torch.manual_seed(0)
    _, got, _ = train_from_store(spec, store, "toy-1", torch.device("cpu"), feature_dtype="fp32", log=lambda _: None)
    assert len(reference_losses) == spec.steps
    assert got["loss"] == reference_losses  # exact: fp32 features come back bit for bit
    assert got["features"]["feature_dtype"] == "fp32"


def test_train_command_reads_features_from_store(computed, reference_losses, tmp_path, capsys):
    """`blockskip train --features URI`: same losses as in-process features; a mismatched flag is a clear error."""
    import json

    from blockskip_ray.cli import main

    spec, family, plan, skip, text, feats = computed
    store = Store.open(str(tmp_path / "store"))
    write_features(store, "toy-1", text, feats, plan, meta_for(spec, family, skip, "fp32"))
    def args(out: str, steps: int = 6) -> list[str]:
        return ["train", "--model", spec.model, "--features", str(tmp_path / "store"), "--subject-id", "toy-1",
                "--prompt", spec.prompt, "--steps", str(steps), "--resolution", "32", "--s-max", "64",
                "--text-tokens", "16", "--samples", "0", "--rank", str(spec.optim.rank), "--lr", str(spec.optim.lr),
                "--out", str(tmp_path / out)]

    torch.manual_seed(0)
    assert main(args("a")) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["loss"] == reference_losses and metrics["skip"] == list(skip)
    assert (tmp_path / "a" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    assert main(args("b", steps=7)) == 2
    assert "steps" in capsys.readouterr().err and not (tmp_path / "b" / "adapter").exists()
