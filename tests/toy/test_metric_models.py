"""Toy metric models plug into the DINO / CLIP metric path like saved transformers models."""
from __future__ import annotations

import pytest
import torch

from blockskip_ray.probe.metrics import ClipEmbedder, DinoEmbedder, score_subject
from blockskip_ray.toy.domain import eval_prompts, subject_images
from blockskip_ray.toy.metric_models import MetricConfig, TextBigram, train_metric_models


@pytest.fixture(scope="module")
def toy_metrics(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-metrics")
    report = train_metric_models(MetricConfig(images=32, steps=2, batch=8), out)
    return out, report


def test_toy_metric_dirs_load_through_the_embedders(toy_metrics):
    out, report = toy_metrics
    assert 0.0 <= report["dino_heldout_retrieval_top1"] <= 1.0
    assert set(report) >= {"clip_heldout_caption_10way", "clip_heldout_background_6way"}
    dino, clip = DinoEmbedder(out / "dino"), ClipEmbedder(out / "clip")
    ims = subject_images(0, n=3)
    z = dino.embed(ims)
    assert z.shape == (3, 64) and torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    zi, zt = clip.images(ims), clip.texts(["a toy on a pink background", "a red toy"])
    assert zi.shape == (3, 64) and zt.shape == (2, 64)
    scores = score_subject({p: ims[:1] for p in eval_prompts()[:2]}, ims, dino, clip)
    assert len(scores.rows) == 2 and -1.0 <= scores.dino <= 1.0


def test_wrong_kind_is_refused(toy_metrics):
    out, _ = toy_metrics
    with pytest.raises(ValueError, match="toy 'clip' metric model, not the 'dino' one"):
        DinoEmbedder(out / "clip")
    with pytest.raises(ValueError, match="toy 'dino' metric model, not the 'clip' one"):
        ClipEmbedder(out / "dino")


def test_text_encoder_is_order_aware_and_ignores_unknown_words():
    torch.manual_seed(0)
    t = TextBigram(["a", "red", "blue", "toy", "with", "ears"])
    a, b = t(["a red toy with blue ears", "a blue toy with red ears"])
    assert not torch.allclose(a, b)  # same bag of words, different binding
    c, d = t(["a sks toy with blue ears", "a toy with blue ears"])
    assert torch.allclose(c, d)  # the subject token is not a domain word
