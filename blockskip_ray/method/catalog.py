"""A catalog of subjects (design section 5): JSONL or Parquet, one subject per row.

    {"id": "toy-1", "images": "DIR or [URI, ...]", "prompt": "a photo of sks toy", "class": "toy",
     "eval_prompts": ["a photo of sks toy on a beach"]}        # eval_prompts optional

`load_catalog(path)` never raises for a bad row: it returns the valid subjects and, for every bad row,
(row number, id as given, reason), so a catalog job can mark those subjects failed and run the rest.
It raises only when the file itself cannot be read. Relative image directories and local image paths are
resolved against the catalog file's directory, so a catalog travels with its images.

Images are checked here only as far as is cheap and needs no network: a directory must exist and hold
images; a list must be non-empty strings (s3:// URIs are checked when read, by `open_images`).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..store import Store, validate_id
from .images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, check_pixels, list_images, load_image, load_images

COLUMNS = ("id", "images", "prompt", "class", "eval_prompts")


@dataclass(frozen=True)
class Subject:
    id: str
    images: str | tuple[str, ...]  # a local directory, or image URIs (local paths or s3://bucket/key)
    prompt: str
    cls: str = ""
    eval_prompts: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The catalog row (JSON-safe; what Ray ships to workers instead of the dataclass)."""
        return {"id": self.id, "images": self.images if isinstance(self.images, str) else list(self.images),
                "prompt": self.prompt, "class": self.cls, "eval_prompts": list(self.eval_prompts)}


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(1-based row number, parsed row or an error string) for every non-blank row."""
    if not path.is_file():
        raise FileNotFoundError(f"catalog {path} does not exist")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows: list[tuple[int, Any]] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((i, f"not valid JSON ({e.msg} at column {e.colno})"))
    return rows


def _resolve(value: str, base: Path) -> str:
    if "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _parse(row: Any, base: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Subject:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; expected {list(COLUMNS)}")
    sid = validate_id(row.get("id"), "subject id")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    cls = row.get("class") or ""
    if not isinstance(cls, str):
        raise ValueError("'class' must be a string")
    evals = row.get("eval_prompts") or []
    if not isinstance(evals, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in evals):
        raise ValueError("'eval_prompts' must be a list of non-empty strings")
    images = row.get("images")
    if isinstance(images, str):
        if "://" in images and not images.startswith("file://"):
            raise ValueError("'images' as a string must be a local directory; give remote images as a list of URIs")
        images = _resolve(images.removeprefix("file://"), base)
        for p in list_images(images):  # exists, is a directory, holds images (FileNotFoundError / ValueError)
            check_pixels(p, max_pixels)  # header only: size within the pixel budget
    elif isinstance(images, (list, tuple)) and images and all(isinstance(u, str) and u for u in images):
        images = tuple(_resolve(u, base) for u in images)
        for u in images:
            if Path(u).suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"image {u!r} does not end in one of {IMAGE_SUFFIXES}")
            if "://" not in u and not Path(u).is_file():
                raise FileNotFoundError(f"image {u} does not exist")
            if "://" not in u:
                check_pixels(Path(u), max_pixels)
            if "://" in u and not u.startswith("s3://"):
                raise ValueError(f"unsupported image URI {u!r}: local paths or s3://bucket/key")
    else:
        raise ValueError("'images' must be a directory or a non-empty list of image URIs")
    return Subject(sid, images, prompt, cls, tuple(evals))


def load_catalog(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS
                 ) -> tuple[list[Subject], list[tuple[int, str | None, str]]]:
    """Parse and validate a catalog: (valid subjects in file order, [(row, id or None, reason)]). Local images
    are checked from their headers against the pixel budget ``max_pixels``."""
    path = Path(path)
    valid: list[Subject] = []
    errors: list[tuple[int, str | None, str]] = []
    seen: dict[str, int] = {}
    for num, row in _read_rows(path):
        raw_id = row.get("id") if isinstance(row, dict) else None
        raw_id = raw_id if isinstance(raw_id, str) else None
        if isinstance(row, str):
            errors.append((num, None, row))
            continue
        try:
            subject = _parse(row, path.parent, max_pixels)
        except (ValueError, FileNotFoundError) as e:
            errors.append((num, raw_id, str(e)))
            continue
        if subject.id in seen:
            errors.append((num, subject.id, f"duplicate id (first on row {seen[subject.id]})"))
            continue
        seen[subject.id] = num
        valid.append(subject)
    return valid, errors


def open_images(subject: Subject, endpoint_url: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
                ) -> list[Image.Image]:
    """The subject's images, validated exactly like `blockskip train --images` (sorted dir, or list order)."""
    if isinstance(subject.images, str):
        return load_images(subject.images, max_pixels)
    out = []
    for uri in subject.images:
        if not uri.startswith("s3://"):
            out.append(load_image(Path(uri), max_pixels))
            continue
        parent, name = uri.rsplit("/", 1)
        data = Store.open(parent, endpoint_url=endpoint_url).read_bytes(name)
        # Through a file so the bytes get the same checks (empty, mode, decodable) as local images.
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_bytes(data)
            out.append(load_image(p, max_pixels))
    return out


def subject_from_json(row: dict[str, Any]) -> Subject:
    images = row["images"]
    return Subject(row["id"], images if isinstance(images, str) else tuple(images), row["prompt"],
                   row.get("class") or "", tuple(row.get("eval_prompts") or ()))
