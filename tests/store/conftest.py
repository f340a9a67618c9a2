"""Fixtures for the store tests: a real S3 endpoint (moto server mode) on
127.0.0.1, a fault-injecting proxy in front of it, and a ``store`` fixture that
runs each test against a local directory AND an S3 prefix through the same
production code (``Store.open``)."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from store_fault_proxy import FaultProxy  # noqa: E402

from blockskip_ray.store import Store  # noqa: E402

BUCKET = "blockskip-test"
_counter = itertools.count()

# Isolate from the developer's real AWS setup (profiles, endpoints, regions).
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-leak",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN")


@pytest.fixture(scope="session")
def aws_env():
    mp = pytest.MonkeyPatch()
    for k in _AWS_UNSET:
        mp.delenv(k, raising=False)
    for k, v in _AWS_ENV.items():
        mp.setenv(k, v)
    yield dict(_AWS_ENV)
    mp.undo()


@pytest.fixture(scope="session")
def s3_endpoint(aws_env):
    """http://127.0.0.1:PORT of a moto S3 server with the test bucket created."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


def unique_prefix(name: str) -> str:
    return f"{name}-{os.getpid()}-{next(_counter)}"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    """The same tests against a local directory and an S3 prefix."""
    if request.param == "local":
        return Store.open(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Store.open(f"s3://{BUCKET}/{unique_prefix('t')}", endpoint_url=endpoint,
                      )


@pytest.fixture(scope="session")
def fault_proxy(s3_endpoint):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port)).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def proxied_store(fault_proxy) -> Store:
    """An S3 store reached through the fault proxy; short timeouts, fast retries."""
    fault_proxy.clear()
    st = Store.open(f"s3://{BUCKET}/{unique_prefix('proxied')}", endpoint_url=fault_proxy.endpoint,
                    retry_attempts=5, connect_timeout=2, request_timeout=1.0)
    yield st
    fault_proxy.clear()
