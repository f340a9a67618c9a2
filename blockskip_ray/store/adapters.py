"""Per-subject LoRA adapters: ``subjects/{subject_id}/adapter/`` (diffusers LoRA format).

The adapter directory holds ``pytorch_lora_weights.safetensors`` (what
``pipe.load_lora_weights(dir)`` reads) and may hold small side files.  An
adapter "exists" exactly when that weights file exists: it is uploaded LAST by
:func:`put_adapter`, so a listed adapter is always complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .ids import is_valid_id, validate_id
from .uri import Store

__all__ = ["ADAPTER_FILE", "adapter_prefix", "list_adapters", "fetch_adapter", "put_adapter"]

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def adapter_prefix(subject_id: str) -> str:
    """Store key of a subject's adapter directory (validates the id)."""
    return f"subjects/{validate_id(subject_id)}/adapter"


def list_adapters(store: Store) -> list[str]:
    """Sorted subject ids that have a complete adapter in ``store``."""
    out = []
    for entry in store.list("subjects", recursive=False):
        sid = entry.rstrip("/").rsplit("/", 1)[-1]
        # Skip anything a human dropped in by hand that isn't a valid id.
        if entry.endswith("/") and is_valid_id(sid) and store.exists(f"{adapter_prefix(sid)}/{ADAPTER_FILE}"):
            out.append(sid)
    return sorted(out)


def fetch_adapter(store: Store, subject_id: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Download the adapter to ``cache_dir/{subject_id}`` and return that directory.

    Raises ValueError for an invalid id (before any I/O) and KeyError (a
    LookupError, what a server maps to 404) for an unknown adapter.  The copy
    is assembled in a temp dir and renamed into place, so concurrent fetches
    never see a half-copied adapter.
    """
    validate_id(subject_id)
    prefix = adapter_prefix(subject_id)
    if not store.exists(f"{prefix}/{ADAPTER_FILE}"):
        raise KeyError(f"unknown adapter {subject_id!r}: no {store.url(prefix)}/{ADAPTER_FILE}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / subject_id
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".tmp-{subject_id}-"))
    try:
        store.download_dir(prefix, tmp)
        if dest.exists():
            shutil.rmtree(dest)  # refresh: the store is the source of truth
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def put_adapter(store: Store, subject_id: str, local_dir: str | os.PathLike[str]) -> None:
    """Upload ``local_dir`` as the subject's adapter (weights file last)."""
    prefix = adapter_prefix(subject_id)
    src = Path(local_dir)
    weights = src / ADAPTER_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} missing: not a diffusers LoRA adapter directory")
    # Remove the old weights first so a reader never pairs old weights with new side files.
    store.delete(f"{prefix}/{ADAPTER_FILE}")
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p != weights):
        store.write_bytes(store.join(prefix, path.relative_to(src).as_posix()), path.read_bytes())
    store.write_bytes(f"{prefix}/{ADAPTER_FILE}", weights.read_bytes())
