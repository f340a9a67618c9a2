"""Gradients only on kept-block LoRA, loss goes down, checkpoints round-trip, features are deterministic."""
import pytest
import torch

from blockskip_ray.method.features import FeatureComputer
from blockskip_ray.method.images import load_images
from blockskip_ray.method.modes import get_mode
from blockskip_ray.method.sampling import PlanConfig, build_plan
from blockskip_ray.method.trainer import OptimConfig, SkipTrainer
from blockskip_ray.models.loading import load_kept_transformer, load_pipeline

SKIP = (2, 2)  # tiny FLUX: blocks 2..6 kept (one double + four single)


@pytest.fixture(scope="module")
def feats(tiny_flux_dir, subject_dir):
    images = load_images(subject_dir)
    plan = build_plan("s1", [im.size for im in images], PlanConfig(steps=4, s_min=64))
    fc = FeatureComputer(load_pipeline(tiny_flux_dir), SKIP, get_mode("blockskip"), max_text_tokens=16)
    text = fc.text("a photo of sks toy")
    return text, [fc.step(images[r["image_index"]], r, text) for r in plan], fc, images, plan


def _trainer(d, **kw):
    t, st = load_kept_transformer(d, [0, 1, 7, 8])
    return SkipTrainer(t, st, SKIP, get_mode("blockskip"), OptimConfig(rank=4, **kw))


def test_gradients_only_on_kept_block_lora(tiny_flux_dir, feats):
    text, steps, *_ = feats
    tr = _trainer(tiny_flux_dir)
    tr.train_step(text, steps[0])
    with_grad = {n for n, p in tr.t.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    kept_prefixes = ("transformer_blocks.2.", *(f"single_transformer_blocks.{i}." for i in range(4)))
    assert all(n.startswith(kept_prefixes) for n in with_grad)
    assert {n for n, p in tr.t.named_parameters() if p.requires_grad} == with_grad
    assert any(p.grad.abs().sum() > 0 for n, p in tr.t.named_parameters() if "lora_B" in n)


def test_loss_decreases_on_a_short_seeded_run(tiny_flux_dir, feats):
    text, steps, *_ = feats
    torch.manual_seed(0)
    tr = _trainer(tiny_flux_dir, lr=1e-2)
    with torch.no_grad():
        before = sum(tr.loss(text, f).item() for f in steps)
    for _ in range(10):
        for f in steps:
            tr.train_step(text, f)
    with torch.no_grad():
        after = sum(tr.loss(text, f).item() for f in steps)
    assert after < 0.9 * before


def test_checkpoint_round_trip_continues_identically(tiny_flux_dir, feats, tmp_path):
    text, steps, *_ = feats
    torch.manual_seed(0)
    a = _trainer(tiny_flux_dir, lr=1e-3)
    a.train_step(text, steps[0])
    a.save_checkpoint(tmp_path / "ck")
    torch.manual_seed(0)
    b = _trainer(tiny_flux_dir, lr=1e-3)
    assert b.load_checkpoint(tmp_path / "ck") == 1
    la = [a.train_step(text, f) for f in steps[1:]]
    lb = [b.train_step(text, f) for f in steps[1:]]
    assert la == lb
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))  # safetensors + JSON only


def test_features_are_deterministic(feats):
    text, steps, fc, images, plan = feats
    again = [fc.step(images[r["image_index"]], r, text) for r in plan]
    for x, y in zip(steps, again):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_gradient_checkpointing_matches(tiny_flux_dir, feats):
    text, steps, *_ = feats
    torch.manual_seed(0)
    a = _trainer(tiny_flux_dir, lr=1e-3)
    torch.manual_seed(0)
    b = _trainer(tiny_flux_dir, lr=1e-3, gradient_checkpointing=True)
    for f in steps[:2]:
        assert abs(a.train_step(text, f) - b.train_step(text, f)) < 1e-6
