"""Catalog jobs: spec + overrides, catalog validation into the status table, failure isolation, resume equality.

One real local Ray (2 CPUs) for the module; a tiny FLUX model built once; a few training steps per subject.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockskip_ray.distributed.jobspec import JobSpec, load_spec
from blockskip_ray.store import ADAPTER_FILE, JobStatus, Store

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


# ------------------------------------------------------------------------------------ spec (no Ray)
def test_overrides_nested_and_typed(tmp_path):
    job = load_spec(ROOT / "jobs/demo-tiny.yaml",
                    ["train.steps=7", "model=/some/model", "catalog=cat.jsonl", "store=s3://b/p",
                     "ray.concurrency=3", "train.skip=[1,2]", "strict=true", "selection.skip_ratios=[0.2, 0.5]"])
    assert (job.train.steps, job.model, job.catalog, job.store) == (7, "/some/model", "cat.jsonl", "s3://b/p")
    assert job.ray.concurrency == 3 and job.train.skip == [1, 2] and job.strict is True
    assert job.selection.skip_ratios == [0.2, 0.5]
    assert job.train.resolution == 64  # untouched fields keep the YAML's values
    assert load_spec(ROOT / "jobs/demo-tiny.yaml", ["model=123"]).model == "123"  # string fields stay strings


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("nope=1", "unknown key 'nope'"),
    ("train.steps=many", "train.steps: input should be a valid integer"),
    ("ray.concurrency=0", "ray.concurrency: input should be greater than or equal to 1"),
    ("job_id=../x", "invalid job id"),
    ("train.steps", "not key=value"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_spec(ROOT / "jobs/demo-tiny.yaml", [override])


def test_unknown_yaml_key_and_every_job_file_parses(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job_id: a\nmodel: m\ntrain: {stpes: 3}\n")
    with pytest.raises(ValueError, match="unknown key.*train.stpes"):
        load_spec(bad)
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# blockskip "), f"{path.name}: first line must show the command"
        assert isinstance(load_spec(path), JobSpec)


def test_demo_yaml_is_embedded_verbatim():
    from blockskip_ray.commands.demo import DEMO_JOB_YAML
    assert (ROOT / "jobs/demo-toy.yaml").read_text() == DEMO_JOB_YAML


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never join a cluster running on this machine
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from blockskip_ray.models.tiny import init_model
    return str(init_model("flux", tmp_path_factory.mktemp("model") / "tiny-flux"))


def _catalog(root: Path, rows: list[dict]) -> str:
    from blockskip_ray.method.images import make_synthetic_subject
    for r in rows:
        if isinstance(r.get("images"), str) and r["images"].startswith("gen:"):
            d = root / r["images"][4:]
            make_synthetic_subject(d, n=3, size=96, seed=len(r["id"]))
            r["images"] = str(d)
    path = root / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _job(tiny: str, catalog: str, store: Path, job_id: str, **extra) -> JobSpec:
    data = {"job_id": job_id, "model": tiny, "catalog": catalog, "store": str(store),
            "work_dir": str(store.parent / "work"),
            "train": {"steps": STEPS, "resolution": 64, "max_text_tokens": 16, "checkpoint_every": 2, "rank": 4,
                      "lr": 1e-3, "skip_ratio": 0.3},
            "samples": {"num": 1, "steps": 2, "size": 64},
            "ray": {"concurrency": 2, "max_failures": 0}, "selection": {"enabled": False}}
    for k, v in extra.items():
        data.setdefault(k, {}).update(v) if isinstance(v, dict) else data.__setitem__(k, v)
    return load_spec(data)


def _adapter(store: Path, sid: str) -> dict[str, torch.Tensor]:
    return load_file(str(store / "subjects" / sid / "adapter" / ADAPTER_FILE))


# ------------------------------------------------------------------------------------ validation
def test_catalog_validation_marks_bad_rows_failed_and_strict_refuses(tmp_path, tiny):
    from blockskip_ray.distributed.jobs import validate_catalog
    cat = _catalog(tmp_path, [
        {"id": "good", "images": "gen:good", "prompt": "a photo of sks toy"},
        {"id": "../evil", "images": "gen:evil", "prompt": "p"},
        {"id": "good", "images": "gen:dup", "prompt": "p"},
        {"id": "nodir", "images": str(tmp_path / "missing"), "prompt": "p"},
    ])
    (Path(cat).parent / "catalog.jsonl").open("a").write("{not json\n")
    store = Store.open(str(tmp_path / "store"))
    status = JobStatus(store, "j1")
    valid, failed = validate_catalog(_job(tiny, cat, tmp_path / "store", "j1"), status, cat, log=lambda m: None)
    assert [s.id for s in valid] == ["good"]
    rows = {r["subject_id"]: r for r in status.read()}
    assert set(rows) == {"row-2", "row-3", "nodir", "row-5"} == set(failed)
    assert all(r["state"] == "failed" and r["stage"] == "validate" for r in rows.values())
    assert "invalid subject id" in rows["row-2"]["error"] and "duplicate id" in rows["row-3"]["error"]
    assert "does not exist" in rows["nodir"]["error"] and "not valid JSON" in rows["row-5"]["error"]
    status.compact()
    assert list(store.read_table("jobs/j1/status.parquet").column_names) == [
        "job_id", "subject_id", "stage", "state", "error", "attempts", "started_at", "finished_at"]
    strict = JobStatus(store, "j2")
    with pytest.raises(ValueError, match="4 invalid row"):
        validate_catalog(_job(tiny, cat, tmp_path / "store", "j2", strict=True), strict, cat, log=lambda m: None)
    assert strict.read() == []  # refused before any work or status


# ------------------------------------------------------------------------------------ jobs on Ray
@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny, ray_local):
    """A 2-subject job (+ one invalid row): toy-a is good, toy-bad has an unreadable image; via `blockskip run`."""
    from blockskip_ray.commands import run as run_cmd
    root = tmp_path_factory.mktemp("ref")
    cat = _catalog(root, [
        {"id": "toy-a", "images": "gen:a", "prompt": "a photo of sks toy", "eval_prompts": ["sks toy on a beach"]},
        {"id": "toy-bad", "images": "gen:bad", "prompt": "a photo of sks toy"},
        {"id": "bad id!", "images": "gen:x", "prompt": "p"},
    ])
    (root / "bad" / "img_00.png").write_bytes(b"definitely not a png")
    job_yaml = root / "job.yaml"
    import yaml
    spec = _job(tiny, cat, root / "store", "ref")
    job_yaml.write_text(yaml.safe_dump(spec.to_dict()))
    code = run_cmd.run(argparse.Namespace(job=str(job_yaml), store=None, overrides=["samples.eval=true"]))
    return {"root": root, "store": root / "store", "catalog": cat, "code": code, "yaml": job_yaml}


def test_bad_subject_fails_alone_and_exit_is_nonzero(reference, capsys):
    assert reference["code"] == 1
    store = reference["store"]
    rows = {r["subject_id"]: r for r in JobStatus(Store.open(str(store)), "ref").read()}
    assert rows["toy-a"]["state"] == "succeeded" and rows["toy-a"]["attempts"] == 1
    # image headers are read at catalog validation (the pixel budget), so an unreadable image fails there
    assert rows["toy-bad"]["state"] == "failed" and rows["toy-bad"]["stage"] == "validate"
    assert "is not a readable image" in rows["toy-bad"]["error"]
    assert rows["row-3"]["state"] == "failed" and rows["row-3"]["stage"] == "validate"
    sub = store / "subjects" / "toy-a"
    assert (sub / "adapter" / ADAPTER_FILE).is_file()
    assert sorted(p.name for p in (sub / "samples").glob("*.png")) == ["eval_00.png", "sample_00.png"]
    metrics = json.loads((sub / "metrics.json").read_text())
    assert len(metrics["loss"]) == STEPS and metrics["resumed_from_step"] is None
    kept = sorted(d for d in (sub / "checkpoints" / "ref-toy-a").glob("checkpoint_*") if d.is_dir())  # not Ray's snapshot file
    assert len(kept) == 2  # 3 saved (steps 2, 4, 6), pruned to train.keep_checkpoints (default 2)
    assert all((c / "manifest.json").is_file() for c in kept)
    assert not (store / "subjects" / "toy-bad" / "adapter").exists()
    assert not (sub / "features").exists()  # deleted once the adapter was written (keep_features: false)
    import pyarrow.parquet as pq
    table = pq.read_table(store / "jobs" / "ref" / "status.parquet")  # compacted at the job's end
    assert set(table.column("job_id").to_pylist()) == {"ref"} and not list((store / "jobs" / "ref").glob("status-events/*"))
    assert str(table.schema.field("finished_at").type) == "timestamp[us, tz=UTC]"
    from blockskip_ray.commands import status as status_cmd
    assert status_cmd.run(argparse.Namespace(job_id="ref", store=str(store), json=False)) == 0
    out = capsys.readouterr().out
    assert "3 subjects (1 succeeded, 2 failed)" in out and "toy-bad" in out and "validate" in out


def test_rerun_keeps_finished_subjects(reference, tmp_path):
    from blockskip_ray.distributed.jobs import run_job
    store = reference["store"]
    before = (store / "subjects/toy-a/adapter" / ADAPTER_FILE).stat().st_mtime_ns
    # The same job again, its catalog without the broken subject (so no training runs at all).
    rows = [json.loads(line) for line in Path(reference["catalog"]).read_text().splitlines()]
    cat = tmp_path / "catalog.jsonl"
    cat.write_text(json.dumps(rows[0]) + "\n")
    result = run_job(load_spec(reference["yaml"], [f"catalog={cat}"]), log=lambda m: None)
    assert result.skipped == ["toy-a"] and not result.succeeded and not result.failed
    assert (store / "subjects/toy-a/adapter" / ADAPTER_FILE).stat().st_mtime_ns == before
    rows = {r["subject_id"]: r for r in JobStatus(Store.open(str(store)), "ref").read()}
    assert (rows["toy-a"]["state"], rows["toy-a"]["attempts"]) == ("succeeded", 1)
    assert result.metrics["toy-a"]["loss"]  # the summary still reports the finished subject


def _good_only(reference, root: Path) -> str:
    rows = [json.loads(line) for line in Path(reference["catalog"]).read_text().splitlines()]
    return _catalog(root, [rows[0]])


def test_worker_crash_retried_by_ray_train_resumes_exactly(reference, tiny, tmp_path, monkeypatch):
    from blockskip_ray.distributed.jobs import run_job
    monkeypatch.setenv("BLOCKSKIP_FAULT", f"toy-a:{STEPS - 1}:exit")  # last checkpoint before the crash: step 4
    job = _job(tiny, _good_only(reference, tmp_path), tmp_path / "store", "retry",
               ray={"max_failures": 1}, samples={"eval": True}, keep_features=True)
    result = run_job(job, log=lambda m: None)
    assert result.succeeded == ["toy-a"], result.failed
    assert (tmp_path / "store/subjects/toy-a/features/_COMMITTED").is_file()  # keep_features: true
    assert result.metrics["toy-a"]["resumed_from_step"] in (2, 4)
    ref, got = _adapter(reference["store"], "toy-a"), _adapter(tmp_path / "store", "toy-a")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert json.loads((tmp_path / "store/subjects/toy-a/metrics.json").read_text())["loss"] == \
        json.loads((reference["store"] / "subjects/toy-a/metrics.json").read_text())["loss"]


def test_failed_subject_resumes_on_job_rerun_exactly(reference, tiny, tmp_path, monkeypatch):
    from blockskip_ray.distributed.jobs import run_job
    monkeypatch.setenv("BLOCKSKIP_FAULT", f"toy-a:{STEPS - 1}:raise")
    job = _job(tiny, _good_only(reference, tmp_path), tmp_path / "store", "rerun", samples={"eval": True})
    first = run_job(job, log=lambda m: None)
    assert "injected fault at step 5" in first.failed["toy-a"]
    row = JobStatus(Store.open(str(tmp_path / "store")), "rerun").read()[0]
    assert (row["state"], row["stage"]) == ("failed", "train")
    monkeypatch.delenv("BLOCKSKIP_FAULT")
    second = run_job(job, log=lambda m: None)
    assert second.succeeded == ["toy-a"] and second.metrics["toy-a"]["resumed_from_step"] in (2, 4)
    row = JobStatus(Store.open(str(tmp_path / "store")), "rerun").read()[0]
    assert (row["state"], row["attempts"]) == ("succeeded", 2)
    ref, got = _adapter(reference["store"], "toy-a"), _adapter(tmp_path / "store", "toy-a")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # issue 13 item 4: the resumed run's adapter files are byte-identical to the uninterrupted run's
    for name in (ADAPTER_FILE, "adapter_config.json"):
        assert (tmp_path / "store/subjects/toy-a/adapter" / name).read_bytes() == \
            (reference["store"] / "subjects/toy-a/adapter" / name).read_bytes(), name


def test_damaged_latest_checkpoint_resumes_from_the_previous_one_exactly(reference, tiny, tmp_path, monkeypatch):
    """Issue 14 item 6 end to end: the latest checkpoint's tensor is overwritten (a valid file, wrong values)
    between a failed run and the rerun; the rerun falls back to the previous checkpoint and still ends with the
    reference adapter (before manifests it resumed from the damaged one and reported success)."""
    from safetensors.torch import save_file

    from blockskip_ray.distributed.jobs import run_job
    monkeypatch.setenv("BLOCKSKIP_FAULT", f"toy-a:{STEPS - 1}:raise")
    job = _job(tiny, _good_only(reference, tmp_path), tmp_path / "store", "damaged")
    assert "injected fault" in run_job(job, log=lambda m: None).failed["toy-a"]
    ckpts = sorted(d for d in (tmp_path / "store/subjects/toy-a/checkpoints/damaged-toy-a").glob("checkpoint_*")
                   if d.is_dir())  # checkpoint_manager_snapshot.json is Ray's file, not a checkpoint
    assert len(ckpts) == 2  # steps 2 and 4
    state = load_file(str(ckpts[-1] / "state.safetensors"))
    key = next(k for k in state if k.startswith("lora/"))
    state[key] = state[key] + 0.5
    save_file(state, str(ckpts[-1] / "state.safetensors"))
    monkeypatch.delenv("BLOCKSKIP_FAULT")
    second = run_job(job, log=lambda m: None)
    assert second.succeeded == ["toy-a"] and second.metrics["toy-a"]["resumed_from_step"] == 2
    ref, got = _adapter(reference["store"], "toy-a"), _adapter(tmp_path / "store", "toy-a")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
