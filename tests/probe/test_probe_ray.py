"""Probes on a real local Ray (2 CPUs) with the tiny FLUX model: fan-out, table in a local store, lookup."""
from __future__ import annotations

import argparse
import json

import pytest
import ray
import torch

from blockskip_ray.commands import select as select_cmd
from blockskip_ray.distributed.probes import ProbeConfig, ProbeSubject, run_probe
from blockskip_ray.method.images import make_synthetic_subject
from blockskip_ray.method.personalize import TrainSpec, resolve_skip
from blockskip_ray.models.tiny import init_model
from blockskip_ray.probe.generate import ProbeWorker
from blockskip_ray.probe.search import cosine_distance, split_blocks
from blockskip_ray.probe.selection import load_selection, lookup_for, model_key
from blockskip_ray.probe.tiny_metrics import build_tiny_dino


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    model = init_model("flux", d / "tiny")
    dino = build_tiny_dino(d / "dino")
    subj = d / "toy"
    make_synthetic_subject(subj, n=2, size=64, seed=3)
    ray.init(address="local", num_cpus=2, log_to_driver=False)  # a fresh Ray, even if a `ray start` head runs here
    yield {"dir": d, "model": str(model), "dino": str(dino), "subject": str(subj)}
    ray.shutdown()


def _args(env, store, **kw):
    a = dict(model=env["model"], store=str(store), skip_ratios="0.1", window="9", prompts=["a photo of {subject}"],
             seeds="0", probe_subjects=[env["subject"]], steps=2, resolution=32, num_gpus=0.0, num_cpus=None,
             dino=env["dino"], finetune_steps=0, max_retries=1, ray_address="auto")
    a.update(kw)
    return argparse.Namespace(**a)


def test_fan_out_matches_local_generation(env):
    cfg = ProbeConfig(model=env["model"], subjects=[ProbeSubject("toy", env["subject"])], ratios=[0.1],
                      prompts=["a photo of {subject}"], seeds=[0], window=9, steps=2, resolution=32, dino=env["dino"],
                      device="cpu", max_retries=1)
    plan, doc = run_probe(cfg, 9, log=lambda s: None)
    assert doc["generations"] == 4  # reference, the one window (all 9 blocks), splits (0,1) and (1,0)
    w = ProbeWorker(env["model"], env["dino"], "cpu")  # the same generations in this process
    ref = torch.tensor(w.embed("a photo of toy", 0, frozenset(), 2, 32))
    for s in doc["splits"]["0.1"]:
        e = torch.tensor(w.embed("a photo of toy", 0, split_blocks(s["n"], s["m"], 9), 2, 32))
        assert s["distance"] == pytest.approx(cosine_distance(e, ref), abs=1e-6)
    assert doc["profile"][0]["distance"] > 0  # masking every block changes the image
    assert doc["table"]["0.1"] in ([0, 1], [1, 0])


def test_select_writes_table_and_lookup_uses_it(env, capsys):
    store = env["dir"] / "store"
    assert lookup_for(store, env["model"])(0.1) is None  # no table yet
    assert select_cmd.run(_args(env, store)) == 0
    out = json.loads(capsys.readouterr().out)
    key = model_key(env["model"])
    assert out["model_key"] == key
    base = store / "models" / key
    assert (base / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((base / "selection.json").read_text())
    assert doc["num_blocks"] == 9 and doc["window"] == 9 and doc["generations"] == 4
    assert doc["probe"]["subjects"] == ["toy"] and doc["dino_tiny_random"] is False
    assert load_selection(str(store), env["model"]) == doc
    n, m = doc["table"]["0.1"]
    lookup = lookup_for(str(store), env["model"])
    assert lookup(0.1) == (n, m) and lookup(0.3) is None
    spec = TrainSpec(model=env["model"], images=env["subject"], prompt="p", out="unused", skip_ratio=0.1)
    assert resolve_skip(spec, 9, lookup, log=lambda s: None) == (n, m)


@pytest.mark.parametrize("change,match", [
    (dict(model="/nonexistent/model"), "unknown model"),
    (dict(skip_ratios="1.0"), r"\[0, 1\)"),
    (dict(window="12"), "window 12 larger than the block count 9"),
    (dict(probe_subjects=["EMPTY"]), "no usable images"),
])
def test_bad_input_is_a_value_error_before_any_work(env, change, match, tmp_path):
    if change.get("probe_subjects") == ["EMPTY"]:
        (tmp_path / "empty").mkdir()
        change = dict(probe_subjects=[str(tmp_path / "empty")])
    with pytest.raises(ValueError, match=match):
        select_cmd.run(_args(env, tmp_path / "store", **change))
    assert not (tmp_path / "store" / "models").exists()


def test_table_for_another_block_count_is_refused(env, tmp_path):
    from blockskip_ray.probe.selection import write_selection

    key = model_key(env["model"])
    write_selection(str(tmp_path), {"model_key": key, "num_blocks": 57, "table": {"0.3": [8, 9]}})
    with pytest.raises(ValueError, match="57 blocks"):
        lookup_for(str(tmp_path), env["model"])


def test_probe_tasks_are_retried(env, tmp_path):
    from blockskip_ray.distributed.probes import _wait, task_options

    def _flaky(marker: str, x: int) -> int:  # local: pickled by value (workers cannot import test modules)
        from pathlib import Path

        if not Path(marker).exists():  # the first attempt fails, the retry succeeds
            Path(marker).touch()
            raise RuntimeError("transient failure")
        return 2 * x

    opts = task_options(ProbeConfig(model="m", subjects=[], ratios=[0.3], max_retries=1))
    refs = [ray.remote(_flaky).options(**opts).remote(str(tmp_path / "marker"), 21)]
    assert _wait(refs, "flaky", lambda s: None) == [42]
    opts["max_retries"] = 0
    refs = [ray.remote(_flaky).options(**opts).remote(str(tmp_path / "marker2"), 1)]
    with pytest.raises(Exception, match="transient failure"):
        _wait(refs, "flaky", lambda s: None)
