import json

import torch
from diffusers import FluxPipeline, SanaPipeline

from blockskip_ray.cli import main


def test_init_model_cli_writes_loadable_flux(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["init-model", "--family", "flux", "--size", "tiny", str(out)]) == 0
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["num_layers"] >= 3 and cfg["num_single_layers"] >= 6
    pipe = FluxPipeline.from_pretrained(out)
    im = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (64, 64)


def test_tiny_sana_loads_and_runs(tiny_sana_dir):
    pipe = SanaPipeline.from_pretrained(tiny_sana_dir)
    im = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, use_resolution_binning=False,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (64, 64)


def test_init_model_refuses_nonempty_dir(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["init-model", "--family", "sana", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"
