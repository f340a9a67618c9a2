"""S3 settings and the two transports built from them: a pyarrow filesystem and a boto3 client.

Credentials come from boto3's provider chain (env, shared files, profiles, SSO, credential_process, IRSA web
identity, instance metadata) and are never frozen: the boto3 client signs with the session's refreshing
credentials, and the pyarrow filesystem (:class:`S3Handler` behind a ``pyarrow.fs.PyFileSystem``) rebuilds its
inner ``S3FileSystem`` whenever the chain hands out different keys. Both retry through the libraries' own retry
settings from one :class:`RetryPolicy`.

Only settings travel when these objects are pickled (Ray ships the Store and the Ray Train filesystem to
workers): no secrets, and each process resolves its own credentials and keeps the retry policy (a pickled
``pyarrow.fs.S3FileSystem`` silently falls back to pyarrow's default 3 attempts).
"""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow.fs as pafs

from .retry import RetryPolicy, split_endpoint

__all__ = ["S3Settings", "S3Handler", "content_type", "take_failed_uploads"]

# pyarrow.fs.copy_files (what Ray Train persists checkpoints with) ignores an upload that fails when its stream
# is closed: it returns success and the object is missing. Streams of this handler record such failures here,
# per process, so the code that asked for the upload can check (training.py does after every checkpoint).
_FAILED_UPLOADS: list[str] = []
_FAILED_LOCK = threading.Lock()


def take_failed_uploads() -> list[str]:
    """The uploads that failed in this process since the last call (one line each), and forget them."""
    with _FAILED_LOCK:
        out = list(_FAILED_UPLOADS)
        _FAILED_UPLOADS.clear()
    return out


class _CheckedOutput(io.RawIOBase):
    """A writable stream over pyarrow's S3 output stream whose failure at close is raised and recorded."""

    def __init__(self, inner: Any, path: str) -> None:
        super().__init__()
        self._inner, self._path = inner, path

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._inner.write(b)
        return len(b)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
        except Exception as e:
            with _FAILED_LOCK:
                _FAILED_UPLOADS.append(f"{self._path}: {str(e).splitlines()[0][:300]}")
            raise
        finally:
            super().close()

# Content-Type by suffix for every object written (Store writes and Ray Train checkpoint files alike).
_CONTENT_TYPES = {".png": "image/png", ".json": "application/json", ".parquet": "application/vnd.apache.parquet",
                  ".safetensors": "application/octet-stream", ".jsonl": "application/jsonl", ".txt": "text/plain",
                  ".md": "text/markdown"}


def content_type(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return _CONTENT_TYPES.get(name[dot:].lower() if dot > 0 else "", "application/octet-stream")


_QUOTA_LOCK = threading.Lock()


@contextmanager
def _no_retry_quota() -> Iterator[None]:
    """Build a client whose standard-mode retries are not capped by botocore's retry quota.

    The quota (500 tokens per client, 5-10 per retry, refilled only by successes) is meant to stop retry
    storms, but it turns one long outage into fast failures for every later call of a long-lived client: the
    store fault drill saw feature writes fail after 0.0 s in the second outage. The retry budget per call
    (RetryPolicy) already bounds the retries, so the client gets a quota that never runs out. botocore offers
    no setting for this: the RetryQuota class is swapped only while the client is created (under a lock)."""
    from botocore.retries import quota, standard

    class _Unlimited(quota.RetryQuota):
        def acquire(self, capacity_amount: int) -> bool:
            return True

    with _QUOTA_LOCK:
        original = standard.quota.RetryQuota
        standard.quota.RetryQuota = _Unlimited
        try:
            yield
        finally:
            standard.quota.RetryQuota = original


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3; holds no secret (safe to pickle, log and compare)."""

    region: str
    endpoint: str | None = None  # scheme://host[:port], None: AWS' own endpoints
    profile: str | None = None
    connect_timeout: float | None = None
    request_timeout: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def resolve(cls, *, endpoint_url: str | None, region: str | None, profile: str | None,
                connect_timeout: float | None, request_timeout: float | None, retry: RetryPolicy) -> "S3Settings":
        """Flags first, then the standard AWS settings (AWS_ENDPOINT_URL[_S3], AWS_REGION, the profile)."""
        import boto3

        session = boto3.Session(profile_name=profile or None)
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not endpoint:
            try:  # botocore >= 1.31 reads endpoint_url from the profile's config too
                endpoint = session._session.get_scoped_config().get("endpoint_url")  # noqa: SLF001
            except Exception:  # profile missing etc.: AWS' own endpoints
                endpoint = None
        region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or session.region_name or "us-east-1")
        if endpoint:
            scheme, host = split_endpoint(endpoint)
            endpoint = f"{scheme}://{host}"
        return cls(region=region, endpoint=endpoint, profile=profile or None, connect_timeout=connect_timeout,
                   request_timeout=request_timeout, retry=retry)

    def session(self) -> Any:
        import boto3
        return boto3.Session(profile_name=self.profile)

    def boto_client(self, session: Any = None) -> Any:
        """A boto3 S3 client signing with the session's (refreshing) credentials, retrying per the policy,
        without botocore's retry quota (see _no_retry_quota)."""
        from botocore.config import Config

        cfg = Config(retries=self.retry.botocore_retries(), connect_timeout=self.connect_timeout or 10,
                     read_timeout=self.request_timeout or 60,
                     s3={"addressing_style": "path"} if self.endpoint else None)
        with _no_retry_quota():
            return (session or self.session()).client("s3", config=cfg, region_name=self.region,
                                                      endpoint_url=self.endpoint)

    def arrow_kwargs(self) -> dict[str, Any]:
        """``pyarrow.fs.S3FileSystem`` keyword arguments without credentials."""
        kw: dict[str, Any] = {"region": self.region, "retry_strategy": self.retry.pyarrow_strategy(),
                              # small objects go up as one PutObject instead of a 3-request multipart upload
                              "allow_delayed_open": True}
        if self.endpoint:
            scheme, host = split_endpoint(self.endpoint)
            kw.update(endpoint_override=host, scheme=scheme)
        if self.connect_timeout is not None:
            kw["connect_timeout"] = self.connect_timeout
        if self.request_timeout is not None:
            kw["request_timeout"] = self.request_timeout
        return kw

    def filesystem(self) -> pafs.FileSystem:
        return pafs.PyFileSystem(S3Handler(self))


class S3Handler(pafs.FileSystemHandler):
    """pyarrow filesystem handler over ``S3FileSystem`` that follows credential refreshes and writes no
    directory markers.

    - Credentials: before each call the boto3 chain is asked for its current keys (cheap: boto3 refreshes only
      near expiry); different keys rebuild the inner S3FileSystem. Requests in flight keep the old one.
    - No zero-byte ``dir/`` marker objects: S3 has no directories, so create_dir is a no-op (objects imply their
      prefixes) and deletes go through boto3, which (unlike pyarrow's delete_file) does not re-create a marker
      for an emptied parent.
    - Every object written gets a Content-Type from its suffix (PNG image/png, JSON application/json, ...).
    """

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._session: Any = None
        self._client: Any = None
        self._fs: pafs.S3FileSystem | None = None
        self._keys: tuple | None = None
        self.rebuilds = 0  # how many times the inner filesystem was (re)built (tests read it)

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Handler) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash(self.settings)

    # --------------------------------------------------------------- inner
    def _boto_session(self) -> Any:
        if self._session is None:
            self._session = self.settings.session()
        return self._session

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self.settings.boto_client(self._boto_session())
            return self._client

    def fs(self) -> pafs.S3FileSystem:
        with self._lock:
            creds = self._boto_session().get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
            keys = (frozen.access_key, frozen.secret_key, frozen.token) if frozen is not None else None
            if self._fs is None or keys != self._keys:
                kw = self.settings.arrow_kwargs()
                if keys is not None:
                    kw.update(access_key=keys[0], secret_key=keys[1], session_token=keys[2])
                self._fs, self._keys = pafs.S3FileSystem(**kw), keys
                self.rebuilds += 1
            return self._fs

    def _bucket_key(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.strip("/").partition("/")
        return bucket, key

    # ------------------------------------------------------------- handler
    def get_type_name(self) -> str:
        return "blockskip-s3"

    def normalize_path(self, path: str) -> str:
        return self.fs().normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs().get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs().get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # a prefix exists once an object is written under it; a marker object would litter the layout

    def delete_dir(self, path: str) -> None:
        self.delete_dir_contents(path, missing_dir_ok=True)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        bucket, key = self._bucket_key(path)
        if not key:
            raise ValueError(f"refusing to delete the whole bucket {bucket!r}")
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for i in range(0, len(objs), 1000):
                resp = client.delete_objects(Bucket=bucket, Delete={"Objects": objs[i:i + 1000], "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise OSError(f"delete failed for {first.get('Key')}: {first.get('Code')}")

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to delete the contents of the whole S3 account")

    def delete_file(self, path: str) -> None:
        bucket, key = self._bucket_key(path)
        self.client().delete_object(Bucket=bucket, Key=key)

    def move(self, src: str, dest: str) -> None:
        self.copy_file(src, dest)
        self.delete_file(src)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs().copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.fs().open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs().open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> Any:
        meta = dict(metadata or {})
        if not any(k.lower() == "content-type" for k in meta):
            meta["Content-Type"] = content_type(path)
        import pyarrow as pa
        return pa.PythonFile(_CheckedOutput(self.fs().open_output_stream(path, metadata=meta), path), mode="w")

    def open_append_stream(self, path: str, metadata: dict | None) -> Any:
        raise OSError("S3 does not support appending to an object")
