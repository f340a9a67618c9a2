"""Training curves of one subject: TensorBoard scalars, a progress record, a loss-curve PNG, a sample grid.

- ``logs/``: TensorBoard event files (tensorboardX): train/loss, train/lr, train/step_time_s, train/memory_mib.
  ``tensorboard --logdir OUT/logs`` (or a store's ``subjects/*/logs``) shows them.
- progress: {step, steps, loss, steps_per_s, eta_s, updated_at}, handed to a sink (a file, the store) on the
  first step, then at most every ``every_s`` seconds, and at the end; `blockskip status` reads it.
- ``loss_curve.png``: raw loss and its moving average, drawn with PIL (no matplotlib dependency).
- ``sample_grid.png``: the sample images side by side.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

PROGRESS_FILE = "progress.json"


def current_memory_bytes(device) -> int | None:
    """Memory in use now: allocated CUDA memory, else this process's resident set size."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class TrainingCurves:
    """Log every step of one subject; `close` draws the loss PNG and reports the final progress."""

    def __init__(self, log_dir: str | Path | None, total_steps: int, sink: Callable[[dict], None] | None = None,
                 every_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.sink, self.every_s, self.clock = total_steps, sink, every_s, clock
        self.losses: list[tuple[int, float]] = []
        self._t0 = self._last_sink = None
        self._steps_timed = 0
        self._writer = None
        if log_dir is not None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(log_dir), flush_secs=10)

    def log(self, step: int, loss: float, lr: float | None = None, step_time_s: float | None = None,
            memory_bytes: int | None = None) -> None:
        """Record step `step` (1-based: the number of steps done)."""
        now = self.clock()
        if self._t0 is None:
            self._t0, self._first_step = now, step
        self.losses.append((step, float(loss)))
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            if lr is not None:
                self._writer.add_scalar("train/lr", lr, step)
            if step_time_s is not None:
                self._writer.add_scalar("train/step_time_s", step_time_s, step)
            if memory_bytes is not None:
                self._writer.add_scalar("train/memory_mib", memory_bytes / 2**20, step)
        if self.sink is not None and (self._last_sink is None or now - self._last_sink >= self.every_s
                                      or step == self.total):
            self._last_sink = now
            self.sink(self.progress())

    def progress(self) -> dict:
        step, loss = self.losses[-1] if self.losses else (0, None)
        done = step - getattr(self, "_first_step", step)
        elapsed = (self.clock() - self._t0) if self._t0 is not None else 0.0
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        eta = (self.total - step) / rate if rate else None
        return {"step": step, "steps": self.total, "loss": loss, "steps_per_s": rate,
                "eta_s": None if eta is None else round(eta, 1), "updated_at": time.time()}

    def close(self, png: str | Path | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
        if png is not None and self.losses:
            draw_loss_curve([s for s, _ in self.losses], [v for _, v in self.losses], png)
        if self.sink is not None and self.losses:
            self.sink(self.progress())


def file_sink(path: str | Path) -> Callable[[dict], None]:
    path = Path(path)

    def write(p: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(p))
        tmp.replace(path)
    return write


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def draw_loss_curve(steps: Sequence[int], losses: Sequence[float], out: str | Path, title: str = "training loss",
                    size: tuple[int, int] = (640, 400)) -> Path:
    """Raw loss (light) and its exponential moving average (dark), with gridlines, tick labels and axis titles."""
    if len(steps) != len(losses) or not steps:
        raise ValueError("draw_loss_curve needs as many steps as losses, at least one")
    w, h = size
    left, right, top, bottom = 70, 20, 36, 50
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    finite = [v for v in losses if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    px = lambda s: left + (s - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda v: top + (hi - v) / (hi - lo) * (h - top - bottom)  # noqa: E731
    for t in _nice_ticks(lo, hi):
        y = py(t)
        d.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        d.text((left - 6, y), f"{t:.4g}", fill="black", font=font, anchor="rm")
    for t in _nice_ticks(x0, x1):
        x = px(t)
        d.line([(x, top), (x, h - bottom)], fill=(225, 225, 225))
        d.text((x, h - bottom + 6), f"{t:g}", fill="black", font=font, anchor="ma")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    pts = [(px(s), py(v)) for s, v in zip(steps, losses) if math.isfinite(v)]
    if len(pts) > 1:
        d.line(pts, fill=(150, 180, 230), width=1)
    ema, smooth = None, []
    for s, v in zip(steps, losses):
        if math.isfinite(v):
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append((px(s), py(ema)))
    if len(smooth) > 1:
        d.line(smooth, fill=(20, 60, 160), width=2)
    elif smooth:
        d.ellipse([smooth[0][0] - 2, smooth[0][1] - 2, smooth[0][0] + 2, smooth[0][1] + 2], fill=(20, 60, 160))
    d.text((w / 2, 10), f"{title} (light: per step, dark: moving average)", fill="black", font=font, anchor="ma")
    d.text(((left + w - right) / 2, h - 18), "step", fill="black", font=font, anchor="ma")
    d.text((8, top + (h - top - bottom) / 2), "loss", fill="black", font=font, anchor="lm")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)
    return out


def sample_grid(paths: Sequence[str | Path], out: str | Path, cols: int | None = None, pad: int = 4) -> Path:
    """The images side by side (rows of `cols`, default all in one row), each scaled to the first one's size."""
    if not paths:
        raise ValueError("sample_grid needs at least one image")
    ims = [Image.open(p).convert("RGB") for p in paths]
    w, h = ims[0].size
    cols = cols or len(ims)
    rows = math.ceil(len(ims) / cols)
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(ims):
        r, c = divmod(i, cols)
        grid.paste(im.resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    out = Path(out)
    grid.save(out)
    return out


__all__ = ["TrainingCurves", "file_sink", "draw_loss_curve", "sample_grid", "current_memory_bytes", "PROGRESS_FILE"]
