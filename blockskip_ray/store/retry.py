"""Retry policy and transient-error classification for object-store calls.

Split out of :mod:`.uri` so the policy can be unit-tested and reused (e.g. by
code that talks to S3 through boto3 directly).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

__all__ = ["RetryPolicy", "BUDGET_ENV", "ATTEMPTS_ENV", "is_transient_error", "TRANSIENT_RE", "DENIED_RE", "NOT_FOUND_RE", "split_endpoint"]


BUDGET_ENV = "BLOCKSKIP_S3_RETRY_BUDGET_S"
ATTEMPTS_ENV = "BLOCKSKIP_S3_MAX_ATTEMPTS"
_PYARROW_SCALE_S = 0.025  # AWS C++ SDK DefaultRetryStrategy: wait before retry k (k = 1, 2, ...) = 25 ms * 2**(k-1)
_BOTO_MAX_BACKOFF_S = 20.0  # botocore standard mode: wait i = rand * min(base * 2**i, 20 s)
_BOTO_BASE_S = 0.05  # its base for 5xx / connection errors (throttling codes: 1 s, so longer waits)


@dataclass(frozen=True)
class RetryPolicy:
    """One retry budget for every S3 call, carried out by the libraries that own the transport.

    ``budget_s`` is how long a single call keeps retrying through an outage before it gives up. It is mapped
    onto each library's own retry settings (no hand-written retry loop on S3 paths):

    - pyarrow (every Store read/write/list, the status table, and the filesystem handed to Ray Train):
      ``AwsDefaultS3RetryStrategy(max_attempts=R)``: R retries after the first request, waits 25 ms * 2**(k-1)
      before retry k (deterministic), no retry quota; R is the smallest with total wait >= budget_s.
    - botocore (tagged feature writes, deletes): ``Config(retries={"mode": mode, "total_max_attempts": N})``:
      waits rand * min(base * 2**i, 20 s) (full jitter, base 50 ms for 5xx/connection errors); N is the
      smallest whose expected total wait for those errors is >= budget_s.

    ``max_attempts`` (or BLOCKSKIP_S3_MAX_ATTEMPTS) pins the attempt count of both instead.
    """

    budget_s: float = 100.0
    mode: str = "standard"  # botocore retry mode: standard | adaptive (adds client-side rate limiting)
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("standard", "adaptive"):
            raise ValueError(f"retry mode must be standard or adaptive, got {self.mode!r}")
        if self.budget_s <= 0 or (self.max_attempts is not None and self.max_attempts < 1):
            raise ValueError("retry budget must be > 0 s and max_attempts >= 1")

    @classmethod
    def from_env(cls, **overrides: object) -> "RetryPolicy":
        """Defaults, then BLOCKSKIP_S3_RETRY_BUDGET_S / BLOCKSKIP_S3_MAX_ATTEMPTS, then ``overrides``."""
        kw: dict[str, object] = {}
        for env, key, conv in ((BUDGET_ENV, "budget_s", float), (ATTEMPTS_ENV, "max_attempts", int)):
            raw = os.environ.get(env)
            if raw:
                try:
                    kw[key] = conv(raw)
                except ValueError:
                    raise ValueError(f"{env}={raw!r}: expected a number") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)  # type: ignore[arg-type]

    def pyarrow_attempts(self) -> int:
        """Requests per pyarrow call (first one + retries)."""
        if self.max_attempts is not None:
            return self.max_attempts
        retries = 1
        while _PYARROW_SCALE_S * (2 ** retries - 1) < self.budget_s:
            retries += 1
        return retries + 1

    def pyarrow_wait_s(self) -> float:
        """Total wait of a pyarrow call that fails every attempt (deterministic)."""
        retries = self.pyarrow_attempts() - 1
        return _PYARROW_SCALE_S * (2 ** retries - 1)

    def botocore_attempts(self) -> int:
        if self.max_attempts is not None:
            return self.max_attempts
        n = 1
        while self.botocore_wait_s(n)[0] < self.budget_s:
            n += 1
        return n

    def botocore_wait_s(self, attempts: int | None = None) -> tuple[float, float]:
        """(expected, largest) total wait of a botocore call failing with 5xx/connection errors every attempt."""
        n = self.botocore_attempts() if attempts is None else attempts
        caps = [min(_BOTO_BASE_S * 2 ** i, _BOTO_MAX_BACKOFF_S) for i in range(n - 1)]
        return sum(caps) / 2, sum(caps)

    def pyarrow_strategy(self) -> Any:
        import pyarrow.fs as pafs
        return pafs.AwsDefaultS3RetryStrategy(max_attempts=self.pyarrow_attempts() - 1)

    def botocore_retries(self) -> dict[str, Any]:
        return {"mode": self.mode, "total_max_attempts": self.botocore_attempts()}

    def describe(self) -> str:
        mean, most = self.botocore_wait_s()
        return (f"pyarrow: {self.pyarrow_attempts()} attempts, {self.pyarrow_wait_s():.0f} s of waits; botocore "
                f"{self.mode}: {self.botocore_attempts()} attempts, {mean:.0f} s expected ({most:.0f} s at most)")


# pyarrow reports S3 failures as OSError with the AWS SDK error name and/or the
# HTTP status / curl code in the message; these are the retryable ones.
TRANSIENT_RE = re.compile(
    r"SLOW_DOWN|SlowDown|THROTTL|Throttl|SERVICE_UNAVAILABLE|ServiceUnavailable|"
    r"INTERNAL_FAILURE|InternalError|REQUEST_TIMEOUT|RequestTimeout|NETWORK_CONNECTION|"
    r"HTTP status 5\d\d|HTTP response code: 5\d\d|response code 5\d\d|\[code 5\d\d\]|"
    r"curlCode: (?:6|7|18|28|52|55|56)\b|Connection reset|connection reset|"
    r"timed out|Timeout|Broken pipe|Connection refused|Server returned nothing|"
    r"Recv failure|Send failure|Connection was reset",
)
DENIED_RE = re.compile(r"ACCESS_DENIED|AccessDenied|HTTP status 403|\[code 403\]|Forbidden")
NOT_FOUND_RE = re.compile(r"NoSuchKey|RESOURCE_NOT_FOUND|HTTP status 404|\[code 404\]|NoSuchBucket")


def is_transient_error(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying (5xx, throttling, timeout, dropped connection)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:  # botocore is only needed for the boto3 code paths
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return True
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            code = str(err.get("Code", ""))
            return status >= 500 or status == 429 or bool(TRANSIENT_RE.search(code))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        msg = str(exc)
        if DENIED_RE.search(msg) or NOT_FOUND_RE.search(msg):
            return False
        return bool(TRANSIENT_RE.search(msg))
    return False


def split_endpoint(url: str) -> tuple[str, str]:
    """'http://127.0.0.1:9000' -> ('http', '127.0.0.1:9000'); bare host -> https."""
    if "://" not in url:
        return "https", url.rstrip("/")
    p = urlparse(url)
    return p.scheme or "https", p.netloc
