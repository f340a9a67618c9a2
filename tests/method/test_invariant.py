"""The method's core invariant (design section 2): at LoRA init (B = 0) the block-skipped model reproduces
the frozen full model on the same inputs; the naive skip does not."""
import pytest
import torch

from blockskip_ray.method.features import FeatureComputer, make_cond
from blockskip_ray.method.images import load_images
from blockskip_ray.method.modes import get_mode
from blockskip_ray.method.sampling import PlanConfig, build_plan
from blockskip_ray.method.trainer import OptimConfig, SkipTrainer
from blockskip_ray.models.loading import load_kept_transformer, load_pipeline


def _reference(pipe, family, text, feats):
    """The stock diffusers forward of the frozen full model (independent of the block-stack view)."""
    from blockskip_ray.models.stack import _flux_image_ids

    t = pipe.transformer
    with torch.no_grad():
        if family == "flux":
            hh, ww = (int(v) for v in feats["latent_hw"])
            return t(hidden_states=feats["x_t"], encoder_hidden_states=text["prompt_embeds"],
                     pooled_projections=text["pooled"], timestep=feats["sigma"], guidance=torch.full((1,), 3.5),
                     img_ids=_flux_image_ids(hh // 2, ww // 2, "cpu", torch.float32),
                     txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3)).sample
        return t(hidden_states=feats["x_t"], encoder_hidden_states=text["prompt_embeds"], timestep=feats["sigma"] * 1000,
                 encoder_attention_mask=text["prompt_mask"]).sample


@pytest.fixture(scope="module")
def setups(tiny_flux_dir, tiny_sana_dir, subject_dir):
    images = load_images(subject_dir)
    out = {}
    for family, d in (("flux", tiny_flux_dir), ("sana", tiny_sana_dir)):
        pipe = load_pipeline(d)
        plan = build_plan("s1", [im.size for im in images], PlanConfig(steps=2, s_min=64), 16 if family == "flux" else 4)
        out[family] = (d, pipe, images, plan)
    return out


# FLUX tiny: 3 double + 6 single. (1, 0) and (2, 1) cut inside the double blocks, (3, 0) at the seam,
# (5, 2) inside the single blocks; SANA tiny has 6 blocks.
CASES = [("flux", (0, 0)), ("flux", (0, 2)), ("flux", (1, 0)), ("flux", (2, 1)), ("flux", (3, 0)), ("flux", (5, 2)),
         ("flux", (4, 4)), ("sana", (0, 0)), ("sana", (2, 0)), ("sana", (0, 3)), ("sana", (2, 2))]


@pytest.mark.parametrize("family,skip", CASES)
def test_blockskip_at_init_equals_frozen_model(setups, family, skip):
    d, pipe, images, plan = setups[family]
    ref_fc = FeatureComputer(pipe, (0, 0), get_mode("lora"), max_text_tokens=16)
    fc = FeatureComputer(pipe, skip, get_mode("blockskip"), max_text_tokens=16)
    text = fc.text("a photo of sks toy")
    kept = range(skip[0], fc.stack.num_blocks - skip[1])
    t, stack = load_kept_transformer(d, [i for i in range(fc.stack.num_blocks) if i not in kept])
    trainer = SkipTrainer(t, stack, skip, get_mode("blockskip"), OptimConfig(rank=4))
    for row in plan:
        ref = _reference(pipe, family, text, ref_fc.step(images[row["image_index"]], row, text))
        feats = fc.step(images[row["image_index"]], row, text)
        assert ("h" in feats) == (skip[0] > 0) and ("delta" in feats) == (skip[1] > 0)
        with torch.no_grad():
            out = trainer.predict(text, feats)
        assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family,skip", [("flux", (2, 2)), ("sana", (2, 2))])
def test_naive_skip_differs(setups, family, skip):
    d, pipe, images, plan = setups[family]
    row = plan[0]
    text = FeatureComputer(pipe, (0, 0), get_mode("lora"), max_text_tokens=16).text("a photo of sks toy")
    ref = _reference(pipe, family, text, FeatureComputer(pipe, (0, 0), get_mode("lora"), max_text_tokens=16).step(images[row["image_index"]], row, text))
    fc = FeatureComputer(pipe, skip, get_mode("naive-skip"), max_text_tokens=16)
    feats = fc.step(images[row["image_index"]], row, text)
    assert "h" not in feats and "delta" not in feats
    kept = range(skip[0], fc.stack.num_blocks - skip[1])
    t, stack = load_kept_transformer(d, [i for i in range(fc.stack.num_blocks) if i not in kept])
    with torch.no_grad():
        out = SkipTrainer(t, stack, skip, get_mode("naive-skip"), OptimConfig(rank=4)).predict(text, feats)
    assert (out - ref).abs().max().item() > 1e-3
    assert make_cond(text, feats, 3.5, "cpu", torch.float32).latents is not None
