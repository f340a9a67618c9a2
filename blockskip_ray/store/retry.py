"""Retry policy and transient-error classification for object-store calls.

Split out of :mod:`.uri` so the policy can be unit-tested and reused (e.g. by
code that talks to S3 through boto3 directly).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from urllib.parse import urlparse

__all__ = ["RetryPolicy", "is_transient_error", "TRANSIENT_RE", "DENIED_RE", "NOT_FOUND_RE", "split_endpoint"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: sleep ~ U(0, min(max_delay, base * 2**i))."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        # Full jitter (rather than fixed exponential) spreads the retries of many
        # Ray workers that failed together, so they don't hammer S3 in lockstep.
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2**attempt)))


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
