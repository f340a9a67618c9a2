"""Issue 14 item 4: a per-image pixel budget checked from the header before decoding; an image over it fails its
subject at catalog validation with the reason (PNG and JPEG headers forged to claim huge sizes)."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from blockskip_ray.method.catalog import load_catalog
from blockskip_ray.method.images import DEFAULT_MAX_PIXELS, check_pixels, load_image, make_synthetic_subject


def forged_png(path: Path, w: int, h: int) -> Path:
    """A tiny PNG whose IHDR claims w x h (a ~300-byte 'decompression bomb' header)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def forged_jpeg(path: Path, w: int, h: int) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("forge", [forged_png, forged_jpeg])
def test_header_over_budget_is_refused_before_decoding(tmp_path, forge):
    bomb = forge(tmp_path / ("bomb" + (".png" if forge is forged_png else ".jpg")), 20000, 20000)
    assert bomb.stat().st_size < 1000
    with pytest.raises(ValueError, match="over the pixel budget max_image_pixels=16777216"):
        load_image(bomb)  # PIL alone raises DecompressionBombError here (uncaught before the fix)
    big = forge(tmp_path / ("big" + bomb.suffix), 12000, 12000)  # under PIL's limit: it would decode 1.35 GB
    with pytest.raises(ValueError, match=r"is 12000x12000 = 144000000 pixels, over the pixel budget"):
        load_image(big)
    assert check_pixels(big, max_pixels=None) == (12000, 12000)  # the header alone gives the size
    assert DEFAULT_MAX_PIXELS == 4096 * 4096


def test_over_budget_image_fails_its_subject_at_validation(tmp_path):
    make_synthetic_subject(tmp_path / "good", n=2, size=64)
    make_synthetic_subject(tmp_path / "bad", n=2, size=64)
    forged_png(tmp_path / "bad" / "img_09.png", 20000, 20000)
    rows = [{"id": "good", "images": "good", "prompt": "p"}, {"id": "bad", "images": "bad", "prompt": "p"},
            {"id": "listed", "images": [str(tmp_path / "bad" / "img_09.png")], "prompt": "p"}]
    cat = tmp_path / "cat.jsonl"
    cat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid, errors = load_catalog(cat)
    assert [s.id for s in valid] == ["good"]
    assert [(r, i) for r, i, _ in errors] == [(2, "bad"), (3, "listed")]
    assert all("img_09.png" in why and "over the pixel budget" in why for _, _, why in errors)
    valid, errors = load_catalog(cat, max_pixels=32 * 32)  # the budget is the caller's (job key max_image_pixels)
    assert valid == [] and "is 64x64 = 4096 pixels" in errors[0][2]


def test_job_key_reaches_validation(tmp_path):
    from blockskip_ray.distributed.jobs import validate_catalog
    from blockskip_ray.distributed.jobspec import load_spec
    from blockskip_ray.store import JobStatus, Store
    make_synthetic_subject(tmp_path / "a", n=2, size=64)
    cat = tmp_path / "cat.jsonl"
    cat.write_text(json.dumps({"id": "a", "images": "a", "prompt": "p"}) + "\n")
    job = load_spec({"job_id": "j", "model": "m", "catalog": str(cat), "store": str(tmp_path / "s")},
                    ["max_image_pixels=1000"])
    status = JobStatus(Store.open(str(tmp_path / "s")), "j")
    valid, failed = validate_catalog(job, status, str(cat), log=lambda m: None)
    assert valid == [] and "max_image_pixels=1000" in failed["a"]
    row = status.read()[0]
    assert (row["stage"], row["state"]) == ("validate", "failed") and "over the pixel budget" in row["error"]
    with pytest.raises(ValueError, match="max_image_pixels"):
        load_spec({"job_id": "j", "model": "m"}, ["max_image_pixels=0"])
