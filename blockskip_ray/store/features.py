"""Precomputed feature shards (design section 4).

Layout under ``subjects/{subject_id}/features/``::

    shard-00000.safetensors, shard-00001.safetensors, ...   tensors "{step:06d}/{name}"
    index.parquet    one row per (step, tensor): where it is, how it is stored, its sha256
    _COMMITTED       JSON, written LAST: readers trust only committed sets

Commit protocol: shards, then the index, then ``_COMMITTED`` (which records the
index's sha256).  A writer that dies before ``commit`` leaves no
``_COMMITTED``, so :class:`FeatureReader` refuses the set.  A new writer first
deletes ``_COMMITTED`` and then the old files, so a reader never pairs a
marker with a half-rewritten set.

Determinism: shards, index and marker contain no timestamps, hostnames or
random ids, so the same steps and tensors give byte-identical files (a rerun
after a failure is verifiable by hash).

Only safetensors and Parquet are parsed: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .codec import FP8_MAX, dtype_from_name, dtype_name, encode, header_offsets, dequantize_fp8, quantize_fp8
from .ids import validate_id
from .uri import Store, parquet_from_bytes

__all__ = [
    "FeatureWriter", "FeatureReader", "is_committed", "delete_features", "features_prefix", "FeatureDamage",
    "committed_damage", "invalidate_features",
    "quantize_fp8", "dequantize_fp8", "DTYPES", "FP8_MAX",
]

DTYPES = ("fp32", "bf16", "fp8_e4m3")
FORMAT_VERSION = 1
INDEX_FILE = "index.parquet"
COMMIT_FILE = "_COMMITTED"

INDEX_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("shard", pa.string()),          # file name, e.g. "shard-00000.safetensors"
    ("key", pa.string()),            # tensor name as given to add(): "h", "delta", ...
    ("dtype", pa.string()),          # stored torch dtype, e.g. "bfloat16"
    ("orig_dtype", pa.string()),     # dtype restored by the reader
    ("shape", pa.list_(pa.int64())),
    ("sha256", pa.string()),         # of the stored tensor's raw bytes in the shard
    ("offset", pa.int64()),          # byte offset of those bytes in the shard file
    ("nbytes", pa.int64()),
    ("scale_sha256", pa.string()),   # fp8 only: sha256 of the "{name}.scale" tensor
])


def features_prefix(subject_id: str) -> str:
    return f"subjects/{validate_id(subject_id)}/features"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.endswith(".scale"):
        raise ValueError(f"invalid tensor name {name!r}: non-empty, no '/', must not end in '.scale'")
    return name


# ---------------------------------------------------------------- writer
class FeatureWriter:
    """Writes one subject's features as size-bounded safetensors shards.

    Steps must arrive in strictly increasing order; a step's tensors never
    straddle two shards.  Nothing is readable until :meth:`commit`.
    """

    def __init__(self, store: Store, subject_id: str, *, dtype: str = "bf16",
                 shard_max_bytes: int = 256 * 2**20) -> None:
        self.subject_id = validate_id(subject_id)
        if dtype not in DTYPES:
            raise ValueError(f"unknown feature dtype {dtype!r}: choose one of {DTYPES}")
        if shard_max_bytes <= 0:
            raise ValueError("shard_max_bytes must be positive")
        self.store = store
        self.dtype = dtype
        self.shard_max_bytes = shard_max_bytes
        self.prefix = features_prefix(subject_id)
        self._pending: dict[str, torch.Tensor] = {}   # current shard's stored tensors
        self._pending_meta: list[dict[str, Any]] = []  # index rows, shard/offset filled at flush
        self._pending_bytes = 0
        self._rows: list[dict[str, Any]] = []
        self._shards: list[str] = []
        self._last_step: int | None = None
        self._started = False
        self._committed = False

    def _start(self) -> None:
        # Invalidate any previous set before writing new files: marker first,
        # so no reader trusts a mix of old and new shards.
        if not self._started:
            delete_features(self.store, self.subject_id)
            self._started = True

    def add(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer one step's tensors; flushes a shard when it would exceed the size cap."""
        if self._committed:
            raise RuntimeError("FeatureWriter already committed")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"steps must be strictly increasing: {step} after {self._last_step}")
        if not tensors:
            raise ValueError(f"step {step}: no tensors")
        self._start()
        stored: dict[str, torch.Tensor] = {}
        meta: list[dict[str, Any]] = []
        for name in sorted(tensors):  # sorted: dict order must not change the bytes
            t = tensors[_check_name(name)]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"step {step} tensor {name!r} is {type(t).__name__}, not a torch.Tensor")
            enc = encode(name, t, self.dtype)
            for k, v in enc.items():
                stored[f"{step:06d}/{k}"] = v
            meta.append({"step": step, "key": name, "dtype": dtype_name(enc[name].dtype),
                         "orig_dtype": dtype_name(t.dtype), "shape": list(t.shape),
                         "has_scale": f"{name}.scale" in enc})
        nbytes = sum(v.numel() * v.element_size() for v in stored.values())
        if self._pending and self._pending_bytes + nbytes > self.shard_max_bytes:
            self._flush()
        self._pending.update(stored)
        self._pending_meta.extend(meta)
        self._pending_bytes += nbytes
        self._last_step = step

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self._shards):05d}.safetensors"
        data = st_save(self._pending)  # no metadata: deterministic bytes
        offsets = header_offsets(data)
        for m in self._pending_meta:
            start, end = offsets[f"{m['step']:06d}/{m['key']}"]
            scale_sha = None
            if m["has_scale"]:
                s0, s1 = offsets[f"{m['step']:06d}/{m['key']}.scale"]
                scale_sha = hashlib.sha256(data[s0:s1]).hexdigest()
            self._rows.append({
                "step": m["step"], "shard": name, "key": m["key"], "dtype": m["dtype"],
                "orig_dtype": m["orig_dtype"], "shape": m["shape"],
                "sha256": hashlib.sha256(data[start:end]).hexdigest(),
                "offset": start, "nbytes": end - start, "scale_sha256": scale_sha,
            })
        self.store.write_bytes(f"{self.prefix}/{name}", data)
        self._shards.append(name)
        self._pending, self._pending_meta, self._pending_bytes = {}, [], 0

    def commit(self, extra_meta: dict[str, Any] | None = None) -> None:
        """Flush the last shard, write the index, then ``_COMMITTED`` (last)."""
        if self._committed:
            raise RuntimeError("FeatureWriter already committed")
        if self._last_step is None:
            raise ValueError(f"no steps added for subject {self.subject_id!r}")
        self._flush()
        table = pa.Table.from_pylist(self._rows, schema=INDEX_SCHEMA)
        self.store.write_table(f"{self.prefix}/{INDEX_FILE}", table)
        index_bytes = self.store.read_bytes(f"{self.prefix}/{INDEX_FILE}")
        marker = {
            "format": FORMAT_VERSION,
            "subject_id": self.subject_id,
            "dtype": self.dtype,
            "num_steps": len({r["step"] for r in self._rows}),
            "num_shards": len(self._shards),
            "shards": self._shards,
            "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
            # No "created" time on purpose: reruns must be byte-identical.
            "extra": extra_meta or {},
        }
        self.store.write_json(f"{self.prefix}/{COMMIT_FILE}", marker)
        self._committed = True


# ---------------------------------------------------------------- reader
class _Shard:
    """A loaded shard: raw bytes (for hashing) and the decoded tensors."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data
        try:
            self.tensors = st_load(data)
        except Exception as e:  # corrupt header / truncated file
            raise FeatureDamage(f"feature shard {name} is corrupt: {e}") from e
        self.verified: set[int] = set()


class FeatureReader:
    """Reads a committed feature set, verifying every tensor's sha256."""

    def __init__(self, store: Store, subject_id: str, *, cache_shards: int = 2) -> None:
        self.subject_id = validate_id(subject_id)
        self.store = store
        self.prefix = features_prefix(subject_id)
        try:
            self.meta: dict[str, Any] = _read_marker(store, self.prefix)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"features not committed for subject {subject_id!r} at {store.url(self.prefix)} "
                f"(no {COMMIT_FILE}; a partial set is never read)") from None
        index_bytes = store.read_bytes(f"{self.prefix}/{INDEX_FILE}")
        if hashlib.sha256(index_bytes).hexdigest() != self.meta.get("index_sha256"):
            raise FeatureDamage(f"feature index {store.url(self.prefix)}/{INDEX_FILE} does not match "
                                f"{COMMIT_FILE}")
        rows = parquet_from_bytes(index_bytes).to_pylist()
        self._rows: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            self._rows.setdefault(r["step"], []).append(r)
        self._steps = sorted(self._rows)
        self._cache: OrderedDict[str, _Shard] = OrderedDict()
        self._cache_size = max(1, cache_shards)
        self._lock = threading.Lock()

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def dtype(self) -> str:
        return str(self.meta.get("dtype"))

    def shard_of(self, step: int) -> str:
        if step not in self._rows:
            raise KeyError(f"step {step} not in features of subject {self.subject_id!r}")
        return self._rows[step][0]["shard"]

    def _fetch(self, shard: str) -> _Shard:
        return _Shard(shard, self.store.read_bytes(f"{self.prefix}/{shard}"))

    def _shard(self, shard: str) -> _Shard:
        with self._lock:
            if shard in self._cache:
                self._cache.move_to_end(shard)
                return self._cache[shard]
        loaded = self._fetch(shard)
        self._put_cache(loaded)
        return loaded

    def _put_cache(self, sh: _Shard) -> None:
        with self._lock:
            self._cache[sh.name] = sh
            self._cache.move_to_end(sh.name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _decode(self, step: int, sh: _Shard) -> dict[str, torch.Tensor]:
        rows = self._rows[step]
        if step not in sh.verified:
            offsets = header_offsets(sh.data)
            for r in rows:
                checks = [(r["key"], r["sha256"])]
                if r["scale_sha256"] is not None:
                    checks.append((f"{r['key']}.scale", r["scale_sha256"]))
                for k, want in checks:
                    rng = offsets.get(f"{step:06d}/{k}")
                    got = hashlib.sha256(sh.data[rng[0]:rng[1]]).hexdigest() if rng else None
                    if got != want:
                        raise FeatureDamage(f"checksum mismatch in feature shard "
                                            f"{self.store.url(f'{self.prefix}/{sh.name}')} at step {step} "
                                            f"(tensor {k!r}, subject {self.subject_id!r})")
            sh.verified.add(step)
        out: dict[str, torch.Tensor] = {}
        for r in rows:
            t = sh.tensors[f"{step:06d}/{r['key']}"]
            orig = dtype_from_name(r["orig_dtype"])
            if r["scale_sha256"] is not None:
                out[r["key"]] = dequantize_fp8(t, sh.tensors[f"{step:06d}/{r['key']}.scale"], orig)
            elif t.dtype != orig:
                out[r["key"]] = t.to(orig)
            else:
                out[r["key"]] = t.clone()  # callers may mutate; the cache must not change
            if list(out[r["key"]].shape) != list(r["shape"]):
                raise FeatureDamage(f"shape mismatch in feature shard {sh.name} at step {step} tensor {r['key']!r}")
        return out

    def get(self, step: int) -> dict[str, torch.Tensor]:
        """The step's tensors in their original dtypes; ValueError on checksum mismatch."""
        return self._decode(step, self._shard(self.shard_of(step)))

    def iter_steps(self, steps: Iterable[int] | None = None,
                   prefetch: int = 2) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(step, tensors)`` in the given order, prefetching shards in a thread.

        The loader thread reads up to ``prefetch`` shards ahead into a bounded
        queue; errors in it are re-raised here.  Closing the iterator early
        stops the thread.
        """
        order = self.steps if steps is None else list(steps)
        for s in order:
            self.shard_of(s)  # KeyError now, not halfway through
        # Runs of consecutive requested steps that live in the same shard.
        runs: list[tuple[str, list[int]]] = []
        for s in order:
            sh = self.shard_of(s)
            if runs and runs[-1][0] == sh:
                runs[-1][1].append(s)
            else:
                runs.append((sh, [s]))
        q: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def producer() -> None:
            try:
                for name, run_steps in runs:
                    with self._lock:
                        cached = self._cache.get(name)
                    if not put((cached or self._fetch(name), run_steps)):
                        return
                put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(e)

        thread = threading.Thread(target=producer, name=f"features-prefetch-{self.subject_id}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                sh, run_steps = item
                self._put_cache(sh)
                for s in run_steps:
                    yield s, self._decode(s, sh)
        finally:
            stop.set()
            thread.join(timeout=5)


# --------------------------------------------------------------- helpers
def is_committed(store: Store, subject_id: str) -> bool:
    """True when the subject has a committed set whose files are all still there.

    A marker alone is not enough: the bucket's lifecycle rule (infra/terraform) expires feature objects, and
    a set that lost a shard must count as absent so that precompute rewrites it instead of skipping it."""
    prefix = features_prefix(subject_id)  # validates before touching the store
    try:
        marker = _read_marker(store, prefix)
    except (FileNotFoundError, FeatureDamage):  # a damaged marker vouches for nothing (see committed_damage)
        return False
    present = set(store.list(prefix))
    return all(f"{prefix}/{name}" in present for name in [*marker.get("shards", []), INDEX_FILE])


class FeatureDamage(ValueError):
    """A committed feature set (or its marker) is damaged: a checksum, the index or the marker itself is wrong."""


def _read_marker(store: Store, prefix: str) -> dict[str, Any]:
    """The parsed _COMMITTED marker; FeatureDamage naming the object when it is not a valid marker."""
    key = f"{prefix}/{COMMIT_FILE}"
    data = store.read_bytes(key)
    try:
        marker = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FeatureDamage(f"corrupt commit marker {store.url(key)} ({type(e).__name__}: {e})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("shards"), list) or "index_sha256" not in marker:
        raise FeatureDamage(f"corrupt commit marker {store.url(key)} (not a feature-set marker)")
    return marker


def committed_damage(store: Store, subject_id: str) -> str | None:
    """Why the subject's committed set cannot be trusted (naming the object), or None when it has no marker or
    the marker and index check out. Cheap (marker + index only); shard checksums are verified when read."""
    prefix = features_prefix(subject_id)
    try:
        marker = _read_marker(store, prefix)
        index_bytes = store.read_bytes(f"{prefix}/{INDEX_FILE}")
    except FileNotFoundError:
        return None  # no marker (nothing committed) or a missing index (is_committed says absent: rebuilt)
    except FeatureDamage as e:
        return str(e)
    if hashlib.sha256(index_bytes).hexdigest() != marker["index_sha256"]:
        return f"feature index {store.url(f'{prefix}/{INDEX_FILE}')} does not match its commit marker"
    return None


def invalidate_features(store: Store, subject_id: str) -> None:
    """Drop the marker of a damaged set: readers stop trusting it and the next precompute rebuilds it."""
    store.delete(f"{features_prefix(subject_id)}/{COMMIT_FILE}")


def delete_features(store: Store, subject_id: str) -> None:
    """Remove a feature set: the marker first (so readers stop trusting it), then the rest."""
    prefix = features_prefix(subject_id)
    marker = f"{prefix}/{COMMIT_FILE}"
    store.delete(marker)
    store.delete_prefix(prefix)
