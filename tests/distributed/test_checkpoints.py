"""Issue 14 item 6: checkpoints carry sha256 manifests written at save and verified at resume; a damaged latest
checkpoint falls back to the previous good one, else the subject fails clearly (never a different adapter)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray.train import Checkpoint
from safetensors.torch import load_file, save_file

from blockskip_ray.distributed.checkpoints import MANIFEST, load_verified, verify, write_manifest


def _save(run: Path, name: str, step: int) -> Path:
    d = run / name
    d.mkdir(parents=True)
    save_file({"lora/w": torch.full((2, 2), float(step))}, str(d / "state.safetensors"))
    (d / "losses.json").write_text("[1.0]")
    write_manifest(d, step)
    return d


def _overwrite_tensor(d: Path) -> None:
    """A valid file with wrong values: what a manifest must catch (the file still loads)."""
    t = load_file(str(d / "state.safetensors"))
    t["lora/w"] += 1
    save_file(t, str(d / "state.safetensors"))


def _load(d: str) -> int:
    return int(load_file(str(Path(d) / "state.safetensors"))["lora/w"][0, 0])


def test_manifest_catches_wrong_values_missing_and_extra_files(tmp_path):
    d = _save(tmp_path, "checkpoint_1", 4)
    assert verify(d) == (4, None)
    _overwrite_tensor(d)
    assert verify(d)[1] == "sha256 mismatch in state.safetensors"
    d2 = _save(tmp_path, "checkpoint_2", 4)
    (d2 / "losses.json").unlink()
    assert verify(d2)[1] == "missing losses.json"
    d3 = _save(tmp_path, "checkpoint_3", 4)
    (d3 / "stray.bin").write_bytes(b"x")
    assert verify(d3)[1] == "unexpected stray.bin"
    (d3 / MANIFEST).unlink()
    assert "no manifest.json" in verify(d3)[1]


def test_damaged_latest_falls_back_to_the_previous_good_one(tmp_path):
    run = tmp_path / "run"
    _save(run, "checkpoint_2026-01-01_00-00-01.000000", 2)
    _save(run, "checkpoint_2026-01-01_00-00-02.000000", 4)
    latest = _save(run, "checkpoint_2026-01-01_00-00-03.000000", 6)
    logs: list[str] = []
    assert load_verified(Checkpoint.from_directory(str(latest)), _load, logs.append) == 6  # intact: itself
    _overwrite_tensor(latest)
    assert load_verified(Checkpoint.from_directory(str(latest)), _load, logs.append) == 4
    assert "is damaged (sha256 mismatch in state.safetensors); resuming from the earlier" in logs[-1]
    for d in run.iterdir():
        _overwrite_tensor(d)
    with pytest.raises(ValueError, match="is damaged .* and no earlier checkpoint of this run verifies"):
        load_verified(Checkpoint.from_directory(str(latest)), _load, logs.append)


def test_keep_checkpoints_reaches_ray_train(tmp_path):
    from blockskip_ray.distributed.jobspec import load_spec
    from blockskip_ray.distributed.training import make_trainer
    from blockskip_ray.store import Store
    job = load_spec({"job_id": "j", "model": "m", "train": {"keep_checkpoints": 3}})
    trainer = make_trainer(job, Store.open(str(tmp_path)), "a", {})
    assert trainer.run_config.checkpoint_config.num_to_keep == 3
    assert load_spec({"job_id": "j", "model": "m"}).train.keep_checkpoints == 2
    with pytest.raises(ValueError, match="train.keep_checkpoints"):
        load_spec({"job_id": "j", "model": "m"}, ["train.keep_checkpoints=0"])


def test_prune_keeps_the_newest(tmp_path):
    from blockskip_ray.distributed.checkpoints import prune
    from blockskip_ray.store import Store
    store = Store.open(str(tmp_path))
    run = "subjects/a/checkpoints/j-a"
    for i in range(4):
        store.write_bytes(f"{run}/checkpoint_2026-01-01_00-00-0{i}.000000/state.safetensors", b"x")
    store.write_bytes(f"{run}/checkpoint_manager_snapshot.json", b"{}")
    assert prune(store, run, 2) == ["checkpoint_2026-01-01_00-00-00.000000", "checkpoint_2026-01-01_00-00-01.000000"]
    assert sorted({k.split("/")[4] for k in store.list(run)}) == [
        "checkpoint_2026-01-01_00-00-02.000000", "checkpoint_2026-01-01_00-00-03.000000",
        "checkpoint_manager_snapshot.json"]
    assert prune(store, run, 2) == []
