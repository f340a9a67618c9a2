"""Long-lived pool workers (ray.workers > 0): packed subjects give the adapters of lone runs, a failing subject
fails alone, a killed worker is restarted and its subjects resume from their checkpoints."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockskip_ray.store import ADAPTER_FILE, JobStatus, Store

_spec = importlib.util.spec_from_file_location("_jobs_tests", Path(__file__).parent / "test_jobs.py")
_jt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_jt)
_catalog, _job, STEPS = _jt._catalog, _jt._job, _jt.STEPS
ray_local, tiny = _jt.ray_local, _jt.tiny


def _adapter(store: Path, sid: str) -> dict[str, torch.Tensor]:
    return load_file(str(store / "subjects" / sid / "adapter" / ADAPTER_FILE))


def _pool_job(tiny, root: Path, ids, **extra):
    cat = _catalog(root, [{"id": i, "images": f"gen:{i}", "prompt": f"a photo of {i}"} for i in ids])
    return _job(tiny, cat, root / "store", "pool", ray={"workers": 1, "pack": 2, "max_failures": 1},
                samples={"num": 0}, keep_features=True, **extra)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory, tiny, ray_local):
    """3 good subjects and one whose training raises (BLOCKSKIP_FAULT raise), 1 worker packing 2."""
    from blockskip_ray.distributed.jobs import run_job
    root = tmp_path_factory.mktemp("pool")
    mp = pytest.MonkeyPatch()
    mp.setenv("BLOCKSKIP_FAULT", "toy-f:3:raise")
    job = _pool_job(tiny, root, ["toy-a", "toy-bb", "toy-ccc", "toy-f"])
    try:
        result = run_job(job, log=lambda m: None)
    finally:
        mp.undo()
    return {"root": root, "store": root / "store", "job": job, "result": result}


def test_pool_trains_every_subject_like_a_lone_run(pooled, tiny, tmp_path):
    from blockskip_ray.method.lora import lora_state_dict
    from blockskip_ray.method.personalize import write_outputs
    from blockskip_ray.method.stored import train_from_store
    from blockskip_ray.distributed.training import subject_train_spec
    r, store = pooled["result"], pooled["store"]
    assert sorted(r.succeeded) == ["toy-a", "toy-bb", "toy-ccc"]
    assert list(r.failed) == ["toy-f"] and "injected fault at step 3" in r.failed["toy-f"]
    rows = {x["subject_id"]: x for x in JobStatus(Store.open(str(store)), "pool").read()}
    assert {k: v["state"] for k, v in rows.items()} == {"toy-a": "succeeded", "toy-bb": "succeeded",
                                                         "toy-ccc": "succeeded", "toy-f": "failed"}
    assert rows["toy-f"]["stage"] == "train" and rows["toy-a"]["attempts"] == 1
    for sid in r.succeeded:
        m = r.metrics[sid]
        assert len(m["loss"]) == STEPS and m["pool"] and m["pack"] == 2 and m["resumed_from_step"] is None
        spec = subject_train_spec(pooled["job"], str(Path(tiny)), sid, f"a photo of {sid}", "", tuple(m["skip"]),
                                  out=str(tmp_path / sid))
        trainer, _, _ = train_from_store(spec, Store.open(str(store)), sid, torch.device("cpu"), log=lambda _: None)
        write_outputs(spec, "flux", lora_state_dict(trainer.t), {"skip": m["skip"]}, [])
        ref, got = load_file(str(tmp_path / sid / "adapter" / ADAPTER_FILE)), _adapter(store, sid)
        assert ref.keys() == got.keys()
        assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5
        # the same self-description (metadata, peft config) as a lone run; the tensors agree to 1e-5, not bitwise
        assert (tmp_path / sid / "adapter" / "adapter_config.json").read_bytes() == \
            (store / "subjects" / sid / "adapter" / "adapter_config.json").read_bytes()
        from blockskip_ray.distributed.pool import ckpt_prefix
        assert not Store.open(str(store)).list(ckpt_prefix(sid, "pool"))  # removed once the adapter is written


def test_killed_worker_is_restarted_and_its_subjects_resume(pooled, tiny, tmp_path, monkeypatch):
    from blockskip_ray.distributed.jobs import run_job
    monkeypatch.setenv("BLOCKSKIP_FAULT", "toy-a:4:exit")  # the worker process dies before step 4 (last ckpt: 2)
    result = run_job(_pool_job(tiny, tmp_path, ["toy-a", "toy-bb"]), log=lambda m: None)
    assert sorted(result.succeeded) == ["toy-a", "toy-bb"], result.failed
    assert result.metrics["toy-a"]["resumed_from_step"] == 2
    for sid in ("toy-a", "toy-bb"):
        ref, got = _adapter(pooled["store"], sid), _adapter(tmp_path / "store", sid)
        assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-5
    rows = {x["subject_id"]: x for x in JobStatus(Store.open(str(tmp_path / "store")), "pool").read()}
    assert rows["toy-a"]["state"] == "succeeded" and rows["toy-a"]["attempts"] == 2  # leased again after the restart


def test_pool_keys_are_checked():
    from blockskip_ray.distributed.jobspec import load_spec
    base = {"job_id": "j", "model": "tiny:flux"}
    spec = load_spec(base)
    assert (spec.ray.workers, spec.ray.pack, spec.keep_features) == (0, 4, False)  # the per-subject path
    for bad in ({"ray": {"workers": -1}}, {"ray": {"pack": 0}}, {"keep_features": "yes"}):
        with pytest.raises(ValueError):
            load_spec({**base, **bad})


def test_checkpoints_keep_only_the_latest(tmp_path, tiny):
    """_save_checkpoint writes step-N + latest.json, drops the older step, and _load_checkpoint reads it back."""
    from blockskip_ray.distributed.pool import _load_checkpoint, _save_checkpoint
    from blockskip_ray.method.modes import get_mode
    from blockskip_ray.method.packed import PackedTrainer
    from blockskip_ray.method.trainer import OptimConfig
    from blockskip_ray.models.loading import load_kept_transformer
    store = Store.open(str(tmp_path / "store"))
    t, st = load_kept_transformer(tiny, [0, 1, 7, 8])
    tr = PackedTrainer(t, st, (2, 2), get_mode("blockskip"), OptimConfig(rank=4), slots=1)
    tr.add("s", 0)
    tr.slots[0].steps = 2
    _save_checkpoint(store, tr, "s", "j", [1.0, 0.9], tmp_path / "w")
    tr.slots[0].steps = 4
    _save_checkpoint(store, tr, "s", "j", [1.0, 0.9, 0.8, 0.7], tmp_path / "w")
    assert sorted({k.split("/")[4] for k in store.list("subjects/s/checkpoints/pool-j") if "/step-" in k}) == ["step-000004"]
    d, losses, why = _load_checkpoint(store, "s", "j", tmp_path / "back")
    assert losses == [1.0, 0.9, 0.8, 0.7] and (d / "state.safetensors").is_file() and why is None
    assert _load_checkpoint(store, "other", "j", tmp_path / "none") == (None, [], None)


class _FakeTrainer:
    """What _save_checkpoint needs of a PackedTrainer: the step and a checkpoint writer."""

    def steps(self, sid):
        return 4

    def save_checkpoint(self, sid, d):
        from safetensors.torch import save_file
        d.mkdir(parents=True, exist_ok=True)
        save_file({"lora/x.lora_A.weight": torch.ones(2, 2)}, str(d / "state.safetensors"))
        (d / "meta.json").write_text('{"step": 4}')


def test_damaged_pool_checkpoint_is_never_resumed_from(tmp_path):
    """Issue 14 item 6 on the pool path: a checkpoint whose tensor was overwritten (a valid file, wrong
    values) or that lost a file is rejected by its sha256 manifest; the subject restarts from step 0."""
    from safetensors.torch import save_file

    from blockskip_ray.distributed.pool import _load_checkpoint, _save_checkpoint, ckpt_prefix
    store = Store.open(str(tmp_path / "store"))
    _save_checkpoint(store, _FakeTrainer(), "s1", "j", [0.5, 0.4, 0.3, 0.2], tmp_path / "w")
    ckpt, losses, why = _load_checkpoint(store, "s1", "j", tmp_path / "d1")
    assert ckpt is not None and losses == [0.5, 0.4, 0.3, 0.2] and why is None
    step_dir = tmp_path / "store" / ckpt_prefix("s1", "j") / "step-000004"
    save_file({"lora/x.lora_A.weight": torch.full((2, 2), 2.0)}, str(step_dir / "state.safetensors"))
    ckpt, losses, why = _load_checkpoint(store, "s1", "j", tmp_path / "d2")
    assert (ckpt, losses) == (None, []) and "sha256 mismatch in state.safetensors" in why and "step 0" in why
    (step_dir / "losses.json").unlink()
    assert "missing file" in _load_checkpoint(store, "s1", "j", tmp_path / "d3")[2]
