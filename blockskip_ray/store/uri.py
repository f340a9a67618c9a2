"""One interface over local directories and S3-compatible object stores.

A :class:`Store` is rooted at a URI (a local path, ``file://...`` or
``s3://bucket/prefix``).  Everything below it is addressed by *keys*:
'/'-separated relative paths such as ``subjects/toy-1/plan.parquet``.  Local
and S3 stores behave the same from the caller's point of view:

* writes are atomic (local: temp file + ``os.replace``; S3: one PUT or a
  completed multipart upload), so a reader never sees a partial object;
* a missing key raises :class:`FileNotFoundError` naming the key;
* every S3 call is retried on transient errors (5xx, throttling, timeouts,
  dropped connections) by the S3 client itself, per one :class:`RetryPolicy`
  (store/retry.py: a time budget mapped onto pyarrow's and botocore's retry
  settings); permanent errors (404, 403, ...) raise at once, naming the key.

S3 I/O goes through pyarrow's S3 filesystem (what Ray Data and Ray Train use
too, see :attr:`Store.filesystem`) behind :class:`~.s3conf.S3Handler`, which
follows boto3's refreshing credential chain and writes no directory markers;
boto3 does tagged writes and deletes. Credentials never appear in ``repr``,
logs, exception messages or pickles.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .s3conf import S3Handler, S3Settings, content_type
from .retry import DENIED_RE, NOT_FOUND_RE, RetryPolicy, is_transient_error

__all__ = ["Store", "RetryPolicy", "is_transient_error", "parquet_from_bytes"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Temp files of in-flight local writes start with this; list() hides them.
_TMP_PREFIX = ".tmp-"


class Store:
    """A local directory or an S3 prefix, addressed by '/'-separated keys.

    Construct with :meth:`Store.open`.  Instances are picklable (Ray ships them
    to workers); the boto3 client is rebuilt lazily on the other side.
    """

    def __init__(
        self,
        *,
        uri: str,
        fs: pafs.FileSystem,
        local_root: Path | None = None,
        bucket: str | None = None,
        prefix: str = "",
        retry: RetryPolicy | None = None,
        handler: S3Handler | None = None,
    ) -> None:
        self._uri = uri
        self._fs = fs
        self._local_root = local_root
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self.retry = retry or RetryPolicy()
        self._handler = handler  # S3 only: boto3 client + refreshing pyarrow fs (no secrets in its state)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        retry: RetryPolicy | None = None,
        retry_attempts: int | None = None,
        connect_timeout: float | None = None,
        request_timeout: float | None = None,
    ) -> "Store":
        """Open a store at a local path, ``file://`` URI or ``s3://bucket/prefix``.

        For S3 the endpoint comes from ``endpoint_url`` or AWS_ENDPOINT_URL_S3 /
        AWS_ENDPOINT_URL; the region from ``region`` or AWS_REGION /
        AWS_DEFAULT_REGION / the profile; credentials from the boto3 chain
        (``profile`` or AWS_PROFILE, env, config files, instance metadata), refreshed when they expire.
        ``retry`` (default: :meth:`RetryPolicy.from_env`) sets the S3 retry budget; ``retry_attempts`` pins
        the attempt count of every S3 call instead.
        """
        if retry is None:
            retry = RetryPolicy.from_env(max_attempts=retry_attempts)
        elif retry_attempts is not None:
            raise ValueError("give retry or retry_attempts, not both")
        if uri.startswith("s3://"):
            return cls._open_s3(
                uri, endpoint_url=endpoint_url, region=region, profile=profile, retry=retry,
                connect_timeout=connect_timeout, request_timeout=request_timeout,
            )
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"unsupported store URI scheme: {uri!r} (use a local path or s3://bucket/prefix)")
        path = Path(urlparse(uri).path if uri.startswith("file://") else uri).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(uri=str(path), fs=pafs.LocalFileSystem(), local_root=path, retry=retry)

    @classmethod
    def _open_s3(
        cls, uri: str, *, endpoint_url: str | None, region: str | None, profile: str | None,
        retry: RetryPolicy, connect_timeout: float | None, request_timeout: float | None,
    ) -> "Store":
        p = urlparse(uri)
        bucket, prefix = p.netloc, p.path.strip("/")
        if not bucket:
            raise ValueError(f"S3 URI has no bucket: {uri!r}")
        settings = S3Settings.resolve(endpoint_url=endpoint_url, region=region, profile=profile,
                                      connect_timeout=connect_timeout, request_timeout=request_timeout, retry=retry)
        handler = S3Handler(settings)
        root = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        return cls(uri=root, fs=pafs.PyFileSystem(handler), bucket=bucket, prefix=prefix, retry=retry,
                   handler=handler)

    # ------------------------------------------------------------ properties
    @property
    def uri(self) -> str:
        """Root URI: an absolute local path, or ``s3://bucket[/prefix]``."""
        return self._uri

    @property
    def local_path(self) -> Path | None:
        """The root directory for local stores, ``None`` for S3."""
        return self._local_root

    @property
    def is_local(self) -> bool:
        return self._local_root is not None

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem (for Ray Data, Ray Train's storage_filesystem, pyarrow.dataset); see
        :meth:`fs_path`. For S3 it retries per :attr:`retry` and refreshes credentials in any process it is
        unpickled in."""
        return self._fs

    def fs_path(self, key: str = "") -> str:
        """Path of ``key`` inside :attr:`filesystem` (no scheme)."""
        key = self._check_key(key, allow_empty=True)
        if self._local_root is not None:
            return str(self._local_root / key) if key else str(self._local_root)
        parts = [p for p in (self._bucket, self._prefix, key) if p]
        return "/".join(parts)

    def __repr__(self) -> str:  # never include credentials
        return f"Store({self._uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        # The PyFileSystem pickles as its handler, whose state is the settings only (no keys, no client);
        # keep the two sharing one handler on the other side.
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = pafs.PyFileSystem(self._handler) if self._handler is not None else pafs.LocalFileSystem()

    # ------------------------------------------------------------------ keys
    @staticmethod
    def join(*parts: str) -> str:
        """Join key parts with '/', refusing '..', '.', absolute and empty parts."""
        segs: list[str] = []
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(f"key part must be str, got {type(part).__name__}")
            if part.startswith("/") or part.startswith("\\") or re.match(r"^[A-Za-z]:", part):
                raise ValueError(f"absolute key part not allowed: {part!r}")
            for seg in part.split("/"):
                if seg in ("", ".", ".."):
                    raise ValueError(f"invalid key part {part!r}: empty, '.' or '..' segment")
                if "\\" in seg or "\x00" in seg:
                    raise ValueError(f"invalid key part {part!r}: backslash or NUL")
                segs.append(seg)
        if not segs:
            raise ValueError("empty key")
        return "/".join(segs)

    def _check_key(self, key: str, *, allow_empty: bool = False) -> str:
        # Trailing '/' is tolerated on prefixes ("subjects/"); a leading one is
        # an absolute path and is refused by join().
        key = key.rstrip("/") if isinstance(key, str) and key not in ("/",) else key
        if allow_empty and key == "":
            return ""
        return self.join(key)

    def url(self, key: str) -> str:
        """Full URI of ``key`` (a local path for local stores)."""
        key = self._check_key(key, allow_empty=True)
        if self._local_root is not None:
            return str(self._local_root / key) if key else str(self._local_root)
        return f"{self._uri}/{key}" if key else self._uri

    # ---------------------------------------------------------------- retry
    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (the S3 client retries transient errors itself); map errors to clear, key-naming ones."""
        url = self.url(key) if key else self._uri
        try:
            return fn()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{op}: no such key {url}") from e
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - classified below
            msg = str(e)
            if not isinstance(e, OSError) and not is_transient_error(e):
                raise
            if NOT_FOUND_RE.search(msg):
                raise FileNotFoundError(f"{op}: no such key {url}") from e
            if isinstance(e, PermissionError) or DENIED_RE.search(msg):
                raise PermissionError(f"{op}: access denied to {url}") from e
            if self._local_root is None and is_transient_error(e):
                raise OSError(f"{op} {url} failed after the S3 retry budget ({self.retry.describe()}): "
                              f"{msg}") from e
            raise OSError(f"{op} {url} failed: {msg}") from e

    # ------------------------------------------------------------ bytes I/O
    def read_bytes(self, key: str) -> bytes:
        """Whole object as bytes; FileNotFoundError if missing."""
        key = self._check_key(key)
        if self._local_root is not None:
            return self._call("read", key, lambda: (self._local_root / key).read_bytes())  # type: ignore[operator]
        path = self.fs_path(key)

        def _read() -> bytes:
            with self._fs.open_input_stream(path) as f:
                return f.read()

        return self._call("read", key, _read)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key`` with ``data``."""
        key = self._check_key(key)
        data = bytes(data)
        if self._local_root is not None:
            self._call("write", key, lambda: _atomic_local_write(self._local_root / key, data))  # type: ignore[operator]
            return
        path = self.fs_path(key)
        tagging = object_tagging(key)
        if tagging is not None:
            # pyarrow's S3 output streams cannot set object tags: one boto3 PUT carries data and tags together
            # (never an untagged object that the lifecycle rule would miss).
            full = "/".join(p for p in (self._prefix, key) if p)
            self._call("write", key, lambda: self._client().put_object(Bucket=self._bucket, Key=full, Body=data,
                                                                       Tagging=tagging,
                                                                       ContentType=content_type(key)))
            return

        def _write() -> None:
            # One PUT (or a multipart upload that becomes visible only when
            # completed): readers see the old object or the new one, never part.
            with self._fs.open_output_stream(path, metadata={"Content-Type": content_type(key)}) as f:
                f.write(data)

        self._call("write", key, _write)

    def exists(self, key: str) -> bool:
        """True if ``key`` is an object (file), not a directory prefix."""
        key = self._check_key(key)
        if self._local_root is not None:
            return (self._local_root / key).is_file()
        path = self.fs_path(key)
        return self._call("exists", key, lambda: self._fs.get_file_info(path).type == pafs.FileType.File)

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Sorted keys under the directory ``prefix`` (relative to the store root).

        ``prefix`` names a directory ("subjects/a" lists "subjects/a/..."), not a
        string prefix.  With ``recursive=False`` only direct children are
        returned; sub-directories appear with a trailing '/'.  Missing prefix -> [].
        """
        prefix = self._check_key(prefix, allow_empty=True)
        if self._local_root is not None:
            return self._list_local(prefix, recursive)
        base = self.fs_path(prefix)
        root = self.fs_path("")

        def _list() -> list[str]:
            sel = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
            out = []
            for info in self._fs.get_file_info(sel):
                rel = info.path[len(root):].lstrip("/")
                if info.type == pafs.FileType.File:
                    out.append(rel)
                elif not recursive and info.type == pafs.FileType.Directory:
                    out.append(rel + "/")
            return out

        return sorted(self._call("list", prefix, _list))

    def _list_local(self, prefix: str, recursive: bool) -> list[str]:
        assert self._local_root is not None
        base = self._local_root / prefix if prefix else self._local_root
        if not base.is_dir():
            return []
        out: list[str] = []
        if recursive:
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if not name.startswith(_TMP_PREFIX):
                        out.append(Path(dirpath, name).relative_to(self._local_root).as_posix())
        else:
            for child in base.iterdir():
                if child.name.startswith(_TMP_PREFIX):
                    continue
                rel = child.relative_to(self._local_root).as_posix()
                out.append(rel + "/" if child.is_dir() else rel)
        return sorted(out)

    def delete(self, key: str) -> None:
        """Delete one key (no-op if missing)."""
        key = self._check_key(key)
        if self._local_root is not None:
            (self._local_root / key).unlink(missing_ok=True)
            return
        full = "/".join(p for p in (self._prefix, key) if p)
        # Raw DeleteObject: idempotent, and leaves no directory markers behind.
        self._call("delete", key, lambda: self._client().delete_object(Bucket=self._bucket, Key=full))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under the directory ``prefix`` (no-op if none)."""
        prefix = self._check_key(prefix)  # refuses "" so the whole store can't go by accident
        if self._local_root is not None:
            import shutil

            target = self._local_root / prefix
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            return
        # Raw API rather than pyarrow's delete_dir: pyarrow re-creates empty
        # "parent/" marker objects after deletes, which would litter the layout.
        full = "/".join(p for p in (self._prefix, prefix) if p) + "/"

        def _delete() -> None:
            client = self._client()
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self._bucket, Prefix=full):
                objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                for i in range(0, len(objs), 1000):
                    resp = client.delete_objects(Bucket=self._bucket,
                                                 Delete={"Objects": objs[i:i + 1000], "Quiet": True})
                    if resp.get("Errors"):
                        first = resp["Errors"][0]
                        raise OSError(f"delete failed for {first.get('Key')}: {first.get('Code')}")

        self._call("delete", prefix, _delete)

    def _client(self) -> Any:
        """The boto3 S3 client (refreshing credentials, retries per :attr:`retry`), built once per process."""
        assert self._handler is not None
        return self._handler.client()

    # ------------------------------------------------------------ directories
    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> Path:
        """Copy every key under ``prefix`` into ``local_dir`` (same relative layout)."""
        prefix = self._check_key(prefix)
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        keys = self.list(prefix)
        if not keys:
            raise FileNotFoundError(f"download: nothing under {self.url(prefix)}")
        for key in keys:
            rel = key[len(prefix):].lstrip("/")
            _atomic_local_write(dest / rel, self.read_bytes(key))
        return dest

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> None:
        """Copy every file under ``local_dir`` to keys under ``prefix``."""
        prefix = self._check_key(prefix)
        src = Path(local_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"upload: not a directory: {src}")
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            self.write_bytes(self.join(prefix, path.relative_to(src).as_posix()), path.read_bytes())

    # --------------------------------------------------------- JSON / Parquet
    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key).decode("utf-8"))

    def write_json(self, key: str, obj: Any) -> None:
        # sort_keys: the same object gives the same bytes (reruns are diffable).
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def read_table(self, key: str) -> pa.Table:
        return parquet_from_bytes(self.read_bytes(key))

    def write_table(self, key: str, table: pa.Table) -> None:
        # Serialize in memory, then one atomic write_bytes (retries resend the
        # whole file; Parquet files here are small tables, not datasets).
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(key, buf.getvalue())


def parquet_from_bytes(data: bytes) -> pa.Table:
    """Read a Parquet file held in memory, from a copy Arrow owns.

    Reading straight from Python bytes wraps them in an arrow::py::PyBuffer; Arrow's IO threads can drop the
    last reference to it after the interpreter began to finalize, and that destructor's PyGILState_Ensure
    then ends the thread inside a noexcept frame: "terminate called without an active exception", exit 134
    (apache/arrow#34314; core dump backtrace on this machine, 28 of 30 runs on a loaded 2-core machine vs
    0 of 30 with the copy). An Arrow-allocated buffer needs no GIL to free.
    """
    owned = pa.allocate_buffer(len(data))
    pa.FixedSizeBufferWriter(owned).write(data)
    return pq.read_table(pa.BufferReader(owned), use_threads=False)


# The tag infra/terraform's lifecycle rule expires feature objects by (variables feature_tag_key/_value): S3
# lifecycle prefixes take no wildcards, so subjects/*/features/ is matched by prefix subjects/ AND this tag.
FEATURE_TAG = ("blockskip-kind", "features")


def object_tagging(key: str) -> str | None:
    """The S3 Tagging header for ``key``: feature objects (subjects/{id}/features/...) get FEATURE_TAG."""
    parts = key.split("/")
    if len(parts) >= 4 and parts[0] == "subjects" and parts[2] == "features":
        return f"{FEATURE_TAG[0]}={FEATURE_TAG[1]}"
    return None


def _atomic_local_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the target dir, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
    try:
        # mkstemp creates 0600 files; give the result ordinary permissions.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
