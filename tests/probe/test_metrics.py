"""DINO / CLIP-I / CLIP-T on tiny random models built locally (code path only: random weights)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from blockskip_ray.probe.metrics import (ClipEmbedder, DinoEmbedder, mean_pairwise_cosine, resolve_model_source,
                                         score_subject)
from blockskip_ray.probe.tiny_metrics import build_tiny_clip, build_tiny_dino


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("metric-models")
    return build_tiny_dino(d / "dino"), build_tiny_clip(d / "clip")


def _images(n: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def test_embeddings_are_unit_and_deterministic(models):
    dino, clip = DinoEmbedder(models[0]), ClipEmbedder(models[1])
    ims = _images(3, 0)
    for e in (dino.embed(ims), clip.images(ims), clip.texts(["a photo of sks toy", "a dog", "x"])):
        assert e.shape[0] == 3 and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(dino.embed(ims), dino.embed(ims))
    assert not torch.allclose(dino.embed(ims[:1]), dino.embed(ims[1:2]))
    a, b = clip.texts(["a dog", "a cat on a mat"])
    assert not torch.allclose(a, b)


def test_mean_pairwise_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0]])
    assert mean_pairwise_cosine(a, b) == pytest.approx(0.5)
    assert mean_pairwise_cosine(a, a) == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4


def test_score_subject_protocol(models):
    dino, clip = DinoEmbedder(models[0]), ClipEmbedder(models[1])
    refs = _images(3, 1)
    gen = {"a photo of sks toy": _images(2, 2), "a sks toy on the beach": _images(2, 3)}
    s = score_subject(gen, refs, dino, clip)
    assert len(s.rows) == 4
    all_gen = [im for ims in gen.values() for im in ims]
    assert s.dino == pytest.approx(float((dino.embed(all_gen) @ dino.embed(refs).T).mean()), abs=1e-6)
    assert s.clip_i == pytest.approx(float((clip.images(all_gen) @ clip.images(refs).T).mean()), abs=1e-6)
    want_t = [float(clip.images([im])[0] @ clip.texts([p])[0]) for p, ims in gen.items() for im in ims]
    assert s.clip_t == pytest.approx(sum(want_t) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="no reference"):
        score_subject(gen, [], dino, clip)


def test_load_from_store_uri(models, tmp_path):
    from blockskip_ray.store import Store

    store = Store.open(str(tmp_path / "store"))
    store.upload_dir(models[0], "metric-models/dino")
    local = resolve_model_source(f"file://{tmp_path / 'store'}/metric-models/dino", tmp_path / "cache")
    assert (local / "config.json").is_file() and local != models[0]
    ims = _images(2, 4)
    assert torch.equal(DinoEmbedder(local).embed(ims), DinoEmbedder(models[0]).embed(ims))
    with pytest.raises(FileNotFoundError):
        resolve_model_source(tmp_path / "nothing-here")
