"""The pixel multiple is VAE factor x patch size for every family (design section 2), and training reports the
training phase's own peak memory."""
import json

import pytest

from blockskip_ray.cli import main
from blockskip_ray.models.loading import pixel_multiple


@pytest.fixture(scope="module")
def sana_patch2_dir(tmp_path_factory):
    import torch
    from diffusers import SanaTransformer2DModel

    from blockskip_ray.models.configs import SANA_TINY
    from blockskip_ray.models.tiny import build_sana_pipeline

    pipe = build_sana_pipeline(seed=0)
    torch.manual_seed(1)
    pipe.transformer = SanaTransformer2DModel(**{**SANA_TINY, "patch_size": 2})
    out = tmp_path_factory.mktemp("models") / "sana-patch2"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_pixel_multiple(tiny_flux_dir, tiny_sana_dir, sana_patch2_dir):
    assert pixel_multiple(tiny_flux_dir) == 16  # VAE 8 x the pipeline's 2x2 latent packing
    assert pixel_multiple(tiny_sana_dir) == 4  # tiny DC-AE factor 4 x patch 1
    assert pixel_multiple(sana_patch2_dir) == 8  # factor 4 x patch 2


def test_train_sana_patch2(sana_patch2_dir, subject_dir, tmp_path):
    out = tmp_path / "out"
    rc = main(["train", "--model", str(sana_patch2_dir), "--images", str(subject_dir), "--out", str(out),
               "--prompt", "a photo of sks toy", "--steps", "4", "--resolution", "32", "--s-max", "60",
               "--text-tokens", "8", "--samples", "0", "--rank", "2", "--skip", "1,1"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["loss"]) == 4
    plan = __import__("pyarrow.parquet", fromlist=["x"]).read_table(out / "plan.parquet").to_pylist()
    assert all(r["crop_size"] % 8 == 0 for r in plan)


def test_train_rejects_resolution_off_the_multiple(sana_patch2_dir, subject_dir, tmp_path, capsys):
    rc = main(["train", "--model", str(sana_patch2_dir), "--images", str(subject_dir), "--out", str(tmp_path / "o"),
               "--prompt", "p", "--steps", "2", "--resolution", "36", "--samples", "0"])
    assert rc == 2 and "multiple of 8" in capsys.readouterr().err


def test_cpu_peak_memory_covers_the_training_phase():
    import resource

    import torch

    from blockskip_ray.method import personalize as P

    cpu = torch.device("cpu")
    big = torch.ones(128 * 2**20, dtype=torch.uint8)  # 128 MiB touched before the training window
    del big  # a large block goes back to the OS: RSS drops, the process peak stays
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    P.reset_peak_memory(cpu)
    peak, kind = P.peak_memory(cpu)
    if kind != "cpu_peak_rss_train":
        pytest.skip("this kernel does not allow resetting the RSS high-water mark")
    assert peak + 64 * 2**20 < process_peak  # the earlier 128 MiB is not in the training phase's peak


def test_metrics_label_the_training_phase(sana_patch2_dir, subject_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["train", "--model", str(sana_patch2_dir), "--images", str(subject_dir), "--out", str(out),
                 "--prompt", "p", "--steps", "2", "--resolution", "32", "--s-max", "60", "--text-tokens", "8",
                 "--samples", "0", "--rank", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["peak_memory_kind"] in ("cpu_peak_rss_train", "cpu_peak_rss_process") and m["peak_memory_bytes"] > 0
