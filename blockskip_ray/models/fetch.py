"""Models from the store: a diffusers pipeline directory published under an s3:// URI, cached per node.

`model:` (jobs, `blockskip serve`, the RayService) is a local diffusers directory or the s3:// URI of one
published with `publish_model` (`python -m blockskip_ray.models.fetch publish DIR s3://bucket/models/NAME`),
which uploads the files and then, last, `blockskip-model.json`: every file's size and sha256. A node that
needs the model downloads it once into its cache (`$BLOCKSKIP_MODEL_CACHE`, default
`~/.cache/blockskip/models`), checks every file against the manifest, and reuses the verified copy while the
manifest is unchanged; a file lock makes concurrent processes on one node download it once.

The cache path mirrors the URI (`<cache>/s3/<bucket>/<prefix>`), so a path handed from one node to another
(the job driver resolves the model and passes a path to its workers) names its source: `materialize(path)`
fetches it on a node that lacks it. Hub ids are never downloaded: anything that is neither a local diffusers
directory nor a published URI is refused by `check_model` with one line, before any replica or worker starts.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..store import Store

MANIFEST = "blockskip-model.json"
CACHE_ENV = "BLOCKSKIP_MODEL_CACHE"
FAMILIES = {"FluxPipeline": "flux", "SanaPipeline": "sana"}
_CHUNK = 8 << 20
_VERIFIED = ".blockskip-verified"  # in a cache dir: the sha256 of the manifest it was verified against


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blockskip" / "models").expanduser().resolve()


def is_store_uri(model: str | os.PathLike[str]) -> bool:
    return str(model).startswith("s3://")


def cache_dir_for(uri: str) -> Path:
    """`<cache>/s3/<bucket>/<prefix>`: readable, and reversible by `source_of`."""
    rest = uri[len("s3://"):].strip("/")
    return cache_root() / "s3" / Store.join(rest)  # join refuses '..', empty and absolute segments


def source_of(path: str | os.PathLike[str]) -> str | None:
    """The s3:// URI a cache path mirrors, or None when `path` is not in this node's cache."""
    try:
        rel = Path(path).expanduser().resolve().relative_to(cache_root() / "s3")
    except ValueError:
        return None
    return f"s3://{rel.as_posix()}" if rel.parts else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _family_of_index(index: dict[str, Any], where: str) -> str:
    cls = index.get("_class_name", "")
    if cls not in FAMILIES:
        raise ValueError(f"model {where}: unsupported pipeline {cls!r}, expected one of {sorted(FAMILIES)}")
    return FAMILIES[cls]


def _read_manifest(store: Store, uri: str) -> tuple[dict[str, dict[str, Any]], str]:
    try:
        raw = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise ValueError(f"model {uri}: no {MANIFEST} there (publish the pipeline directory with "
                         f"`python -m blockskip_ray.models.fetch publish DIR {uri}`)") from None
    try:
        files = json.loads(raw.decode("utf-8"))["files"]
        for rel, meta in files.items():
            Store.join(rel)  # no '..', no absolute paths from a manifest
            if not (isinstance(meta["size"], int) and len(meta["sha256"]) == 64):
                raise ValueError(rel)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"model {uri}: malformed {MANIFEST} ({type(e).__name__})") from None
    if "model_index.json" not in files:
        raise ValueError(f"model {uri}: {MANIFEST} lists no model_index.json (not a diffusers pipeline)")
    return files, hashlib.sha256(raw).hexdigest()


def check_model(model: str | os.PathLike[str]) -> str:
    """The model's family ('flux' / 'sana'), without downloading weights; ValueError with one line otherwise."""
    m = str(model)
    if is_store_uri(m):
        try:
            store = Store.open(m)
            _read_manifest(store, m)
            return _family_of_index(json.loads(store.read_bytes("model_index.json")), m)
        except (OSError, FileNotFoundError) as e:
            raise ValueError(f"model {m}: cannot read it from the store ({type(e).__name__})") from None
    d = Path(m).expanduser()
    if (d / "model_index.json").is_file():
        return _family_of_index(json.loads((d / "model_index.json").read_text()), str(d))
    if "://" in m:
        raise ValueError(f"model {m!r}: unsupported URI scheme (give a local diffusers directory or an s3:// URI)")
    if source_of(d) is not None:
        return check_model(source_of(d))  # a cache path from another node: check its source
    raise ValueError(f"model {m!r}: not a local diffusers directory (no model_index.json) and not an s3:// URI; "
                     f"hub ids are not downloaded: publish the pipeline with `python -m blockskip_ray.models.fetch "
                     f"publish DIR s3://bucket/models/NAME`")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one download per node, whatever number of processes ask
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(store: Store, rel: str, dest: Path, size: int, sha256: str, uri: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, n = hashlib.sha256(), 0
    with store.filesystem.open_input_stream(store.fs_path(rel)) as src, dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
            out.write(chunk)
    if n != size or h.hexdigest() != sha256:
        raise ValueError(f"model {uri}: {rel} does not match {MANIFEST} (size {n} vs {size} or sha256 differs)")


def ensure_local(model: str | os.PathLike[str]) -> Path:
    """A local directory holding the model: the directory itself, or this node's verified cached copy."""
    m = str(model)
    if not is_store_uri(m):
        if source_of(m) is not None and not (Path(m) / "model_index.json").is_file():
            return ensure_local(source_of(m))
        check_model(m)
        return Path(m).expanduser().resolve()
    store = Store.open(m)
    files, digest = _read_manifest(store, m)
    dest = cache_dir_for(m)
    with _locked(dest.parent / f".{dest.name}.lock"):
        marker = dest / _VERIFIED
        if marker.is_file() and marker.read_text() == digest:
            return dest  # verified against this very manifest: reuse
        tmp = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel, meta in sorted(files.items()):
                _download(store, rel, tmp / rel, meta["size"], meta["sha256"], m)
            _family_of_index(json.loads((tmp / "model_index.json").read_text()), m)
            (tmp / _VERIFIED).write_text(digest)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def materialize(path: str | os.PathLike[str]) -> Path:
    """`path` as a usable local directory: a URI or a cache path of another node is fetched here first."""
    if is_store_uri(path) or (source_of(path) is not None and not (Path(path) / "model_index.json").is_file()):
        return ensure_local(path)
    return Path(path)


def publish_model(local_dir: str | os.PathLike[str], uri: str) -> dict[str, dict[str, Any]]:
    """Upload a diffusers pipeline directory to `uri`, then its manifest (last: readers trust only that)."""
    src = Path(local_dir)
    check_model(src)
    if not is_store_uri(uri):
        raise ValueError(f"publish target must be an s3:// URI, got {uri!r}")
    store = Store.open(uri)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(src).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
        with path.open("rb") as f, store.filesystem.open_output_stream(store.fs_path(rel)) as out:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
    store.write_json(MANIFEST, {"format": 1, "files": files})
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blockskip_ray.models.fetch",
                                description="Publish a diffusers pipeline directory to the store, or fetch one.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="upload DIR to an s3:// URI with a sha256 manifest")
    pub.add_argument("dir")
    pub.add_argument("uri")
    get = sub.add_parser("fetch", help="download (once, verified) into this node's cache; prints the path")
    get.add_argument("uri")
    a = p.parse_args(argv)
    try:
        if a.cmd == "publish":
            files = publish_model(a.dir, a.uri)
            print(f"published {len(files)} files to {a.uri}")
        else:
            print(ensure_local(a.uri))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
