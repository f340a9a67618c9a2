"""Packed training: K subjects in one forward/backward over the shared frozen kept blocks (design section 7).

Every LoRA target of the kept blocks is wrapped in `PackedLoRALinear`, which holds a stacked A (K, r, in) and
B (K, out, r): one slot per subject. A packed step routes sample i to its subject's slot (a gather of A/B by
slot index and a batched matmul), so a subject's loss depends only on its own slot, and the gradient of the
summed loss with respect to slot k is subject k's own gradient (other subjects contribute exact zeros).
Everything that is per-subject in `SkipTrainer` stays per-subject here:
- LoRA init: drawn from the subject's seed exactly as peft draws it (`init_lora`), so slot k starts where
  `SkipTrainer` would after `torch.manual_seed(seed)`;
- gradient clipping: the norm over the subject's slot only;
- AdamW: per-slot moments and step counts (the update is torch's AdamW, applied slot-wise and masked, so an
  idle slot is not decayed);
- loss: each sample's own MSE; a non-finite loss is left out of the backward and its subject is reported as
  failed, so it cannot poison the others;
- plan/features/text: each subject brings its own.
Samples whose token counts differ (different crop sizes) cannot share a tensor: they are grouped by shape and
each group runs as one batch; the groups' losses are summed into one backward. Checkpoints use the exact
format of `SkipTrainer.save_checkpoint`, so a subject may resume packed or alone.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.stack import Cond, FluxStack, SanaStack, State
from .lora import target_regex
from .modes import Mode
from .trainer import OptimConfig


class _Router:
    """The slot index of every sample in the batch now running (set per group, read by every wrapper)."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None


class PackedLoRALinear(nn.Module):
    """base(x) + scaling * B[slot] A[slot] x, per sample (peft's LoRA Linear, one adapter per slot)."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, scaling: float, router: _Router):
        super().__init__()
        self.base, self.scaling, self.router = base, scaling, router
        dev = base.weight.device
        self.A = nn.Parameter(torch.zeros(slots, rank, base.in_features, device=dev))
        self.B = nn.Parameter(torch.zeros(slots, base.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        idx = self.router.idx
        b = x.shape[0]
        xs = x.reshape(b, -1, x.shape[-1]).to(self.A.dtype)
        d = torch.bmm(torch.bmm(xs, self.A[idx].transpose(1, 2)), self.B[idx].transpose(1, 2))
        return y + (d * self.scaling).reshape(*y.shape[:-1], -1).to(y.dtype)


def lora_targets(transformer: nn.Module, stack: FluxStack | SanaStack, kept: range) -> list[str]:
    """The LoRA target module names in peft's order (named_modules order), as `add_lora` would pick them."""
    rx = re.compile(target_regex(stack, kept))
    return [n for n, m in transformer.named_modules() if rx.match(n) and isinstance(m, nn.Linear)]


def init_lora(shapes: list[tuple[int, int]], rank: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per target, drawn as peft 0.21 draws them after `torch.manual_seed(seed)`.

    peft builds nn.Linear(in, r) then nn.Linear(r, out) (each init draws kaiming_uniform), then re-draws A
    with kaiming_uniform(a=sqrt(5)) and zeroes B; tests/method/test_packed.py checks this against add_lora."""
    g = torch.get_rng_state()
    torch.manual_seed(seed)
    out = []
    for fan_in, fan_out in shapes:
        a = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r).reset_parameters
        nn.init.kaiming_uniform_(torch.empty(fan_out, rank), a=math.sqrt(5))  # nn.Linear(r, out)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft reset_lora_parameters
        out.append((a, torch.zeros(fan_out, rank)))
    torch.set_rng_state(g)
    return out


@dataclass
class _Slot:
    name: str
    steps: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)


class PackedTrainer:
    """K slots of LoRA over one frozen kept transformer; `step` trains every subject given one sample each."""

    def __init__(self, transformer: nn.Module, stack: FluxStack | SanaStack, skip: tuple[int, int], mode: Mode,
                 cfg: OptimConfig, slots: int, device: torch.device | str = "cpu"):
        if slots < 1:
            raise ValueError(f"pack size must be >= 1, got {slots}")
        if cfg.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {cfg.rank}")
        self.t, self.stack, self.mode, self.cfg, self.K = transformer, stack, mode, cfg, slots
        self.n, self.m = skip
        self.kept = range(self.n, stack.num_blocks - self.m)
        if len(self.kept) == 0:
            raise ValueError("the skip plan leaves no block to train")
        self.device = torch.device(device)
        self.router = _Router()
        transformer.requires_grad_(False)
        self.targets = lora_targets(transformer, stack, self.kept)
        scaling = (cfg.alpha or cfg.rank) / cfg.rank
        self.layers: list[PackedLoRALinear] = []
        for name in self.targets:
            parent, _, child = name.rpartition(".")
            base = transformer.get_submodule(name)
            w = PackedLoRALinear(base, slots, cfg.rank, scaling, self.router)
            setattr(transformer.get_submodule(parent), child, w)
            self.layers.append(w)
        # Parameter order of SkipTrainer.params: per target, A then B (checkpoints are interchangeable).
        self.params = [p for w in self.layers for p in (w.A, w.B)]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.slots: list[_Slot | None] = [None] * slots
        self._param_groups = torch.optim.AdamW([torch.zeros(1) for _ in self.params], lr=cfg.lr,
                                               weight_decay=cfg.weight_decay).state_dict()["param_groups"]

    # -- slots ---------------------------------------------------------------------------------------------
    def add(self, name: str, seed: int) -> int:
        """Give `name` a free slot with a fresh LoRA drawn from `seed`; returns the slot."""
        if name in self.active:
            raise ValueError(f"subject {name!r} is already packed")
        free = [k for k, s in enumerate(self.slots) if s is None]
        if not free:
            raise ValueError(f"all {self.K} slots are taken")
        k = free[0]
        shapes = [(w.base.in_features, w.base.out_features) for w in self.layers]
        with torch.no_grad():
            for w, (a, b) in zip(self.layers, init_lora(shapes, self.cfg.rank, seed)):
                w.A[k].copy_(a)
                w.B[k].copy_(b)
            for s in (*self.exp_avg, *self.exp_avg_sq):
                s[k].zero_()
        self.slots[k] = _Slot(name, 0, torch.Generator().manual_seed(seed))
        return k

    def remove(self, name: str) -> None:
        self.slots[self._slot(name)] = None

    @property
    def active(self) -> dict[str, int]:
        return {s.name: k for k, s in enumerate(self.slots) if s is not None}

    def steps(self, name: str) -> int:
        return self.slots[self._slot(name)].steps

    def _slot(self, name: str) -> int:
        k = self.active.get(name)
        if k is None:
            raise KeyError(f"subject {name!r} is not packed")
        return k

    # -- the packed step -------------------------------------------------------------------------------------
    def step(self, batch: Mapping[str, tuple[dict, dict]]) -> dict[str, float]:
        """One optimizer step for every subject in `batch` ({name: (text, feats)}): {name: loss}.

        A subject whose loss is not finite gets no update (its loss is returned as is; the caller fails it)."""
        self.t.train()
        slots = {name: self._slot(name) for name in batch}
        groups: dict[tuple, list[str]] = {}
        for name, (text, feats) in batch.items():
            groups.setdefault(_shape_key(text, feats), []).append(name)
        losses: dict[str, torch.Tensor] = {}
        for names in groups.values():
            losses.update(self._group_losses(names, batch, slots))
        finite = [n for n in losses if torch.isfinite(losses[n]).item()]
        for p in self.params:
            p.grad = None
        if finite:
            torch.stack([losses[n] for n in finite]).sum().backward()
        self._update(torch.tensor([slots[n] for n in finite], dtype=torch.long))
        for n in finite:
            self.slots[slots[n]].steps += 1
        return {n: float(v.detach()) for n, v in losses.items()}

    def _group_losses(self, names: list[str], batch, slots) -> dict[str, torch.Tensor]:
        dtype = self.stack._dtype()
        idx = torch.tensor([slots[n] for n in names], device=self.device)
        c = _batched_cond([batch[n] for n in names], self.cfg.guidance, self.device, dtype)
        feats = [batch[n][1] for n in names]
        with self._autocast():
            self.router.idx = idx
            if self.mode.features and self.n:
                e = None if feats[0].get("e") is None else torch.cat([f["e"] for f in feats]).to(self.device, dtype)
                s = State(torch.cat([f["h"] for f in feats]).to(self.device, dtype), e, self.stack.context(c))
            else:
                s = self.stack.embed(c)
            for i in self.kept:
                if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
                    h, e = checkpoint(_run_block, self.stack, self.router, idx, i, s.h, s.e, s.ctx,
                                      use_reentrant=False)
                    s = s.with_(h=h, e=e)
                else:
                    s = self.stack.run_block(i, s)
            if self.mode.features and self.m:
                s = s.with_(h=s.h + torch.cat([f["delta"] for f in feats]).to(self.device, s.h.dtype))
            pred = self.stack.head(s, c)
        return {n: F.mse_loss(pred[j:j + 1].float(), f["target"].to(self.device).float())
                for j, (n, f) in enumerate(zip(names, feats))}

    @torch.no_grad()
    def _update(self, active: torch.Tensor) -> None:
        """Per-slot gradient clipping and torch AdamW (single-tensor algorithm), only on the active slots."""
        if active.numel() == 0:
            return
        cfg = self.cfg
        beta1, beta2 = self._param_groups[0]["betas"]
        eps = self._param_groups[0]["eps"]
        grads = [p.grad[active] if p.grad is not None else torch.zeros_like(p[active]) for p in self.params]
        if cfg.grad_clip:  # torch.nn.utils.clip_grad_norm_, over each subject's own parameters
            norms = torch.stack([g.flatten(1).norm(2, dim=1) for g in grads], dim=1).norm(2, dim=1)
            coef = torch.clamp(cfg.grad_clip / (norms + 1e-6), max=1.0)
            grads = [g * coef.view(-1, *([1] * (g.dim() - 1))) for g in grads]
        steps = torch.tensor([self.slots[k].steps + 1 for k in active.tolist()], dtype=torch.float64)
        bc1 = 1 - beta1 ** steps
        bc2_sqrt = (1 - beta2 ** steps).sqrt()
        step_size = (cfg.lr / bc1).float()
        for p, m, v, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads):
            view = (-1, *([1] * (g.dim() - 1)))
            pa, ma, va = p[active], m[active], v[active]
            pa.mul_(1 - cfg.lr * cfg.weight_decay)
            ma.lerp_(g, 1 - beta1)
            va.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (va.sqrt() / bc2_sqrt.float().view(view)).add_(eps)
            pa.sub_(ma / denom * step_size.view(view))
            p[active], m[active], v[active] = pa, ma, va

    def _autocast(self):
        on_cuda = self.device.type == "cuda" and self.cfg.mixed_precision == "bf16"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda)

    # -- per-subject state -------------------------------------------------------------------------------------
    def lora_state(self, name: str) -> dict[str, torch.Tensor]:
        """The subject's adapter in peft's state-dict naming (what `lora_state_dict` gives for SkipTrainer)."""
        k = self._slot(name)
        out = {}
        for t, w in zip(self.targets, self.layers):
            out[f"{t}.lora_A.weight"] = w.A[k].detach().float().cpu().clone()
            out[f"{t}.lora_B.weight"] = w.B[k].detach().float().cpu().clone()
        return out

    def save_checkpoint(self, name: str, path: str | Path) -> Path:
        """SkipTrainer's checkpoint format (lora/, opt/{idx}/, rng/cpu in safetensors + meta.json)."""
        k, slot = self._slot(name), self.slots[self._slot(name)]
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"lora/{key}": v for key, v in self.lora_state(name).items()}
        if slot.steps:
            for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
                tensors[f"opt/{i}/step"] = torch.tensor(float(slot.steps))
                tensors[f"opt/{i}/exp_avg"] = m[k].detach().cpu().contiguous()
                tensors[f"opt/{i}/exp_avg_sq"] = v[k].detach().cpu().contiguous()
        tensors["rng/cpu"] = slot.generator.get_state()
        tmp = path / "state.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(path / "state.safetensors")
        (path / "meta.json").write_text(json.dumps({"step": slot.steps, "param_groups": self._param_groups,
                                                    "saved_at": time.time()}))
        return path

    def load_checkpoint(self, name: str, path: str | Path) -> int:
        """Load a checkpoint (packed or SkipTrainer's) into the subject's slot; returns its step."""
        k = self._slot(name)
        path = Path(path)
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        with torch.no_grad():
            for i, (t, w) in enumerate(zip(self.targets, self.layers)):
                for part, p in (("A", w.A), ("B", w.B)):
                    key = f"lora/{t}.lora_{part}.weight"
                    if key not in tensors:
                        raise ValueError(f"checkpoint {path} lacks LoRA tensor {key[5:]}")
                    p[k].copy_(tensors[key])
                    j = 2 * i + (part == "B")
                    self.exp_avg[j][k].copy_(tensors.get(f"opt/{j}/exp_avg", torch.zeros_like(p[k])))
                    self.exp_avg_sq[j][k].copy_(tensors.get(f"opt/{j}/exp_avg_sq", torch.zeros_like(p[k])))
        self.slots[k].generator.set_state(tensors["rng/cpu"])
        self.slots[k].steps = int(meta["step"])
        return self.slots[k].steps


def _run_block(stack, router: _Router, idx: torch.Tensor, i: int, h, e, ctx):
    router.idx = idx  # set again when checkpointing recomputes the block during backward
    s = stack.run_block(i, State(h, e, ctx))
    return s.h, s.e


def _shape_key(text: dict, feats: dict) -> tuple:
    """Samples with equal keys share a batch: same latent grid, token counts and available tensors."""
    return (tuple(int(v) for v in feats["latent_hw"]),
            tuple(sorted((k, tuple(v.shape[1:])) for k, v in feats.items() if torch.is_tensor(v) and v.dim() > 1)),
            tuple(sorted((k, tuple(v.shape[1:])) for k, v in text.items())))


def _batched_cond(items: list[tuple[dict, dict]], guidance: float, device, dtype) -> Cond:
    """`make_cond` for a group of samples of one shape: the per-sample tensors concatenated on the batch axis."""
    texts, feats = [t for t, _ in items], [f for _, f in items]
    sigma = torch.cat([f["sigma"] for f in feats]).to(device)

    def cat(src: list[dict], k: str):
        return torch.cat([s[k] for s in src]).to(device, dtype) if k in src[0] else None

    return Cond(latents=cat(feats, "x_t"), sigma=sigma, prompt_embeds=cat(texts, "prompt_embeds"),
                pooled=cat(texts, "pooled"), prompt_mask=cat(texts, "prompt_mask"),
                guidance=torch.full_like(sigma, guidance), latent_hw=tuple(int(v) for v in feats[0]["latent_hw"]))


@dataclass
class PackedSubject:
    """A subject to train packed: its text and an iterator of (step, feats) over its plan."""

    name: str
    seed: int
    text: dict
    feats: Iterator[tuple[int, dict]]
    checkpoint: Path | None = None  # resume from here when given


def run_packed(trainer: PackedTrainer, subjects: Iterator[PackedSubject],
               on_done: Callable[[str, PackedTrainer], None],
               on_fail: Callable[[str, str], None] = lambda name, why: None,
               on_step: Callable[[str, int, float, PackedTrainer], None] = lambda *a: None) -> None:
    """Train subjects K at a time until `subjects` is exhausted; a finished or failed subject frees its slot
    for the next one at once. `on_done(name, trainer)` runs while the subject still holds its slot (read its
    state there); `on_fail(name, reason)` when its data cannot be read, its loss is not finite, or on_done raised."""
    queue = iter(subjects)
    live: dict[str, PackedSubject] = {}
    pending: dict[str, tuple[int, dict]] = {}

    def drop(name: str) -> None:
        trainer.remove(name)
        live.pop(name)

    def fetch(name: str) -> None:  # the subject's next sample into `pending`, or finish / fail it
        try:
            item = next(live[name].feats, None)
        except Exception as exc:  # bad data fails this subject only
            on_fail(name, f"{type(exc).__name__}: {exc}")
            return drop(name)
        if item is None:
            try:
                on_done(name, trainer)
            except Exception as exc:
                on_fail(name, f"{type(exc).__name__}: {exc}")
            return drop(name)
        pending[name] = item

    exhausted = False
    while True:
        while any(n not in pending for n in live) or (not exhausted and len(live) < trainer.K):
            for name in [n for n in live if n not in pending]:
                fetch(name)
            while not exhausted and len(live) < trainer.K:
                nxt = next(queue, None)
                if nxt is None:
                    exhausted = True
                    break
                trainer.add(nxt.name, nxt.seed)
                live[nxt.name] = nxt
                if nxt.checkpoint is not None:
                    start = trainer.load_checkpoint(nxt.name, nxt.checkpoint)
                    nxt.feats = _skip_to(nxt.feats, start)
        if not pending:
            return
        losses = trainer.step({n: (live[n].text, f) for n, (_, f) in pending.items()})
        for name, loss in losses.items():
            step = pending.pop(name)[0]
            if not math.isfinite(loss):
                on_fail(name, f"non-finite loss {loss} at step {step}")
                drop(name)
                continue
            try:
                on_step(name, step, loss, trainer)
            except Exception as exc:  # e.g. its checkpoint could not be written: this subject fails alone
                on_fail(name, f"{type(exc).__name__}: {exc}")
                drop(name)


def _skip_to(feats: Iterator[tuple[int, dict]], start: int) -> Iterator[tuple[int, dict]]:
    """Resume: the steps a checkpoint at `start` has already taken are skipped (as `train` does)."""
    return ((step, f) for step, f in feats if step >= start)
