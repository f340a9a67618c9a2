"""The toy image domain (design section 8): toys made of parts, on varied backgrounds, each with a caption.

An identity is a fixed combination of parts (body shape, body colour, pattern, accessory and its colour);
nuisance factors (background colour and texture, position, scale, rotation, mirror) vary per image. Every
image is a pure function of (identity, nuisance seed), so the whole domain is deterministic from a seed.

A fixed set of identities (`HELD_OUT`) is never used in pretraining: they are the personalization subjects.
Each of their individual attributes does appear in many pretraining identities (the domain is a full
factorial), so a subject is a new *combination*, as a real subject is a new instance of known parts.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("round", "square", "triangle", "oval")
COLORS = {"red": (220, 40, 40), "yellow": (240, 210, 30), "green": (40, 170, 60), "blue": (40, 80, 220),
          "purple": (150, 50, 190), "white": (245, 245, 245)}
PATTERNS = ("plain", "striped", "dotted")
ACCESSORIES = ("ears", "hat", "horn")
BACKGROUNDS = {"gray": (128, 128, 128), "pink": (250, 180, 200), "cyan": (120, 220, 230), "brown": (120, 80, 40),
               "black": (20, 20, 20), "orange": (250, 150, 50)}
TEXTURES = ("plain", "checkered")
SIZE = 32  # the pretraining / "full" resolution (16 px is the block-skip low resolution)
SUBJECT_WORD = "sks"  # the rare token a subject is bound to (DreamBooth convention)


@dataclass(frozen=True)
class Identity:
    shape: str
    color: str
    pattern: str
    accessory: str
    acc_color: str

    @property
    def key(self) -> str:
        return f"{self.pattern}-{self.color}-{self.shape}-{self.acc_color}-{self.accessory}"

    def describe(self) -> str:
        """The toy's words in a caption: 'striped red round toy with blue ears' (plain is not said)."""
        pat = "" if self.pattern == "plain" else f"{self.pattern} "
        return f"{pat}{self.color} {self.shape} toy with {self.acc_color} {self.accessory}"


ALL_IDENTITIES: tuple[Identity, ...] = tuple(
    Identity(s, c, p, a, ac) for s, c, p, a, ac in itertools.product(SHAPES, COLORS, PATTERNS, ACCESSORIES, COLORS)
    if ac != c)  # an accessory of the body's colour would be invisible
# The personalization subjects: chosen by hand to cover every shape, colour, pattern and accessory; never in pretraining.
HELD_OUT: tuple[Identity, ...] = (
    Identity("round", "red", "striped", "ears", "blue"),
    Identity("square", "yellow", "dotted", "hat", "purple"),
    Identity("triangle", "green", "plain", "horn", "red"),
    Identity("oval", "blue", "striped", "hat", "yellow"),
    Identity("round", "purple", "dotted", "horn", "green"),
    Identity("square", "white", "striped", "ears", "red"),
    Identity("triangle", "blue", "dotted", "ears", "white"),
    Identity("oval", "red", "plain", "hat", "green"),
)
PRETRAIN_IDENTITIES: tuple[Identity, ...] = tuple(i for i in ALL_IDENTITIES if i not in set(HELD_OUT))
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    "a toy with on background photo of".split() + list(SHAPES) + list(COLORS) + list(PATTERNS) + list(ACCESSORIES)
    + list(BACKGROUNDS) + list(TEXTURES) + [SUBJECT_WORD]))


@dataclass(frozen=True)
class Scene:
    background: str
    texture: str
    cx: float  # toy centre, fraction of the image side
    cy: float
    scale: float  # body radius, fraction of the image side
    angle: float  # degrees
    mirror: bool


def _rng(*parts) -> np.random.Generator:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def random_scene(rng: np.random.Generator, backgrounds: tuple[str, ...] | None = None) -> Scene:
    bgs = backgrounds or tuple(BACKGROUNDS)
    return Scene(background=bgs[int(rng.integers(len(bgs)))], texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
                 cx=float(rng.uniform(0.4, 0.6)), cy=float(rng.uniform(0.45, 0.6)), scale=float(rng.uniform(0.25, 0.32)),
                 angle=float(rng.uniform(-20, 20)), mirror=bool(rng.integers(2)))


def _body_mask(shape: str, size: int, r: float) -> Image.Image:
    """The body silhouette, centred in a size x size layer."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    c = size / 2
    if shape == "round":
        d.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif shape == "square":
        d.rounded_rectangle((c - r, c - r, c + r, c + r), radius=r * 0.2, fill=255)
    elif shape == "triangle":
        d.polygon([(c, c - 1.15 * r), (c - 1.1 * r, c + 0.85 * r), (c + 1.1 * r, c + 0.85 * r)], fill=255)
    elif shape == "oval":
        d.ellipse((c - 0.7 * r, c - 1.15 * r, c + 0.7 * r, c + 1.15 * r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _top(shape: str, c: float, r: float) -> float:
    return c - {"round": r, "square": r, "triangle": 1.15 * r, "oval": 1.15 * r}[shape]


def render_toy(ident: Identity, scene: Scene, size: int = SIZE, supersample: int = 4) -> Image.Image:
    """Draw one image at `size` px (drawn at `supersample` x and downsampled, for clean edges)."""
    S = size * supersample
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    if scene.texture == "checkered":  # a lighter checker of the same hue
        base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
        light = tuple(int(v) for v in base * 0.6 + 255 * 0.4)
        cell = S // 8
        d = ImageDraw.Draw(img)
        for y in range(8):
            for x in range(8):
                if (x + y) % 2:
                    d.rectangle((x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1), fill=light)
    # the toy on its own layer (body + pattern + accessory), rotated and mirrored as a whole
    L = S
    layer = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    r = scene.scale * S
    c = L / 2
    mask = _body_mask(ident.shape, L, r)
    body = Image.new("RGBA", (L, L), COLORS[ident.color] + (255,))
    dark = tuple(int(v * 0.35) for v in COLORS[ident.color]) if ident.color != "white" else (40, 40, 40)
    if ident.pattern != "plain":
        pd = ImageDraw.Draw(body)
        if ident.pattern == "striped":
            w = max(2, int(r * 0.28))
            for x in range(int(c - 1.3 * r), int(c + 1.3 * r), 2 * w):
                pd.rectangle((x, 0, x + w - 1, L), fill=dark + (255,))
        else:  # dotted
            step, rad = r * 0.6, max(2.0, r * 0.14)
            for yy in np.arange(c - 1.2 * r, c + 1.2 * r, step):
                for xx in np.arange(c - 1.2 * r + (step / 2 if int((yy - c) / step) % 2 else 0), c + 1.2 * r, step):
                    pd.ellipse((xx - rad, yy - rad, xx + rad, yy + rad), fill=dark + (255,))
    layer.paste(body, (0, 0), mask)
    ad = ImageDraw.Draw(layer)
    acc = COLORS[ident.acc_color] + (255,)
    top = _top(ident.shape, c, r)
    if ident.accessory == "ears":
        for sx in (-1, 1):
            ex = c + sx * 0.55 * r
            ad.ellipse((ex - 0.3 * r, top - 0.35 * r, ex + 0.3 * r, top + 0.25 * r), fill=acc)
    elif ident.accessory == "hat":
        ad.rectangle((c - 0.65 * r, top - 0.1 * r, c + 0.65 * r, top + 0.08 * r), fill=acc)
        ad.rectangle((c - 0.38 * r, top - 0.65 * r, c + 0.38 * r, top), fill=acc)
    elif ident.accessory == "horn":
        ad.polygon([(c - 0.25 * r, top + 0.1 * r), (c + 0.25 * r, top + 0.1 * r), (c, top - 0.8 * r)], fill=acc)
    else:
        raise ValueError(f"unknown accessory {ident.accessory!r}")
    eye = (20, 20, 20, 255) if ident.color != "black" else (240, 240, 240, 255)
    for sx in (-1, 1):  # two eyes: gives the toy a face (and an orientation)
        ex, ey, er = c + sx * 0.3 * r, c - 0.15 * r, max(1.5, 0.12 * r)
        ad.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255, 255))
        ad.ellipse((ex - er / 2, ey - er / 2, ex + er / 2, ey + er / 2), fill=eye)
    layer = layer.rotate(scene.angle, resample=Image.BILINEAR, center=(c, c))
    if scene.mirror:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
    dx, dy = int(round((scene.cx - 0.5) * S)), int(round((scene.cy - 0.5) * S))
    img.paste(layer, (dx, dy), layer)
    return img.resize((size, size), Image.LANCZOS)


def caption(ident: Identity | None, scene: Scene, keep: dict[str, bool] | None = None) -> str:
    """'a striped red round toy with blue ears on a pink checkered background'; `keep` drops parts
    (keys: toy, background) so partial prompts ('a toy on a pink background') are in the training set."""
    keep = keep or {}
    toy = ident.describe() if (ident is not None and keep.get("toy", True)) else "toy"
    if not keep.get("background", True):
        return f"a {toy}"
    tex = "" if scene.texture == "plain" else f"{scene.texture} "
    return f"a {toy} on a {scene.background} {tex}background"


def pretraining_sample(seed: int, index: int, size: int = SIZE, drop: float = 0.15) -> tuple[Image.Image, str, Identity]:
    """Image `index` of the pretraining stream of `seed`: a pretraining identity, a random scene, its caption.
    Each caption part is dropped with probability `drop` (the model must also follow partial prompts)."""
    rng = _rng("pretrain", seed, index)
    ident = PRETRAIN_IDENTITIES[int(rng.integers(len(PRETRAIN_IDENTITIES)))]
    scene = random_scene(rng)
    keep = {"toy": bool(rng.random() >= drop), "background": bool(rng.random() >= drop)}
    return render_toy(ident, scene, size), caption(ident, scene, keep), ident


def subject_id(i: int) -> str:
    return f"toy-{i}"


def subject_identity(i: int) -> Identity:
    """Held-out subject i (0-based)."""
    if not 0 <= i < len(HELD_OUT):
        raise ValueError(f"toy subject {i} does not exist: there are {len(HELD_OUT)} held-out subjects (0..{len(HELD_OUT) - 1})")
    return HELD_OUT[i]


def subject_images(i: int, n: int = 5, size: int = SIZE, seed: int = 0) -> list[Image.Image]:
    """The reference images of subject i: the identity in n random scenes (a DreamBooth-like set)."""
    ident = subject_identity(i)
    return [render_toy(ident, random_scene(_rng("subject", i, seed, k)), size) for k in range(n)]


def subject_prompt() -> str:
    return f"a {SUBJECT_WORD} toy"


def eval_prompts() -> list[str]:
    """Context prompts (the paper's 25 per class, scaled down): the subject on each background."""
    return [f"a {SUBJECT_WORD} toy on a {bg} background" for bg in ("pink", "cyan", "black", "orange")]


def write_subject(i: int, out: str | Path, n: int = 5, size: int = SIZE, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(subject_images(i, n, size, seed)):
        im.save(out / f"{k:02d}.png")
    return out


__all__ = ["Identity", "Scene", "HELD_OUT", "PRETRAIN_IDENTITIES", "ALL_IDENTITIES", "VOCAB", "render_toy", "caption",
           "pretraining_sample", "subject_images", "subject_identity", "subject_prompt", "eval_prompts",
           "write_subject", "subject_id", "random_scene", "SIZE", "SUBJECT_WORD"]
