"""Checksummed Ray Train checkpoints: a manifest written at save, verified at resume, with fallback.

Every checkpoint directory gets `manifest.json` = {"step": k, "files": {name: sha256}} as its last file. At
resume the checkpoint Ray Train hands back (`ray.train.get_checkpoint()`, the latest persisted one) is checked
against it: a file missing, added or with other bytes (e.g. a tensor overwritten with valid but wrong values)
rejects the checkpoint, and the newest earlier sibling (`checkpoint_*` in the same run directory) that verifies
is used instead. When none does, the subject fails with the reason: never a silently different adapter.

Uploads: pyarrow.fs.copy_files, which Ray Train persists checkpoints with, returns success when an upload
fails at close; the store's S3 filesystem records such failures (store/s3conf.take_failed_uploads) and
:func:`check_persisted` turns them into an error right after `ray.train.report`.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs
from ray.train import Checkpoint

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, step: int) -> dict:
    d = Path(directory)
    files = {p.relative_to(d).as_posix(): _sha256(p) for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {"step": int(step), "files": files}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify(directory: str | Path) -> tuple[int | None, str | None]:
    """(step, None) when the directory matches its manifest, else (None, why)."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files, step = dict(manifest["files"]), int(manifest["step"])
    except FileNotFoundError:
        return None, f"no {MANIFEST} (not written by this version, or its upload was lost)"
    except (ValueError, KeyError, TypeError) as e:
        return None, f"unreadable {MANIFEST} ({type(e).__name__}: {e})"
    present = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing:
        return None, f"missing {', '.join(missing)}"
    if extra:
        return None, f"unexpected {', '.join(extra)}"
    bad = [name for name, want in files.items() if _sha256(d / name) != want]
    if bad:
        return None, f"sha256 mismatch in {', '.join(bad)}"
    return step, None


def _earlier(ckpt: Checkpoint) -> list[Checkpoint]:
    """The run's checkpoints saved before `ckpt`, newest first (Ray names them checkpoint_<timestamp>)."""
    path = ckpt.path.rstrip("/")
    try:
        infos = ckpt.filesystem.get_file_info(pafs.FileSelector(posixpath.dirname(path), allow_not_found=True))
    except OSError:
        return []
    paths = sorted((i.path.rstrip("/") for i in infos if i.type == pafs.FileType.Directory  # not Ray's snapshot
                    and posixpath.basename(i.path).startswith("checkpoint_") and i.path.rstrip("/") < path),
                   reverse=True)
    return [Checkpoint(path=p, filesystem=ckpt.filesystem) for p in paths]


def load_verified(ckpt: Checkpoint, load: Callable[[str], int], log: Callable[[str], None]) -> int:
    """`load(dir)` of the newest checkpoint that verifies, `ckpt` first, then the earlier ones of its run;
    returns what `load` returned. ValueError when none verifies."""
    first_why = None
    for c in [ckpt, *_earlier(ckpt)]:
        with c.as_directory() as d:
            step, why = verify(d)
            if why is None:
                if c is not ckpt:
                    log(f"checkpoint {ckpt.path} is damaged ({first_why}); resuming from the earlier {c.path} "
                        f"(step {step})")
                return load(d)
        first_why = first_why or why
    raise ValueError(f"checkpoint {ckpt.path} is damaged ({first_why}) and no earlier checkpoint of this run "
                     f"verifies; the subject cannot resume exactly")


def prune(store, prefix: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoint_* directories under `prefix` (a run directory of the store);
    returns the deleted ones. Ray Train's CheckpointConfig(num_to_keep) does this as it goes, but leaves the
    extra ones of a run that ends right after reporting; this runs once the subject has succeeded."""
    rels = [k[len(prefix) + 1:] for k in store.list(prefix)]
    dirs = sorted({r.split("/", 1)[0] for r in rels if "/" in r})  # Ray's own files beside them are no checkpoints
    ckpts = [n for n in dirs if n.startswith("checkpoint_")]
    doomed = ckpts[:-keep] if keep < len(ckpts) else []
    for name in doomed:
        store.delete_prefix(f"{prefix}/{name}")
    return doomed


def check_persisted(step: int) -> None:
    """Raise when an upload of the checkpoint just reported failed although Ray Train returned normally."""
    from ..store.s3conf import take_failed_uploads
    failed = take_failed_uploads()
    if failed:
        raise OSError(f"the checkpoint of step {step} was not persisted ({len(failed)} upload(s) failed, first: "
                      f"{failed[0]})")


__all__ = ["write_manifest", "verify", "load_verified", "check_persisted", "prune", "MANIFEST"]
