"""The per-model selection table in the store: models/{model_key}/selection.json (+ profile.png).

`lookup_for(store, model_dir)` gives `personalize(spec, lookup=...)` the measured split for a skip ratio
(exact ratio key only; anything else falls back to the documented default split).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Callable

from ..models.loading import model_family
from ..store import Store, validate_id
from .search import ratio_key

SELECTION_FILE = "selection.json"
PROFILE_FILE = "profile.png"
# config entries that say where/when a model was saved, not what it is
_VOLATILE = ("_diffusers_version", "_name_or_path", "_class_name", "_use_default_values")


def transformer_config(model_dir: str | Path) -> dict:
    model_family(model_dir)  # "unknown model" with a clear message when it is no diffusers directory
    p = Path(model_dir) / "transformer" / "config.json"
    if not p.is_file():
        raise ValueError(f"unknown model {str(model_dir)!r}: no transformer/config.json")
    return json.loads(p.read_text())


def num_blocks_of(model_dir: str | Path) -> int:
    cfg = transformer_config(model_dir)
    return int(cfg["num_layers"]) + int(cfg.get("num_single_layers", 0))


def model_key(model_dir: str | Path) -> str:
    """'<directory name>-<10 hex of the transformer config hash>': readable, and two models of different
    shape never share a table. Same-shape models in same-named directories do share one (see docs)."""
    cfg = {k: v for k, v in transformer_config(model_dir).items() if k not in _VOLATILE}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_dir).resolve().name).strip("._-").replace("..", ".")
    return validate_id(f"{name[:100] or 'model'}-{digest}", "model key")


def _store(store: Store | str) -> Store:
    return store if isinstance(store, Store) else Store.open(str(store))


def selection_key(key: str) -> str:
    return f"models/{validate_id(key, 'model key')}/{SELECTION_FILE}"


def write_selection(store: Store | str, doc: dict, png: bytes | None = None) -> str:
    s = _store(store)
    key = validate_id(doc["model_key"], "model key")
    if png is not None:  # the plot first: selection.json is what readers trust, so it lands last
        s.write_bytes(f"models/{key}/{PROFILE_FILE}", png)
    s.write_json(selection_key(key), doc)
    return s.url(selection_key(key))


def load_selection(store: Store | str, model_dir: str | Path) -> dict | None:
    s, key = _store(store), model_key(model_dir)
    if not s.exists(selection_key(key)):
        return None
    doc = s.read_json(selection_key(key))
    n = num_blocks_of(model_dir)
    if doc.get("num_blocks") != n:
        raise ValueError(f"selection table {s.url(selection_key(key))} is for {doc.get('num_blocks')} blocks, "
                         f"the model has {n}: rerun `blockskip select`")
    return doc


def lookup_for(store: Store | str, model_dir: str | Path) -> Callable[[float], tuple[int, int] | None]:
    """ratio -> (n*, m*) from the stored table for exactly that ratio, else None (also when no table)."""
    doc = load_selection(store, model_dir)
    table = {k: (int(v[0]), int(v[1])) for k, v in (doc or {}).get("table", {}).items()}

    def lookup(ratio: float) -> tuple[int, int] | None:
        return table.get(ratio_key(ratio))
    return lookup


def draw_profile(doc: dict, note: str | None = None, size: tuple[int, int] = (760, 460)) -> bytes:
    """PNG: masking distance vs window start (block axis 0..N-1) with axis titles and a grid; below the axis,
    the chosen split of every skip ratio as bars over the skipped leading and trailing blocks."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, right, top, bottom = 90, 24, 76, 120
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    n_blocks, prof = doc["num_blocks"], doc["profile"]
    ymax = max([p["distance"] for p in prof] + [1e-9]) * 1.1

    def x(v: float) -> float:
        return left + (W - left - right) * v / max(1, n_blocks - 1)

    def y(v: float) -> float:
        return H - bottom - (H - top - bottom) * v / ymax

    grid = (225, 225, 225)
    for k in range(6):  # horizontal grid + y tick labels
        v = ymax / 1.1 * k / 5
        d.line([(left, y(v)), (W - right, y(v))], fill=grid)
        d.text((left - 50, y(v) - 6), f"{v:.3g}", fill="black", font=font)
    for t in range(n_blocks):  # vertical grid + x tick labels
        d.line([(x(t), top), (x(t), H - bottom)], fill=grid)
        if n_blocks <= 30 or t % 5 == 0:
            d.text((x(t) - 4, H - bottom + 5), str(t), fill="black", font=font)
    d.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black", width=2)
    d.text((left + (W - left - right) // 2 - 150, H - bottom + 20),
           f"window start s (blocks s..s+{doc['window'] - 1} masked; block index in execution order)", fill="black", font=font)
    d.text((6, top - 16), "distance 1 - cos(DINO)", fill="black", font=font)
    pts = [(x(p["start"]), y(p["distance"])) for p in prof]
    if len(pts) > 1:
        d.line(pts, fill=(31, 119, 180), width=2)
    for px, py in pts:
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(31, 119, 180))
    colors = [(214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    for j, (r, (n, m)) in enumerate(sorted(doc["table"].items())):
        c = colors[j % len(colors)]
        yy = H - bottom + 44 + 16 * j
        # the label sits over the kept (middle) blocks, where the bars leave room
        d.text((x((n + n_blocks - m - 1) / 2) - 60, yy - 6), f"ratio {r}: skip n*={n}, m*={m}", fill=c, font=font)
        if n:  # skipped leading blocks [0, n) and trailing [N-m, N) on the block axis
            d.line([(x(0), yy), (x(n - 1) + 2, yy)], fill=c, width=6)
        if m:
            d.line([(x(n_blocks - m) - 2, yy), (x(n_blocks - 1), yy)], fill=c, width=6)
    d.text((left, 8), f"Masking probe profile: {doc['model_key']} (N={n_blocks} blocks, window W={doc['window']})",
           fill="black", font=font)
    d.text((left, 24), "higher = masking these blocks' image-to-text attention changes the subject more", fill="black",
           font=font)
    if note:
        d.text((left, 40), note, fill=(200, 0, 0), font=font)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["model_key", "num_blocks_of", "write_selection", "load_selection", "lookup_for", "draw_profile",
           "selection_key", "SELECTION_FILE", "PROFILE_FILE"]
