"""Issue 14 item 1 through Ray Train: the store's filesystem handed to RunConfig(storage_filesystem=...) is
pickled to the controller and workers and still retries per the policy, so checkpoint writes ride out an S3
outage; uploads land complete (manifest verified) and pruned to num_to_keep. S3 = moto behind the fault proxy."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from store_fault_proxy import FaultProxy  # noqa: E402


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        mp.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        mp.delenv(k, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="ckpt")
    proxy = FaultProxy(host, int(port)).start()
    yield proxy
    proxy.stop()
    server.stop()
    mp.undo()


@pytest.fixture(scope="module")
def ray_local(s3):  # after the AWS env is set: Ray workers inherit it
    import ray
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _loop(cfg):
    import json
    import tempfile
    from pathlib import Path

    import ray.train
    from ray.train import Checkpoint

    from blockskip_ray.distributed.checkpoints import check_persisted, write_manifest
    for step in (1, 2, 3):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"step": step}))
            write_manifest(d, step)
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))
            check_persisted(step)


def test_ray_train_checkpoints_ride_out_an_outage(s3, ray_local):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from blockskip_ray.distributed.checkpoints import verify
    from blockskip_ray.store import Store
    store = Store.open("s3://ckpt/p", endpoint_url=s3.endpoint)
    s3.clear()
    # 503 for every request to the run's storage for 4 s from its first request (Ray Train's start time under
    # load is unknown): the controller's and the worker's (pickled) filesystems must retry through it
    s3.outage(4.0, kind="status", code="SlowDown", path_contains="/checkpoints/", armed=True)
    trainer = TorchTrainer(_loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=store.fs_path("subjects/a/checkpoints"),
                                                storage_filesystem=store.filesystem, name="run",
                                                failure_config=FailureConfig(max_failures=0),
                                                checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    assert result.error is None
    assert [s for s in s3.seen if s.fault], "the outage never hit a request"
    keys = store.list("subjects/a/checkpoints/run")
    ckpts = sorted({k.split("/")[4] for k in keys  # directories only: not Ray's checkpoint_manager_snapshot.json
                    if k.split("/")[4].startswith("checkpoint_") and len(k.split("/")) > 5})
    assert 2 <= len(ckpts) <= 3  # 3 reported; Ray deletes beyond num_to_keep as it registers them
    steps = []
    for c in ckpts:
        with tempfile.TemporaryDirectory() as d:
            store.download_dir(f"subjects/a/checkpoints/run/{c}", d)
            step, why = verify(d)
            assert why is None, why
            steps.append(step)
    assert steps[-2:] == [2, 3]  # every checkpoint left verifies against its manifest
    assert not [k for k in keys if k.endswith("/")]  # no directory markers
