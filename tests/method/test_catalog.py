"""The catalog loader: valid subjects in order, one (row, id, reason) per bad row, never an exception for a row."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blockskip_ray.method.catalog import Subject, load_catalog, open_images
from blockskip_ray.method.images import make_synthetic_subject


@pytest.fixture
def root(tmp_path):
    make_synthetic_subject(tmp_path / "a", n=2, size=32, seed=0)
    (tmp_path / "empty").mkdir()
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_valid_and_invalid_rows(root):
    a_imgs = sorted(str(p) for p in (root / "a").iterdir())
    cat = write_jsonl(root / "c.jsonl", [
        {"id": "toy-1", "images": "a", "prompt": "a photo of sks toy", "class": "toy", "eval_prompts": ["x"]},
        {"id": "toy-2", "images": a_imgs, "prompt": "a photo of zwx toy"},
        "",
        {"id": "toy-1", "images": "a", "prompt": "dup"},
        {"id": "../etc", "images": "a", "prompt": "p"},
        {"id": "ok-3", "images": "missing", "prompt": "p"},
        {"id": "ok-4", "images": "empty", "prompt": "p"},
        {"id": "ok-5", "images": "a"},
        {"id": "ok-6", "images": "a", "prompt": "p", "colour": "red"},
        {"id": "ok-7", "images": ["http://x/y.png"], "prompt": "p"},
        "{not json",
    ])
    valid, errors = load_catalog(cat)
    assert [s.id for s in valid] == ["toy-1", "toy-2"]
    assert valid[0] == Subject("toy-1", str((root / "a").resolve()), "a photo of sks toy", "toy", ("x",))
    assert valid[1].images == tuple(a_imgs)
    reasons = {row: (sid, why) for row, sid, why in errors}
    assert reasons[4] == ("toy-1", "duplicate id (first on row 1)")
    assert "invalid subject id" in reasons[5][1]
    assert "does not exist" in reasons[6][1]
    assert "no images" in reasons[7][1]
    assert "'prompt' must be a non-empty string" in reasons[8][1]
    assert "unknown field(s) ['colour']" in reasons[9][1]
    assert "unsupported image URI" in reasons[10][1]
    assert reasons[11][0] is None and "not valid JSON" in reasons[11][1]
    assert len(open_images(valid[1])) == 2


def test_parquet_catalog_and_missing_file(root):
    pq.write_table(pa.Table.from_pylist([{"id": "p-1", "images": str(root / "a"), "prompt": "p", "class": "c"}]),
                   root / "c.parquet")
    valid, errors = load_catalog(root / "c.parquet")
    assert [s.id for s in valid] == ["p-1"] and errors == []
    with pytest.raises(FileNotFoundError):
        load_catalog(root / "nope.jsonl")
