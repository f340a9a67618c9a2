"""S3 settings: endpoint, region and credentials from flags or standard AWS config.

Credentials are resolved through ``boto3.Session`` (env variables, shared
files, profiles, SSO, instance metadata) and handed to pyarrow's
S3FileSystem and to a boto3 client.  The returned dicts hold secrets: never
log or print them.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs as pafs

from .retry import split_endpoint

__all__ = ["resolve_s3_settings", "make_boto_client"]


def resolve_s3_settings(*, endpoint_url: str | None, region: str | None, profile: str | None,
                        connect_timeout: float | None, request_timeout: float | None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments for ``pyarrow.fs.S3FileSystem`` and for :func:`make_boto_client`."""
    import boto3

    session = boto3.Session(profile_name=profile or None)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        # botocore >= 1.31 reads endpoint_url from the profile's config too.
        try:
            endpoint = session._session.get_scoped_config().get("endpoint_url")  # noqa: SLF001
        except Exception:  # profile missing etc.: fall back to AWS' own endpoints
            endpoint = None
    region = (
        region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or session.region_name or "us-east-1"
    )
    fs_kwargs: dict[str, Any] = {"region": region}
    boto_kwargs: dict[str, Any] = {"region_name": region}
    creds = session.get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        fs_kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key,
                         session_token=frozen.token)
        boto_kwargs.update(aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key,
                           aws_session_token=frozen.token)
    if endpoint:
        scheme, host = split_endpoint(endpoint)
        fs_kwargs.update(endpoint_override=host, scheme=scheme)
        boto_kwargs["endpoint_url"] = f"{scheme}://{host}"
    if connect_timeout is not None:
        fs_kwargs["connect_timeout"] = connect_timeout
    if request_timeout is not None:
        fs_kwargs["request_timeout"] = request_timeout
    boto_kwargs["_timeouts"] = (connect_timeout, request_timeout)
    # Our own loop does the retrying (so the policy, the error classes and
    # the messages are ours); the SDK's internal retries are switched off
    # to keep the attempt count predictable.
    fs_kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=0)
    # Small objects go up as one PutObject instead of a 3-request multipart
    # upload (both are atomic; one request is fewer chances to fail).
    fs_kwargs["allow_delayed_open"] = True
    return fs_kwargs, boto_kwargs


def make_boto_client(boto_kwargs: dict[str, Any]) -> Any:
    """A boto3 S3 client with SDK retries off (the Store's own loop retries)."""
    import boto3
    from botocore.config import Config

    kw = dict(boto_kwargs)
    connect_t, read_t = kw.pop("_timeouts", (None, None))
    cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                 connect_timeout=connect_t or 10, read_timeout=read_t or 60,
                 s3={"addressing_style": "path"} if "endpoint_url" in kw else None)
    return boto3.client("s3", config=cfg, **kw)
