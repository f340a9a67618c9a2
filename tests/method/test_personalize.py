"""End to end through `blockskip train`: adapter format, round trip into the stock pipeline, bad input."""
import json
import logging
import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.utils import logging as dlogging
from PIL import Image
from safetensors.torch import load_file

from blockskip_ray.cli import main

ARGS = ["--prompt", "a photo of sks toy", "--steps", "6", "--resolution", "64", "--text-tokens", "16",
        "--samples", "1", "--sample-steps", "2", "--lr", "1e-2", "--rank", "4"]


@pytest.fixture(scope="module")
def trained(tiny_flux_dir, subject_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["train", "--model", str(tiny_flux_dir), "--images", str(subject_dir), "--out", str(out),
                 "--skip", "1,2", *ARGS]) == 0
    return out


def test_metrics_and_outputs(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert len(m["loss"]) == 6 and m["skip"] == [1, 2] and m["num_blocks"] == 9
    assert m["peak_memory_bytes"] > 0 and m["steps_per_s"] > 0 and 0 < m["skipped_param_fraction"] < 1
    assert (trained / "plan.parquet").is_file() and len(list((trained / "samples").glob("*.png"))) == 1


def test_training_curves_written(trained):
    from test_curves import read_scalars

    assert [s for s, _ in read_scalars(trained / "logs")["train/loss"]] == list(range(1, 7))
    progress = json.loads((trained / "progress.json").read_text())
    assert progress["step"] == progress["steps"] == 6 and progress["loss"] == json.loads(
        (trained / "metrics.json").read_text())["loss"][-1]
    assert Image.open(trained / "loss_curve.png").size == (640, 400)
    assert Image.open(trained / "sample_grid.png").size[1] == 64 + 8


def test_adapter_keys_only_on_kept_blocks(trained):
    sd = load_file(trained / "adapter" / "pytorch_lora_weights.safetensors")
    assert sd and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k or k.endswith(".alpha"))
                      for k in sd)
    blocks = {".".join(k.split(".")[1:3]) for k in sd}
    kept = {"transformer_blocks.1", "transformer_blocks.2", *(f"single_transformer_blocks.{i}" for i in range(4))}
    assert blocks == kept


def test_adapter_round_trip_in_stock_pipeline(trained, tiny_flux_dir, caplog):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    base = pipe("a photo of sks toy", generator=torch.Generator().manual_seed(0), **kw).images[0]
    dlogging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(str(trained / "adapter"))
    finally:
        dlogging.disable_propagation()
    # diffusers' "No LoRA keys associated to CLIPTextModel ... if you think it's unexpected"
    # is expected (the adapter only touches the transformer); a key mismatch is not.
    msgs = [r.getMessage() for r in caplog.records]
    assert not [m for m in msgs if "unexpected keys" in m], msgs
    assert not [m for m in msgs if "No LoRA keys associated to Flux" in m], msgs
    tuned = pipe("a photo of sks toy", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert np.abs(base - tuned).max() > 1e-3


def test_resumed_run_writes_byte_identical_adapter(trained, tiny_flux_dir, subject_dir, tmp_path):
    """Issue 13 item 4: the same subject gives the same adapter bytes whether it ran straight or resumed."""
    import shutil

    first, resumed = tmp_path / "first", tmp_path / "resumed"
    base = ["train", "--model", str(tiny_flux_dir), "--images", str(subject_dir), "--skip", "1,2",
            "--checkpoint-every", "2", *ARGS[:-8], "--samples", "0", *ARGS[-6:]]
    assert main([*base, "--out", str(first)]) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
    assert main([*base, "--out", str(resumed)]) == 0
    files = sorted(p.name for p in (first / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"]
    for name in files:
        assert (first / "adapter" / name).read_bytes() == (resumed / "adapter" / name).read_bytes(), name
    # and the run without checkpoints (the `trained` fixture, same flags) holds the same weights file
    assert (trained / "adapter" / "pytorch_lora_weights.safetensors").read_bytes() == \
        (first / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()


def _bad(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return d


@pytest.mark.parametrize("setup,extra,msg", [
    ("missing", [], "does not exist"),
    ("zero", [], "no images"),
    ("empty_file", [], "empty"),
    ("corrupt", [], "not a readable image"),
    ("mode_f", [], "unsupported mode"),
    ("small", [], "smaller than s_min"),
    ("ok", ["--resolution", "72"], "multiple of 16"),
    ("ok", ["--s-max", "48"], "must not exceed"),
    ("ok", ["--skip", "5,4"], "leaves no block"),
    ("ok", ["--skip-ratio", "1.0"], r"\[0, 1\)"),
    ("ok", ["--skip-ratio", "-0.1"], r"\[0, 1\)"),
    ("badmodel", [], "unknown model"),
])
def test_bad_input_is_a_clear_error_and_leaves_nothing(setup, extra, msg, tmp_path, tiny_flux_dir, subject_dir, capsys):
    images, model = tmp_path / "imgs", str(tiny_flux_dir)
    if setup == "ok":
        images = subject_dir
    elif setup == "badmodel":
        images, model = subject_dir, str(tmp_path)
    elif setup != "missing":
        images.mkdir()
        if setup == "empty_file":
            (images / "a.png").write_bytes(b"")
        elif setup == "corrupt":
            (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        elif setup == "mode_f":
            Image.fromarray(np.zeros((128, 128), np.float32)).save(images / "a.tiff")  # 32-bit float: mode F
        elif setup == "small":
            Image.new("RGB", (48, 48)).save(images / "a.png")
    out = tmp_path / "out"
    assert main(["train", "--model", model, "--images", str(images), "--out", str(out), *ARGS, *extra]) == 2
    assert re.search(msg, capsys.readouterr().err)
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
