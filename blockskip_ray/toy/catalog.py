"""`toy:N` catalogs: the first N held-out toy identities as personalization subjects (reference images +
catalog.jsonl), for jobs on the pretrained toy model (`model: toy:flux`)."""
from __future__ import annotations

import json
from pathlib import Path

from .domain import HELD_OUT, eval_prompts, subject_prompt, subject_id, write_subject


def parse_toy_catalog(spec: str) -> int:
    head, _, n = spec.partition(":")
    if head != "toy" or not n.isdigit() or not 1 <= int(n) <= len(HELD_OUT):
        raise ValueError(f"catalog {spec!r}: expected toy:N with 1 <= N <= {len(HELD_OUT)} (the held-out toy subjects)")
    return int(n)


def write_toy_catalog(spec: str, root: str | Path, images_per_subject: int = 5) -> Path:
    n = parse_toy_catalog(spec)
    root = Path(root)
    rows = []
    for i in range(n):
        sid = subject_id(i)
        if not (root / sid).is_dir():
            write_subject(i, root / sid, n=images_per_subject)
        rows.append({"id": sid, "images": sid, "prompt": subject_prompt(), "class": "toy",
                     "eval_prompts": eval_prompts()})
    path = root / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


__all__ = ["write_toy_catalog", "parse_toy_catalog"]
