"""The pure part of the image service: request schema, limits, auth, and adapter isolation in one pipeline."""
from __future__ import annotations

import threading

import pytest
import torch
from pydantic import ValidationError

from blockskip_ray.models.loading import load_pipeline
from blockskip_ray.serving import (AdapterHost, Cancelled, ImageRequest, Job, ServeLimits, build_tiny_adapter_store,
                                   check_bearer, encode_png, generate_image, resolve, token_digest)
from blockskip_ray.store import Store, fetch_adapter

IDS = ["toy-a", "toy-b", "toy-c"]


def req(**kw) -> ImageRequest:
    return ImageRequest.model_validate({"adapter": "toy-a", "prompt": "a photo of sks toy", **kw})


@pytest.mark.parametrize("bad", [
    {"adapter": "../x"}, {"adapter": "a/b"}, {"adapter": ""}, {"adapter": ".hidden"}, {"adapter": "a..b"},
    {"adapter": 3}, {"prompt": ""}, {"steps": "4"}, {"steps": 4.0}, {"steps": True}, {"steps": 0},
    {"seed": -1}, {"width": "64"}, {"guidance": "3"}, {"guidance": -1.0}, {"extra": 1},
])
def test_request_schema_rejects(bad):
    with pytest.raises(ValidationError):
        req(**bad)


def test_request_schema_accepts_ints_for_floats():
    assert req(guidance=3).guidance == 3.0


def test_resolve_defaults_and_limits():
    lim = ServeLimits(max_steps=8, default_steps=4, min_side=32, max_side=128, default_side=64, max_prompt_chars=20)
    j = resolve(req(), lim, random_seed=77)
    assert j == Job("toy-a", "a photo of sks toy", 77, 4, None, 64, 64)
    assert resolve(req(seed=5, steps=8, width=128, height=32, guidance=2), lim, 0) == Job(
        "toy-a", "a photo of sks toy", 5, 8, 2.0, 128, 32)
    for kw, msg in [({"steps": 9}, "max_steps"), ({"width": 144}, "outside"), ({"height": 16}, "outside"),
                    ({"width": 72}, "multiple of 16"), ({"prompt": "x" * 21}, "prompt too long"),
                    ({"guidance": 31.0}, "max_guidance")]:
        with pytest.raises(ValueError, match=msg):
            resolve(req(**kw), lim, 0)


@pytest.mark.parametrize("kw", [{"default_steps": 60}, {"multiple": 0}, {"min_side": 256, "max_side": 128},
                                {"default_side": 72}, {"max_prompt_chars": 0}])
def test_limits_validate(kw):
    with pytest.raises(ValueError):
        ServeLimits(**kw)


def test_check_bearer():
    d = token_digest("s3cret")
    assert check_bearer("Bearer s3cret", d) and check_bearer("bearer s3cret", d)
    for header in [None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2"]:
        assert not check_bearer(header, d), header
    assert "s3cret" not in d


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return build_tiny_adapter_store(tmp_path_factory.mktemp("serving"), IDS)


def _job(adapter: str, seed: int = 3) -> Job:
    return Job(adapter, "a photo of sks toy", seed, 3, None, 64, 64)


def test_adapter_host_never_mixes_adapters(tiny_store, tmp_path):
    model, store_dir = tiny_store
    store = Store.open(str(store_dir))
    # Reference: a fresh pipeline holding only that one adapter.
    ref = {}
    for a in IDS:
        pipe = load_pipeline(model)
        pipe.load_lora_weights(str(fetch_adapter(store, a, tmp_path / "ref")), adapter_name=a)
        ref[a] = encode_png(generate_image(pipe, _job(a)))
    base = encode_png(generate_image(load_pipeline(model), _job("none")))
    assert len({*ref.values(), base}) == 4, "adapters must differ from each other and from the base model"

    host = AdapterHost(load_pipeline(model), store, tmp_path / "cache")
    for a in IDS:
        host.load(a)
    assert host.pipeline_adapters() == IDS and host.loaded == set(IDS)
    for a in ["toy-b", "toy-a", "toy-c", "toy-a", "toy-b"]:
        assert host.generate_png(_job(a)) == ref[a], a
    assert encode_png(generate_image(host.pipe, _job("toy-a", seed=4))) != ref["toy-a"]  # the seed matters

    host.unload("toy-b")  # eviction deletes the adapter from the pipeline
    assert host.pipeline_adapters() == ["toy-a", "toy-c"] and "toy-b" not in host.loaded
    # Evicted between routing and generation: loaded for this one request, then removed again.
    assert host.generate_png(_job("toy-b")) == ref["toy-b"]
    assert host.pipeline_adapters() == ["toy-a", "toy-c"]
    assert not list((tmp_path / "cache").iterdir()), "fetched copies are removed once loaded"
    with pytest.raises(KeyError):
        host.load("missing")
    with pytest.raises(ValueError):
        host.load("../toy-a")


def test_png_bytes_deterministic(tiny_store):
    model, _ = tiny_store
    pipe = load_pipeline(model)
    a, b = (encode_png(generate_image(pipe, _job("x", seed=9))) for _ in range(2))
    assert a == b and a[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.get_default_dtype() == torch.float32


def test_compute_budget():
    lim = ServeLimits(max_steps=50, max_side=1024, max_step_pixels=20 * 256 * 256, default_side=256, default_steps=4)
    assert resolve(req(steps=20, width=256, height=256), lim, 0).steps == 20
    with pytest.raises(ValueError, match="compute budget exceeded: steps x width x height = 1376256 > max_step_pixels"):
        resolve(req(steps=21, width=256, height=256), lim, 0)
    with pytest.raises(ValueError, match="compute budget"):
        resolve(req(steps=4, width=1024, height=1024), lim, 0)
    d = ServeLimits()  # the default refuses the 50-step 1024x1024 request, admits 28 steps at 1024x1024
    assert resolve(req(steps=28, width=1024, height=1024), d, 0).steps == 28
    with pytest.raises(ValueError, match="compute budget"):
        resolve(req(steps=50, width=1024, height=1024), d, 0)
    with pytest.raises(ValueError, match="refuses the default request"):
        ServeLimits(max_step_pixels=1000)


class _CancelAfter(list):
    """A progress list that sets `event` once `n` steps are done (as a disconnect would, from outside)."""

    def __init__(self, event: threading.Event, n: int):
        super().__init__()
        self.event, self.n = event, n

    def append(self, step):
        super().append(step)
        if len(self) >= self.n:
            self.event.set()


def test_cancellation_between_and_before_steps(tiny_store, tmp_path):
    model, store_dir = tiny_store
    host = AdapterHost(load_pipeline(model), Store.open(str(store_dir)), tmp_path / "cache")
    host.load("toy-a")
    job = Job("toy-a", "a photo of sks toy", 3, 8, None, 64, 64)
    ref = host.generate_png(job)
    cancel = threading.Event()
    progress = _CancelAfter(cancel, 2)
    with pytest.raises(Cancelled, match="after step 2 of 8"):
        host.generate_png(job, cancel, progress)
    assert list(progress) == [0, 1]  # stopped after the second of eight steps
    done: list[int] = []
    with pytest.raises(Cancelled, match="before the first step"):
        host.generate_png(job, cancel, done)  # already cancelled while waiting: no step runs
    assert done == []
    assert host.lock.acquire(blocking=False)  # the pipeline is free again
    host.lock.release()
    full: list[int] = []
    assert host.generate_png(job, threading.Event(), full) == ref and full == list(range(8))


def test_a_damaged_or_foreign_adapter_leaves_the_pipeline_untouched(tiny_store, tmp_path):
    """diffusers widens a base layer for a LoRA input wider than the layer: before the check, one bad adapter in
    the store made every later request of the replica fail with a shape error."""
    import shutil

    from safetensors.torch import load_file, save_file

    from blockskip_ray.serving import AdapterUnusable
    from blockskip_ray.store import ADAPTER_FILE
    model, store_dir = tiny_store
    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    key = next(k for k in load_file(str(root / "subjects/toy-a/adapter" / ADAPTER_FILE)) if k.endswith("lora_A.weight"))
    for sid, change in (("wide", lambda t: torch.zeros(t.shape[0], t.shape[1] + 3)),
                        ("rank", lambda t: torch.zeros(t.shape[0] // 2, t.shape[1]))):
        shutil.copytree(root / "subjects/toy-a", root / "subjects" / sid)
        sd = load_file(str(root / "subjects" / sid / "adapter" / ADAPTER_FILE))
        sd[key] = change(sd[key])
        save_file(sd, str(root / "subjects" / sid / "adapter" / ADAPTER_FILE))
    shutil.copytree(root / "subjects/toy-a", root / "subjects/cut")
    f = root / "subjects/cut/adapter" / ADAPTER_FILE
    f.write_bytes(f.read_bytes()[:300])
    host = AdapterHost(load_pipeline(model), Store.open(str(root)), tmp_path / "cache")
    host.load("toy-b")
    ref = host.generate_png(_job("toy-b"))
    for bad, why in (("wide", "does not fit layer"), ("rank", "does not fit layer"), ("cut", "unreadable")):
        with pytest.raises(AdapterUnusable, match=why):
            host.load(bad)
        assert host.pipeline_adapters() == ["toy-b"] and host.generate_png(_job("toy-b")) == ref
