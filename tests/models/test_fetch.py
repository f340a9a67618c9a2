"""Models from the store: publish with a manifest, fetch once per node into a verified cache, refuse what
cannot load (hub ids, unpublished URIs) at validation time. S3 is a real HTTP endpoint (moto server)."""
from __future__ import annotations

import json
import os
import threading

import pytest

from blockskip_ray.models import fetch
from blockskip_ray.models.fetch import (MANIFEST, cache_dir_for, check_model, ensure_local, materialize,
                                        publish_model, source_of)
from blockskip_ray.models.loading import load_pipeline, model_family

BUCKET = "models-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_EC2_METADATA_DISABLED": "true"}
    mp = pytest.MonkeyPatch()
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(k, raising=False)
    for k, v in env.items():
        mp.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()
    mp.undo()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKSKIP_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_publish_fetch_verify_reuse(s3, tiny_flux_dir, cache, monkeypatch):
    uri = f"s3://{BUCKET}/models/flux-tiny"
    files = publish_model(tiny_flux_dir, uri)
    assert "model_index.json" in files and any(f.endswith(".safetensors") for f in files)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"models/flux-tiny/{MANIFEST}")["Body"].read())
    assert manifest["files"] == files
    assert check_model(uri) == "flux"

    calls = []
    real = fetch._download
    monkeypatch.setattr(fetch, "_download", lambda *a: (calls.append(a[1]), real(*a))[1])
    # Four processes' worth of callers at once on one node: one download.
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_local(uri))) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    local = cache_dir_for(uri)
    assert set(results) == {local} and local == cache / "s3" / BUCKET / "models" / "flux-tiny"
    assert sorted(calls) == sorted(files)  # each file once
    assert ensure_local(uri) == local and len(calls) == len(files)  # reused, not downloaded again
    assert source_of(local) == uri
    pipe = load_pipeline(uri)  # loaders take the URI too
    assert type(pipe).__name__ == "FluxPipeline"

    # The manifest is the version: under an unchanged manifest the verified copy is reused; a new manifest
    # refetches, and a store object that does not match its manifest is refused (nothing half-written kept).
    key = next(f for f in files if f.endswith(".safetensors"))
    body = s3.get_object(Bucket=BUCKET, Key=f"models/flux-tiny/{key}")["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=f"models/flux-tiny/{key}", Body=body[:-1] + bytes([body[-1] ^ 1]))
    assert ensure_local(uri) == local
    manifest["format"] = 2  # a new manifest (as a republish writes) with the old sha256 of the changed file
    s3.put_object(Bucket=BUCKET, Key=f"models/flux-tiny/{MANIFEST}", Body=json.dumps(manifest).encode())
    with pytest.raises(ValueError, match=f"{key} does not match {MANIFEST}"):
        ensure_local(uri)
    assert not (cache / "s3" / BUCKET / "models" / ".flux-tiny.partial").exists()


def test_cache_path_from_another_node_is_fetched_here(s3, tiny_flux_dir, cache):
    uri = f"s3://{BUCKET}/models/flux-node"
    publish_model(tiny_flux_dir, uri)
    path = cache_dir_for(uri)  # what a driver on another node hands to this node's workers
    assert not path.exists()
    assert model_family(path) == "flux" and (path / "model_index.json").is_file()
    assert materialize(path) == path


@pytest.mark.parametrize("model,msg", [
    ("black-forest-labs/FLUX.1-dev", "hub ids are not downloaded"),
    ("s3://models-test/models/never-published", "no blockskip-model.json there"),
    ("gs://bucket/model", "unsupported URI scheme"),
    ("/nonexistent/dir", "not a local diffusers directory"),
])
def test_unloadable_models_fail_in_one_line(s3, cache, model, msg):
    with pytest.raises(ValueError, match=msg) as e:
        check_model(model)
    assert "\n" not in str(e.value)


def test_build_app_refuses_unloadable_model_before_any_replica(s3, cache, tmp_path):
    from blockskip_ray.distributed.serve_app import build_app

    for model in ("black-forest-labs/FLUX.1-dev", f"s3://{BUCKET}/models/missing"):
        with pytest.raises(ValueError, match=r"model .*:"):
            build_app({"model": model, "store": str(tmp_path / "store")})
    (tmp_path / "notflux").mkdir()
    (tmp_path / "notflux" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="unsupported pipeline 'StableDiffusionPipeline'"):
        build_app({"model": str(tmp_path / "notflux"), "store": str(tmp_path / "store")})


def test_manifest_paths_cannot_escape(s3, cache):
    uri = f"s3://{BUCKET}/models/evil"
    s3.put_object(Bucket=BUCKET, Key=f"models/evil/{MANIFEST}", Body=json.dumps(
        {"format": 1, "files": {"model_index.json": {"size": 1, "sha256": "0" * 64},
                                "../../etc/x": {"size": 1, "sha256": "0" * 64}}}).encode())
    with pytest.raises(ValueError, match="malformed"):
        ensure_local(uri)


def test_jobs_take_a_store_model(s3, tiny_flux_dir, cache, tmp_path):
    from blockskip_ray.distributed.jobs import resolve_model
    from blockskip_ray.distributed.jobspec import JobSpec

    uri = f"s3://{BUCKET}/models/flux-job"
    publish_model(tiny_flux_dir, uri)
    assert resolve_model(JobSpec(job_id="j1", model=uri, work_dir=str(tmp_path))) == str(cache_dir_for(uri))
    with pytest.raises(ValueError, match="hub ids are not downloaded"):
        resolve_model(JobSpec(job_id="j2", model="black-forest-labs/FLUX.1-dev", work_dir=str(tmp_path)))


def test_job_spec_accepts_s3_models_only():
    from blockskip_ray.distributed.jobspec import load_spec

    assert load_spec({"job_id": "j", "model": "s3://bucket/models/flux"}).model == "s3://bucket/models/flux"
    with pytest.raises(ValueError, match="local diffusers pipeline directory or an s3:// URI"):
        load_spec({"job_id": "j", "model": "gs://bucket/models/flux"})
