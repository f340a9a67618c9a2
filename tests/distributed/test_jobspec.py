"""Job spec validation (issue 14 item 8): every value and override is checked before anything starts, in `run`
and in `submit`; an explicit skip plan skips selection; YAML errors are one line with exit 2. No Ray cluster."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from blockskip_ray.cli import main as cli_main
from blockskip_ray.distributed import jobspec
from blockskip_ray.distributed.jobspec import load_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jobs/demo-tiny.yaml"


@pytest.mark.parametrize("override, message", [
    ("train.mode=foo", "train.mode: input should be 'blockskip', 'lora', 'naive-skip' or 'resize'"),
    ("train.lr=-1", "train.lr: input should be greater than 0"),
    ("train.steps=-5", "train.steps: input should be greater than or equal to 1"),
    ("train.skip_ratio=1.5", "train.skip_ratio: input should be less than 1"),
    ("precompute.feature_dtype=int4", "precompute.feature_dtype: input should be 'fp32', 'bf16' or 'fp8_e4m3'"),
    ("precompute.batch_sise=2", "unknown key 'precompute.batch_sise'"),
    ("train.skip=[1]", "train.skip: list should have at least 2 items"),
    ("train.skip=[1,-2]", "train.skip.1: input should be greater than or equal to 0"),
    ("train.rank=2.5", "train.rank: input should be a valid integer"),
    ("train.mixed_precision=fp16", "train.mixed_precision: input should be 'bf16' or 'fp32'"),
    ("train.s_max=32", "train.s_max (32) must be >= train.resolution (64)"),
    ("train.mode=lora", "train.mode=lora trains every block"),
    ("samples.steps=0", "samples.steps: input should be greater than or equal to 1"),
    ("ray.max_failures=-1", "ray.max_failures: input should be greater than or equal to 0"),
    ("ray.gpus_per_subject=-0.5", "ray.gpus_per_subject: input should be greater than or equal to 0"),
    ("selection.skip_ratios=[]", "selection.skip_ratios: list should have at least 1 item"),
    ("selection.skip_ratios=[0.3,1.2]", "selection.skip_ratios.1: input should be less than 1"),
    ("selection.options.stepz=3", "selection.options: unrecognized arguments: --stepz 3"),
    ("selection.options.steps=many", "selection.options: argument --steps: invalid int value: 'many'"),
    ("selection.options.model=x", "selection.options.model: set by the job"),
    ("strict=1", "strict: input should be a valid boolean"),
    ("model=tiny:dit", "expected tiny:flux or tiny:sana"),
    ("catalog=synthetic:0", "expected synthetic:N with N >= 1"),
    ("store=gs://b/p", "expected a local path or s3://bucket/prefix"),
])
def test_every_value_is_checked(override, message):
    with pytest.raises(ValueError) as e:
        load_spec(DEMO, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_values_and_the_job_files_pass():
    job = load_spec(DEMO, ["train.mode=lora", "train.skip_ratio=null", "precompute.enabled=false",
                           "selection.options.window=2", "train.lr=1", "ray.cpus_per_subject=2"])
    assert job.train.lr == 1.0 and isinstance(job.train.lr, float) and job.precompute.options() == {
        "feature_dtype": "fp32"}
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        load_spec(path)


def test_choices_match_the_code_they_configure():
    from blockskip_ray.distributed.precompute import PrecomputeConfig
    from blockskip_ray.method.modes import MODES
    from blockskip_ray.store.features import DTYPES
    assert set(typing.get_args(jobspec.MODES)) == set(MODES)
    assert set(typing.get_args(jobspec.FEATURE_DTYPES)) == set(DTYPES)
    knobs = {f.name for f in dataclasses.fields(jobspec.PrecomputeSection)} - {"enabled"}
    assert knobs <= {f.name for f in dataclasses.fields(PrecomputeConfig)}


def _cli(argv, capsys) -> tuple[int, str]:
    code = cli_main(argv)
    return code, capsys.readouterr().err


def test_yaml_syntax_error_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job_id: a\nmodel: m\ntrain: {steps: 3\n")
    for argv in (["run", str(bad)], ["submit", str(bad), "--address", "http://127.0.0.1:9"]):
        code, err = _cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "invalid YAML at line" in err, err
    bad.write_text("- a\n- b\n")
    code, err = _cli(["run", str(bad)], capsys)
    assert code == 2 and "expected a YAML mapping" in err


def test_run_and_submit_refuse_a_bad_value_before_starting(tmp_path, capsys, monkeypatch):
    import blockskip_ray.distributed.jobs as jobs
    import blockskip_ray.distributed.submit as submit

    def boom(*a, **k):
        raise AssertionError("started despite a bad spec")

    monkeypatch.setattr(jobs, "run_job", boom)
    monkeypatch.setattr(submit, "client", boom)
    code, err = _cli(["run", str(DEMO), "train.lr=-1"], capsys)
    assert code == 2 and "train.lr: input should be greater than 0" in err
    code, err = _cli(["submit", str(DEMO), "--address", "http://127.0.0.1:9", "train.steps=-5"], capsys)
    assert code == 2 and "train.steps: input should be greater than or equal to 1" in err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from blockskip_ray.models.tiny import init_model
    return str(init_model("flux", tmp_path_factory.mktemp("model") / "tiny-flux"))


def _spec(tiny: str, tmp_path: Path, *overrides: str):
    from blockskip_ray.method.images import make_synthetic_subject
    make_synthetic_subject(tmp_path / "a", n=3, size=64, seed=0)
    (tmp_path / "cat.jsonl").write_text('{"id": "a", "images": "%s", "prompt": "p"}\n' % (tmp_path / "a"))
    return load_spec({"job_id": "j", "model": tiny, "catalog": str(tmp_path / "cat.jsonl"),
                      "store": str(tmp_path / "store"), "work_dir": str(tmp_path / "work"),
                      "train": {"resolution": 64}, "selection": {"enabled": True}}, list(overrides))


def test_model_checks_run_before_ray_or_status(tiny, tmp_path, monkeypatch):
    import blockskip_ray.distributed.jobs as jobs
    monkeypatch.setattr(jobs, "init_ray", lambda *a, **k: pytest.fail("Ray started despite a bad skip plan"))
    for override, message in (("train.skip=[30,30]", "train.skip: skip plan 30,30 leaves no block to train"),
                              ("train.resolution=72", "train.resolution=72 must be a multiple of 16"),
                              ("samples.size=40", "samples.size=40 must be a multiple of 16")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            jobs.run_job(_spec(tiny, tmp_path, override), log=lambda m: None)
    assert not (tmp_path / "store" / "jobs").exists()  # no status table was written


def test_explicit_skip_plan_skips_selection(tiny, tmp_path, monkeypatch):
    import blockskip_ray.distributed.jobs as jobs
    import blockskip_ray.distributed.training as training
    seen = {}

    def fit(job, store, sid, spec, images, prompts):
        seen[sid] = spec.skip
        return {"loss": [1.0]}

    monkeypatch.setattr(jobs, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(jobs, "precompute_stage", lambda *a, **k: {})
    monkeypatch.setattr(jobs, "selection_lookup", lambda *a, **k: pytest.fail("selection ran with train.skip set"))
    monkeypatch.setattr(training, "fit_subject", fit)
    logs: list[str] = []
    result = jobs.run_job(_spec(tiny, tmp_path, "train.skip=[1,2]"), log=logs.append)
    assert result.succeeded == ["a"] and seen == {"a": (1, 2)}
    assert any("selection: not run (train.skip=[1, 2]" in m for m in logs)
    # the same job with a ratio does ask for the selection table
    monkeypatch.setattr(jobs, "selection_lookup", lambda *a, **k: seen.setdefault("lookup", None))
    jobs.run_job(_spec(tiny, tmp_path / "r", "overwrite=true", "job_id=j2"), log=lambda m: None)
    assert "lookup" in seen
