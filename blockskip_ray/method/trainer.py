"""The block-skipped LoRA trainer: kept blocks on the leading state, + delta, head, flow-matching loss.

One step (design section 2):
    state  = leading features (h_n, e_n)        or the embedders when n = 0 / naive skip
    state  = kept blocks n .. N-m-1 (LoRA)        optionally gradient-checkpointed
    h      = h + delta                            the skipped trailing blocks' precomputed residual
    loss   = || head(h) - (noise - x0) ||^2       conditional flow matching (FLUX / SANA objective)
At LoRA initialization (B = 0) the prediction equals the frozen full model's: tests/method checks it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.stack import FluxStack, SanaStack, State
from .features import make_cond
from .lora import add_lora, lora_state_dict
from .modes import Mode


@dataclass(frozen=True)
class OptimConfig:
    rank: int = 16
    alpha: float | None = None  # LoRA scale = alpha / rank; None: alpha = rank
    targets: str = "attn"  # "attn" or "attn+ff" (method.lora.TARGET_CHOICES)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    guidance: float = 3.5
    gradient_checkpointing: bool = False
    mixed_precision: str = "bf16"  # used on CUDA only; CPU runs fp32


class SkipTrainer:
    def __init__(self, transformer: nn.Module, stack: FluxStack | SanaStack, skip: tuple[int, int], mode: Mode,
                 cfg: OptimConfig, device: torch.device | str = "cpu"):
        self.t, self.stack, self.mode, self.cfg = transformer, stack, mode, cfg
        self.n, self.m = skip
        self.kept = range(self.n, stack.num_blocks - self.m)
        self.device = torch.device(device)
        self.params = add_lora(transformer, stack, self.kept, cfg.rank, cfg.alpha, cfg.targets)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step_count = 0

    def predict(self, text: dict, feats: dict) -> torch.Tensor:
        dtype = self.stack._dtype()
        c = make_cond(text, feats, self.cfg.guidance, self.device, dtype)
        if self.mode.features and self.n:
            e = feats.get("e")
            s = State(feats["h"].to(self.device, dtype), None if e is None else e.to(self.device, dtype),
                      self.stack.context(c))
        else:
            s = self.stack.embed(c)
        for i in self.kept:
            if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
                h, e = checkpoint(_run_block, self.stack, i, s.h, s.e, s.ctx, use_reentrant=False)
                s = s.with_(h=h, e=e)
            else:
                s = self.stack.run_block(i, s)
        if self.mode.features and self.m:
            s = s.with_(h=s.h + feats["delta"].to(self.device, s.h.dtype))
        return self.stack.head(s, c)

    def loss(self, text: dict, feats: dict) -> torch.Tensor:
        with self._autocast():
            pred = self.predict(text, feats)
        return F.mse_loss(pred.float(), feats["target"].to(self.device).float())

    def train_step(self, text: dict, feats: dict) -> float:
        self.t.train()
        loss = self.loss(text, feats)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.step_count += 1
        return float(loss.detach())

    def _autocast(self):
        on_cuda = self.device.type == "cuda" and self.cfg.mixed_precision == "bf16"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda)

    # Checkpoints: LoRA + optimizer + RNG in safetensors and JSON only (never pickle).
    def save_checkpoint(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"lora/{k}": v for k, v in lora_state_dict(self.t).items()}
        sd = self.opt.state_dict()
        for idx, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt/{idx}/{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        tmp = path / "state.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(path / "state.safetensors")
        (path / "meta.json").write_text(json.dumps({"step": self.step_count, "param_groups": sd["param_groups"],
                                                    "saved_at": time.time()}))
        return path

    def load_checkpoint(self, path: str | Path) -> int:
        path = Path(path)
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora/")}
        own = {n: p for n, p in self.t.named_parameters() if "lora_" in n}
        for name, p in own.items():
            key = name.replace(".default", "")
            if key not in lora:
                raise ValueError(f"checkpoint {path} lacks LoRA tensor {key}")
            p.data.copy_(lora[key])
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                state.setdefault(int(idx), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng/cpu"])
        if "rng/cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng/cuda"])
        self.step_count = int(meta["step"])
        return self.step_count


def _run_block(stack: FluxStack | SanaStack, i: int, h: torch.Tensor, e: torch.Tensor | None, ctx: dict):
    s = stack.run_block(i, State(h, e, ctx))
    return s.h, s.e
