"""Score one personalized adapter with the paper's protocol (DINO, CLIP-I, CLIP-T).

For every prompt, `images_per_prompt` images are generated with seeds seed, seed+1, ... (the same seeds
for every prompt) by the stock pipeline with the adapter loaded, exactly as users will run it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..method.images import load_images
from ..models.loading import load_pipeline
from .generate import adapter_files, generate, generation_defaults, pick_device
from .metrics import ClipEmbedder, DinoEmbedder, SubjectScores, score_subject


@dataclass
class EvalSpec:
    model: str
    images: str  # reference images of the subject
    prompts: list[str]
    dino: str
    clip: str
    adapter: str | None = None  # None scores the base model (a baseline)
    subject_id: str = "subject"
    images_per_prompt: int = 4
    steps: int | None = None
    resolution: int | None = None
    seed: int = 0
    device: str = "auto"
    save_images: str | None = None


def evaluate(spec: EvalSpec, log=print) -> tuple[SubjectScores, list[dict]]:
    """Returns the subject's scores and one table row per generated image."""
    if not spec.prompts or any(not p.strip() for p in spec.prompts):
        raise ValueError("give at least one non-empty prompt")
    if spec.images_per_prompt < 1:
        raise ValueError(f"images per prompt must be >= 1, got {spec.images_per_prompt}")
    from ..toy import resolve_model_arg
    spec.model = resolve_model_arg(spec.model)  # toy:flux -> the shipped directory
    refs = load_images(spec.images)
    defaults = generation_defaults(spec.model)
    steps, size = spec.steps or defaults["steps"], spec.resolution or defaults["resolution"]
    if spec.adapter is not None:
        adapter_files(spec.adapter)  # a clear error before the pipeline loads
    dino, clip = DinoEmbedder(spec.dino), ClipEmbedder(spec.clip)  # fail on bad metric models early too
    device = pick_device(spec.device)
    pipe = load_pipeline(spec.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if spec.adapter is not None:
        pipe.load_lora_weights(str(spec.adapter))
    generated, seeds = {}, {}
    for p in spec.prompts:
        generated[p] = [generate(pipe, p, spec.seed + j, steps, size) for j in range(spec.images_per_prompt)]
        seeds[p] = [spec.seed + j for j in range(spec.images_per_prompt)]
        log(f"  generated {len(generated[p])} images for {p!r}")
    if spec.save_images:
        out = Path(spec.save_images)
        out.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(spec.prompts):
            for j, im in enumerate(generated[p]):
                im.save(out / f"p{i:02d}_{j:02d}.png")
    del pipe
    dino.model.to(device), clip.model.to(device)
    scores = score_subject(generated, refs, dino, clip)
    rows = [{"subject_id": spec.subject_id, "adapter": spec.adapter or "", "seed": seeds[r["prompt"]][r["index"]],
             "steps": steps, "resolution": size, **r} for r in scores.rows]
    return scores, rows


__all__ = ["EvalSpec", "evaluate"]
