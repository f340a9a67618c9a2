"""Reference images: loading with clear errors, the crop of a plan row, and a synthetic subject."""
from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Modes with an unambiguous RGB conversion. 16-bit / float / CMYK images are refused rather than guessed at.
SUPPORTED_MODES = ("RGB", "RGBA", "L", "LA", "P")
# Pixel budget per image, checked from the header before decoding (PIL reads only the header on open). Far below
# PIL's own bomb limit (~89.5 M pixels warns, 2x that raises): a 12000 x 12000 image under that limit still takes
# ~1.35 GB each time it is decoded. Jobs set it with the `max_image_pixels` key.
DEFAULT_MAX_PIXELS = 4096 * 4096


def list_images(source: str | Path) -> list[Path]:
    d = Path(source)
    if not d.exists():
        raise FileNotFoundError(f"image directory {d} does not exist")
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory of images")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {d}")
    return files


def check_pixels(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the image header; ValueError when it is over ``max_pixels`` (None: no budget)."""
    if path.stat().st_size == 0:
        raise ValueError(f"image {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below decides
            with Image.open(path) as im:  # header only: nothing is decoded here
                w, h = im.size
    except Image.DecompressionBombError as e:  # over PIL's own limit, so over any budget we allow
        raise ValueError(f"image {path} is over the pixel budget max_image_pixels={max_pixels} ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {path} is not a readable image ({e.__class__.__name__}: {e})") from None
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"image {path} is {w}x{h} = {w * h} pixels, over the pixel budget "
                         f"max_image_pixels={max_pixels}")
    return w, h


def load_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    check_pixels(path, max_pixels)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in SUPPORTED_MODES:
                raise ValueError(f"image {path} has unsupported mode {im.mode!r}: expected one of {SUPPORTED_MODES}")
            # The EXIF orientation a camera or phone records: the subject as it is seen, not lying on its side
            # (diffusers' DreamBooth scripts apply exif_transpose too). Plans use the size of this image.
            im = ImageOps.exif_transpose(im)
            # RGBA/LA: composite on white so a transparent background does not turn black.
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} is not a readable image ({e.__class__.__name__}: {e})") from None


def load_images(source: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    files = list_images(source)
    for p in files:  # every header first: an over-budget image fails before anything is decoded
        check_pixels(p, max_pixels)
    return [load_image(p, max_pixels) for p in files]


def crop_for_row(image: Image.Image, row: dict) -> torch.Tensor:
    """The plan row's crop, flipped if asked, resized to out_size; (3, S, S) in [-1, 1]."""
    x, y, s, out = row["crop_x"], row["crop_y"], row["crop_size"], row["out_size"]
    im = image.crop((x, y, x + s, y + s))
    if row["flip"]:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if s != out:
        im = im.resize((out, out), Image.Resampling.BICUBIC, reducing_gap=None)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def make_synthetic_subject(out: str | Path, n: int = 5, size: int = 256, seed: int = 0) -> list[Path]:
    """Draw one object (a toy robot with fixed colours and shape) in varied positions, scales and backgrounds."""
    rnd = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        bg1 = tuple(rnd.randrange(40, 220) for _ in range(3))
        bg2 = tuple(rnd.randrange(40, 220) for _ in range(3))
        im = Image.new("RGB", (size, size))
        d = ImageDraw.Draw(im)
        stripes = rnd.choice([4, 6, 8, 12])
        for k in range(stripes):  # striped or banded backgrounds so the object is what stays constant
            d.rectangle([0, k * size // stripes, size, (k + 1) * size // stripes], fill=bg1 if k % 2 else bg2)
        scale = rnd.uniform(0.35, 0.6) * size
        cx, cy = rnd.uniform(scale / 2, size - scale / 2), rnd.uniform(scale / 2, size - scale / 2)
        w, h = scale * 0.7, scale
        body = [cx - w / 2, cy - h / 4, cx + w / 2, cy + h / 2]
        d.rounded_rectangle(body, radius=int(scale / 10), fill=(220, 60, 40), outline=(30, 30, 30), width=2)
        head_r = scale / 4
        d.ellipse([cx - head_r, cy - h / 2, cx + head_r, cy - h / 2 + 2 * head_r], fill=(240, 200, 40), outline=(30, 30, 30), width=2)
        for ex in (-1, 1):
            d.ellipse([cx + ex * head_r / 2 - 4, cy - h / 2 + head_r - 4, cx + ex * head_r / 2 + 4, cy - h / 2 + head_r + 4], fill=(20, 20, 20))
        ang = rnd.uniform(-math.pi / 8, math.pi / 8)
        d.line([cx, cy - h / 2, cx + math.sin(ang) * scale / 5, cy - h / 2 - scale / 5], fill=(30, 30, 30), width=3)
        p = out / f"img_{i:02d}.png"
        im.save(p)
        paths.append(p)
    return paths
