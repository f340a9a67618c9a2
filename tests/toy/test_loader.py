"""toy:* model ids: resolution to the shipped weights, clear errors, hub ids still refused; toy:N catalogs."""
from __future__ import annotations

import json

import pytest

import blockskip_ray.toy as toy
from blockskip_ray.distributed.jobs import resolve_catalog, resolve_model
from blockskip_ray.distributed.jobspec import load_spec


def _job(tmp_path, model, catalog=None):
    return load_spec({"job_id": "t", "model": model, "catalog": catalog, "store": str(tmp_path / "s"),
                      "work_dir": str(tmp_path / "w")})


def test_toy_ids_resolve_to_the_shipped_directory(tmp_path, monkeypatch):
    fake = tmp_path / "weights" / "flux"
    fake.mkdir(parents=True)
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    monkeypatch.setitem(toy.TOY_MODELS, "toy:flux", fake)
    assert toy.resolve_model_arg("toy:flux") == str(fake)
    assert resolve_model(_job(tmp_path, "toy:flux"), log=lambda m: None) == str(fake)
    assert toy.resolve_model_arg("/some/local/dir") == "/some/local/dir"  # not a toy id: unchanged


def test_toy_id_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown toy model 'toy:sana'"):
        toy.resolve_model_arg("toy:sana")
    with pytest.raises(ValueError, match="only toy pipeline is toy:flux"):
        resolve_model(_job(tmp_path, "toy:dino"), log=lambda m: None)
    monkeypatch.setitem(toy.TOY_MODELS, "toy:flux", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="rebuild them with `python -m blockskip_ray.toy.pretrain"):
        toy.toy_model_dir("toy:flux")


def test_hub_ids_are_still_refused(tmp_path):
    with pytest.raises(ValueError, match="hub ids are not downloaded"):
        resolve_model(_job(tmp_path, "black-forest-labs/FLUX.1-dev"), log=lambda m: None)


def test_toy_catalog_writes_held_out_subjects(tmp_path):
    path = resolve_catalog(_job(tmp_path, "toy:flux", "toy:2"), log=lambda m: None)
    rows = [json.loads(line) for line in open(path)]
    assert [r["id"] for r in rows] == ["toy-0", "toy-1"]
    assert rows[0]["prompt"] == "a sks toy" and rows[0]["eval_prompts"]
    assert len(list((tmp_path / "w" / "catalog" / "toy-0").glob("*.png"))) == 5
    for bad in ("toy:0", "toy:99", "toy:x"):
        with pytest.raises(ValueError, match="expected toy:N"):
            resolve_catalog(_job(tmp_path, "toy:flux", bad), log=lambda m: None)


def test_generation_settings_follow_the_model(tiny_flux_dir, tmp_path):
    import shutil

    from blockskip_ray.method.features import FeatureComputer
    from blockskip_ray.method.modes import get_mode
    from blockskip_ray.models.loading import generation_kwargs, load_pipeline
    from blockskip_ray.probe.generate import generation_defaults

    pipe = load_pipeline(tiny_flux_dir)
    assert generation_kwargs(pipe) == {}  # the tiny random model keeps FluxPipeline's 512 text tokens
    assert FeatureComputer(pipe, (0, 0), get_mode("lora"), 512).max_text_tokens == 512
    pipe.tokenizer_2.model_max_length = 16  # a model trained with 16 text tokens (the toy model)
    assert generation_kwargs(pipe) == {"max_sequence_length": 16}
    assert FeatureComputer(pipe, (0, 0), get_mode("lora"), 512).max_text_tokens == 16
    assert FeatureComputer(pipe, (0, 0), get_mode("lora"), 8).max_text_tokens == 8
    assert generation_defaults(tiny_flux_dir) == {"steps": 4, "resolution": 64}
    toy_dir = tmp_path / "toy"
    shutil.copytree(tiny_flux_dir, toy_dir)
    (toy_dir / "blockskip_toy.json").write_text(json.dumps({"resolution": 32, "sample_steps": 20}))
    assert generation_defaults(toy_dir) == {"steps": 20, "resolution": 32}


def test_shipped_toy_model_loads_with_stock_pipeline():
    from diffusers import FluxPipeline

    d = toy.toy_model_dir("toy:flux")
    pipe = FluxPipeline.from_pretrained(str(d))
    cfg = pipe.transformer.config
    assert cfg.num_layers >= 4 and cfg.num_single_layers >= 8  # 30% / 50% skip ratios mean something
    assert pipe.vae_scale_factor == 4 and pipe.tokenizer_2.model_max_length == 16
    assert json.loads((d / "pretrain.json").read_text())["config"]["steps"] >= 1000
    for name in ("toy:dino", "toy:clip"):
        assert (toy.toy_model_dir(name) / "model.safetensors").is_file()
