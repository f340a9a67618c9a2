"""Packed training gives every subject the adapter it gets alone (fp32, CPU, tiny FLUX)."""
from __future__ import annotations

import pytest
import torch

from blockskip_ray.method.features import FeatureComputer
from blockskip_ray.method.images import load_images
from blockskip_ray.method.lora import add_lora, lora_state_dict
from blockskip_ray.method.modes import get_mode
from blockskip_ray.method.packed import PackedSubject, PackedTrainer, init_lora, lora_targets, run_packed
from blockskip_ray.method.sampling import PlanConfig, build_plan
from blockskip_ray.method.trainer import OptimConfig, SkipTrainer
from blockskip_ray.models.loading import load_kept_transformer, load_pipeline

SKIP = (2, 2)
SKIPPED = [0, 1, 7, 8]
CFG = OptimConfig(rank=4, lr=3e-3, grad_clip=0.05)  # a small clip, so clipping is active and per subject
# name: (prompt, steps, s_min, s_max, plan seed, LoRA seed): different crops, timesteps and step counts
SUBJECTS = {"a": ("a photo of sks toy", 3, 32, 64, 0, 11),
            "b": ("a red zxq mug on a table", 6, 48, 96, 1, 12),
            "c": ("a photo of pqr dog", 4, 32, 32, 2, 13)}


@pytest.fixture(scope="module")
def data(tiny_flux_dir, subject_dir):
    images = load_images(subject_dir)
    fc = FeatureComputer(load_pipeline(tiny_flux_dir), SKIP, get_mode("blockskip"), max_text_tokens=16)
    out = {}
    for name, (prompt, steps, s_min, s_max, seed, _) in SUBJECTS.items():
        plan = build_plan(name, [im.size for im in images], PlanConfig(steps=steps, s_min=s_min, s_max=s_max, seed=seed))
        text = fc.text(prompt)
        out[name] = (text, [(r["step"], fc.step(images[r["image_index"]], r, text)) for r in plan])
    return out


def alone(model, name, text, feats, cfg=CFG):
    t, st = load_kept_transformer(model, SKIPPED)
    torch.manual_seed(SUBJECTS[name][5])
    tr = SkipTrainer(t, st, SKIP, get_mode("blockskip"), cfg)
    for _, f in feats:
        tr.train_step(text, f)
    return lora_state_dict(tr.t)


def packed(model, data, slots, cfg=CFG, names=("a", "b", "c")):
    t, st = load_kept_transformer(model, SKIPPED)
    tr = PackedTrainer(t, st, SKIP, get_mode("blockskip"), cfg, slots=slots)
    got, failed, joins = {}, {}, []

    def subjects():
        for n in names:
            joins.append((n, {k: tr.steps(k) for k in tr.active}))
            yield PackedSubject(n, SUBJECTS[n][5], data[n][0], iter(data[n][1]))

    run_packed(tr, subjects(), on_done=lambda n, trn: got.__setitem__(n, trn.lora_state(n)),
               on_fail=lambda n, why: failed.__setitem__(n, why))
    return got, failed, joins, tr


def assert_close(x, y, tol=1e-5):
    assert x.keys() == y.keys()
    worst = max((x[k] - y[k]).abs().max().item() for k in x)
    assert worst <= tol, worst


def test_init_matches_peft(tiny_flux_dir):
    t, st = load_kept_transformer(tiny_flux_dir, SKIPPED)
    kept = range(2, st.num_blocks - 2)
    targets = lora_targets(t, st, kept)
    shapes = [(t.get_submodule(n).in_features, t.get_submodule(n).out_features) for n in targets]
    torch.manual_seed(5)
    add_lora(t, st, kept, rank=4)
    ref = lora_state_dict(t)
    mine = init_lora(shapes, 4, seed=5)
    assert len(ref) == 2 * len(targets)
    for n, (a, b) in zip(targets, mine):
        assert torch.equal(ref[f"{n}.lora_A.weight"], a) and torch.equal(ref[f"{n}.lora_B.weight"], b)


def test_three_subjects_packed_equal_three_separate_runs(tiny_flux_dir, data):
    shapes = {tuple(f["latent_hw"].tolist()) for n in data for _, f in data[n][1]}
    assert len(shapes) > 1  # crops of several sizes: samples with different token counts share packed steps
    ref = {n: alone(tiny_flux_dir, n, *data[n]) for n in data}
    got, failed, joins, _ = packed(tiny_flux_dir, data, slots=2)
    assert not failed
    # c joined when a (3 steps) finished, while b (6 steps) was still training
    assert joins[2][0] == "c" and joins[2][1] == {"b": 3}
    for n in data:
        assert_close(got[n], ref[n])
    assert max((got["b"][k] - ref["a"][k]).abs().max().item() for k in got["b"]) > 1e-3  # subjects differ


def test_gradient_checkpointing_and_one_slot_match(tiny_flux_dir, data):
    ref = alone(tiny_flux_dir, "b", *data["b"])
    from dataclasses import replace
    got, *_ = packed(tiny_flux_dir, data, slots=3, cfg=replace(CFG, gradient_checkpointing=True))
    assert_close(got["b"], ref)
    got1, *_ = packed(tiny_flux_dir, data, slots=1, names=("b",))
    assert_close(got1["b"], ref)


def test_non_finite_loss_fails_one_subject_only(tiny_flux_dir, data):
    text, feats = data["a"]
    bad = [(s, dict(f, target=f["target"] * float("nan")) if s == 1 else f) for s, f in feats]
    poisoned = dict(data, a=(text, bad))
    got, failed, _, tr = packed(tiny_flux_dir, poisoned, slots=3)
    assert list(failed) == ["a"] and "non-finite loss" in failed["a"] and "step 1" in failed["a"]
    assert_close(got["b"], alone(tiny_flux_dir, "b", *data["b"]))
    assert_close(got["c"], alone(tiny_flux_dir, "c", *data["c"]))
    assert not tr.active  # every slot freed


def test_checkpoint_resume_and_interchange_with_skiptrainer(tiny_flux_dir, data, tmp_path):
    text, feats = data["b"]
    ref = alone(tiny_flux_dir, "b", text, feats)
    t, st = load_kept_transformer(tiny_flux_dir, SKIPPED)
    tr = PackedTrainer(t, st, SKIP, get_mode("blockskip"), CFG, slots=2)
    tr.add("b", SUBJECTS["b"][5])
    for _, f in feats[:2]:
        tr.step({"b": (text, f)})
    tr.save_checkpoint("b", tmp_path / "ck")
    # resumed packed, in another trainer with another subject beside it
    t2, st2 = load_kept_transformer(tiny_flux_dir, SKIPPED)
    tr2 = PackedTrainer(t2, st2, SKIP, get_mode("blockskip"), CFG, slots=2)
    got = {}
    subjects = [PackedSubject("c", SUBJECTS["c"][5], *(data["c"][0], iter(data["c"][1]))),
                PackedSubject("b", SUBJECTS["b"][5], text, iter(feats), checkpoint=tmp_path / "ck")]
    run_packed(tr2, iter(subjects), on_done=lambda n, trn: got.__setitem__(n, trn.lora_state(n)))
    assert_close(got["b"], ref)
    # resumed alone, by SkipTrainer, from the packed checkpoint
    t3, st3 = load_kept_transformer(tiny_flux_dir, SKIPPED)
    torch.manual_seed(0)
    sk = SkipTrainer(t3, st3, SKIP, get_mode("blockskip"), CFG)
    assert sk.load_checkpoint(tmp_path / "ck") == 2
    for _, f in feats[2:]:
        sk.train_step(text, f)
    assert_close(lora_state_dict(sk.t), ref)


def test_bad_data_fails_alone_and_slots_are_checked(tiny_flux_dir, data):
    def broken():
        yield data["a"][1][0]
        raise ValueError("shard checksum mismatch")

    t, st = load_kept_transformer(tiny_flux_dir, SKIPPED)
    tr = PackedTrainer(t, st, SKIP, get_mode("blockskip"), CFG, slots=2)
    got, failed = {}, {}
    run_packed(tr, iter([PackedSubject("a", 11, data["a"][0], broken()),
                         PackedSubject("c", 13, *(data["c"][0], iter(data["c"][1])))]),
               on_done=lambda n, trn: got.__setitem__(n, trn.lora_state(n)),
               on_fail=lambda n, why: failed.__setitem__(n, why))
    assert failed == {"a": "ValueError: shard checksum mismatch"}
    assert_close(got["c"], alone(tiny_flux_dir, "c", *data["c"]))
    tr.add("x", 1)
    tr.add("y", 2)
    with pytest.raises(ValueError, match="all 2 slots are taken"):
        tr.add("z", 3)
    with pytest.raises(ValueError, match="already packed"):
        tr.add("x", 1)
