"""Adapters describe themselves and load in diffusers, peft and kohya/ComfyUI-style loaders; bytes are stable."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blockskip_ray.method.adapter_export import AdapterInfo, export_adapter, read_training_metadata
from blockskip_ray.method.lora import add_lora, lora_state_dict, target_regex
from blockskip_ray.models.stack import make_stack
from blockskip_ray.models.tiny import build_flux_pipeline, build_sana_pipeline

RANK, ALPHA = 4, 8.0
INFO = AdapterInfo(family="flux", base_model="flux-tiny", base_model_key="flux-tiny-0123456789ab",
                   prompt="a photo of sks toy", skip=(1, 2), num_blocks=9, mode="blockskip", steps=6, resolution=64,
                   s_max=None, rank=RANK, alpha=ALPHA, targets="attn", lr=1e-2, seed=0)


def _trained_state(transformer, targets="attn"):
    """LoRA on kept blocks 1..6 with non-zero B (as after training), seeded."""
    torch.manual_seed(0)
    add_lora(transformer, make_stack(transformer), range(1, 7), RANK, ALPHA, targets)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return lora_state_dict(transformer)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pipe = build_flux_pipeline()
    state = _trained_state(pipe.transformer)
    out = tmp_path_factory.mktemp("adapter")
    export_adapter(out, state, INFO)
    return out, state


def test_header_holds_training_metadata(exported):
    out, _ = exported
    meta = read_training_metadata(out / "pytorch_lora_weights.safetensors")
    assert meta["base_model"] == "flux-tiny" and meta["prompt"] == "a photo of sks toy" and meta["skip"] == [1, 2]
    assert meta["kept_blocks"] == [1, 6] and meta["steps"] == 6 and meta["resolution"] == 64
    assert meta["rank"] == RANK and meta["alpha"] == ALPHA and meta["targets"] == "attn"
    assert meta["project"] == "blockskip-ray" and meta["project_version"]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "8"
    card = (out / "README.md").read_text()
    assert "base_model: flux-tiny" in card and "sks toy" in card and "alpha 8" in card


def test_alpha_keys_follow_kohya_comfyui_convention(exported):
    out, state = exported
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    modules = {k.split(".lora_")[0] for k in state}
    alphas = {k for k in sd if k.endswith(".alpha")}
    # ComfyUI: "{key}.alpha" beside "{key}.lora_B.weight"; key = "transformer.<diffusers module>"
    assert alphas == {f"transformer.{m}.alpha" for m in modules}
    for m in modules:
        assert sd[f"transformer.{m}.alpha"].shape == () and float(sd[f"transformer.{m}.alpha"]) == ALPHA
        assert torch.equal(sd[f"transformer.{m}.lora_B.weight"], state[f"{m}.lora_B.weight"])


def test_diffusers_load_applies_alpha_over_rank(exported):
    out, state = exported
    pipe = build_flux_pipeline()
    pipe.load_lora_weights(str(out), adapter_name="subj")
    layers = {n: m for n, m in pipe.transformer.named_modules() if hasattr(m, "scaling") and "subj" in m.scaling}
    assert {n for n in layers} == {k.split(".lora_")[0] for k in state}
    for n, m in layers.items():
        assert m.scaling["subj"] == pytest.approx(ALPHA / RANK)
        assert torch.equal(m.lora_B["subj"].weight, state[f"{n}.lora_B.weight"])


def test_peft_from_pretrained(exported):
    from peft import PeftModel

    out, state = exported
    ref = build_flux_pipeline().transformer
    _trained_state(ref)
    model = PeftModel.from_pretrained(build_flux_pipeline().transformer, str(out))
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if hasattr(m, "scaling") and "default" in m.scaling}
    assert set(layers) == {k.split(".lora_")[0] for k in state}
    for n, m in layers.items():
        assert m.scaling["default"] == pytest.approx(ALPHA / RANK)
        assert torch.equal(m.lora_A["default"].weight, state[f"{n}.lora_A.weight"])
    # same function as the transformer the adapter came from
    x = {"hidden_states": torch.randn(1, 16, ref.config.in_channels), "encoder_hidden_states": torch.randn(1, 8, ref.config.joint_attention_dim),
         "pooled_projections": torch.randn(1, ref.config.pooled_projection_dim), "timestep": torch.tensor([0.5]),
         "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "guidance": torch.tensor([3.5])}
    with torch.no_grad():
        torch.testing.assert_close(model(**x).sample, ref(**x).sample)


SAVE = """
import sys, torch
from blockskip_ray.method.adapter_export import AdapterInfo, export_adapter
g = torch.Generator().manual_seed(0)
mods = [f"transformer_blocks.{i}.attn.{p}" for i in range(3) for p in ("to_q", "to_k", "to_v", "add_q_proj")]
state = {f"{m}.lora_{ab}.weight": torch.randn(4, 8, generator=g) for m in mods for ab in "AB"}
info = AdapterInfo(family="flux", base_model="m", base_model_key="m-0", prompt="p", skip=(1, 1), num_blocks=5,
                   mode="blockskip", steps=3, resolution=64, s_max=None, rank=4, alpha=4.0, targets="attn", lr=1e-4, seed=0)
export_adapter(sys.argv[1], state, info)
"""


def test_bytes_identical_across_processes(tmp_path):
    digests = []
    for i, seed in enumerate(("1", "2")):  # different hash seeds: set/dict-order bugs show up
        d = tmp_path / f"a{i}"
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
        subprocess.run([sys.executable, "-c", SAVE, str(d)], check=True, env=env)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())})
    assert digests[0] == digests[1] and len(digests[0]) == 4
    sd = load_file(tmp_path / "a0" / "pytorch_lora_weights.safetensors")  # the reference reader agrees
    assert len(sd) == 12 * 2 + 12 and json.loads((tmp_path / "a0" / "adapter_config.json").read_text())["r"] == 4


def test_ff_targets_match_diffusers_dreambooth_list():
    t = build_flux_pipeline().transformer
    state = _trained_state(t, "attn+ff")
    names = {k.split(".lora_")[0] for k in state}
    assert "transformer_blocks.1.ff.net.0.proj" in names and "transformer_blocks.1.ff_context.net.2" in names
    assert "single_transformer_blocks.0.attn.to_q" in names
    assert not any("proj_mlp" in n or n.endswith(".proj_out") for n in names)  # as the diffusers script: suffix match
    sana = build_sana_pipeline().transformer
    st = make_stack(sana)
    add_lora(sana, st, range(0, st.num_blocks), RANK, None, "attn+ff")
    assert any(".ff.conv_point.lora_A" in n for n, _ in sana.named_parameters())
    with pytest.raises(ValueError, match="attn, attn\\+ff"):
        target_regex(st, range(1), "ff")
