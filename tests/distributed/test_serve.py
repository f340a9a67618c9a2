"""The image service over real HTTP on a local Ray: auth, errors, determinism, adapter isolation, LRU, 503."""
from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import time
from pathlib import Path

import httpx
import pytest
import ray
import torch
from PIL import Image

from blockskip_ray.distributed.serve_app import build_app, parse_args
from blockskip_ray.distributed.serve_run import environment, free_port, proxy_env, running_app
from blockskip_ray.models.loading import load_pipeline
from blockskip_ray.serving import Job, build_tiny_adapter_store, encode_png, generate_image
from blockskip_ray.store import Store, fetch_adapter

IDS = ["toy-a", "toy-b", "toy-c"]
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model, store = build_tiny_adapter_store(root, IDS)
    args = {"model": str(model), "store": str(store), "token": TOKEN, "cache_size": 2, "max_ongoing": 2,
            "max_queued": 4, "num_cpus": 1, "default_steps": 3, "max_steps": 500, "min_side": 32,
            "max_side": 256, "default_side": 64, "max_prompt_chars": 200, "max_step_pixels": 500 * 128 * 128,
            "body_timeout_s": 60}
    # address="local": a private cluster even when another Ray runs on this machine. Its processes inherit
    # proxy_env, so Serve's HTTP proxy runs the guard (as `blockskip serve` and the RayService set up).
    with environment(proxy_env(args)):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with running_app(args, port=free_port()) as url:
            with httpx.Client(base_url=url, timeout=120) as client:
                yield client, model, store
    finally:
        ray.shutdown()


def image(client: httpx.Client, adapter: str, seed: int = 7, **kw) -> httpx.Response:
    return client.post("/v1/images", json={"adapter": adapter, "prompt": PROMPT, "seed": seed, **kw}, headers=AUTH)


def png(client: httpx.Client, adapter: str, seed: int = 7, **kw) -> bytes:
    r = image(client, adapter, seed, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == str(seed)
    return r.content


def stats(client: httpx.Client) -> dict:
    return client.get("/v1/stats", headers=AUTH).json()["replica"]


def test_health_docs_and_adapters(server):
    client, _, _ = server
    assert client.get("/healthz").json() == {"status": "ok"}  # open without a token
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["ImageRequest"]["properties"]
    assert set(props) == {"adapter", "prompt", "seed", "steps", "guidance", "width", "height"}
    assert client.get("/docs").status_code == 200
    assert client.get("/v1/adapters", headers=AUTH).json() == {"adapters": IDS}


def test_auth(server):
    client, _, _ = server
    body = {"adapter": "toy-a", "prompt": PROMPT}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}]:
        for r in (client.post("/v1/images", json=body, headers=headers), client.get("/v1/adapters", headers=headers)):
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"] == "unauthorized" and r.json()["reason"]


@pytest.mark.parametrize("body,status,reason", [
    ({"adapter": "nobody", "prompt": PROMPT}, 404, "unknown adapter"),
    ({"adapter": "../toy-a", "prompt": PROMPT}, 422, "invalid adapter id"),
    ({"adapter": "toy-a/../../x", "prompt": PROMPT}, 422, "invalid adapter id"),
    ({"adapter": "toy-a", "prompt": "x" * 201}, 422, "prompt too long"),
    ({"adapter": "toy-a", "prompt": PROMPT, "steps": 501}, 422, "max_steps"),
    ({"adapter": "toy-a", "prompt": PROMPT, "steps": 500, "width": 256, "height": 128}, 422, "compute budget"),
    ({"adapter": "toy-a", "prompt": PROMPT, "steps": 0}, 422, "steps"),
    ({"adapter": "toy-a", "prompt": PROMPT, "width": 512}, 422, "outside"),
    ({"adapter": "toy-a", "prompt": PROMPT, "height": 72}, 422, "multiple of 16"),
    ({"adapter": "toy-a", "prompt": PROMPT, "steps": "3"}, 422, "valid integer"),
    ({"adapter": "toy-a", "prompt": PROMPT, "seed": 1.5}, 422, "valid integer"),
    ({"adapter": "toy-a", "prompt": PROMPT, "colour": "red"}, 422, "unknown field"),
    ({"prompt": PROMPT}, 422, "adapter: Field required"),
    ([1, 2], 422, "dictionary"),
    ("{not json", 400, "malformed JSON"),
])
def test_bad_input_is_a_json_4xx(server, body, status, reason):
    client, _, _ = server
    if isinstance(body, str):
        r = client.post("/v1/images", content=body, headers={**AUTH, "content-type": "application/json"})
    else:
        r = client.post("/v1/images", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert reason in r.json()["reason"]


def test_png_deterministic_and_adapters_never_mix(server, tmp_path):
    client, model, store = server
    ref = {a: png(client, a) for a in IDS}
    assert len(set(ref.values())) == 3, "the three adapters must give three different images"
    assert Image.open(io.BytesIO(ref["toy-a"])).size == (64, 64)
    assert Image.open(io.BytesIO(png(client, "toy-a", width=96, height=32))).size == (96, 32)
    # Interleaved (and across cache evictions: 3 adapters, cache of 2): each equals its answer alone.
    for a in ["toy-b", "toy-a", "toy-c", "toy-a", "toy-b", "toy-c", "toy-c"]:
        assert png(client, a) == ref[a], a
    assert png(client, "toy-a", seed=8) != ref["toy-a"]
    # And what a user gets from a fresh pipeline holding only that adapter (one thread, like the replica).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline(model)
        pipe.load_lora_weights(str(fetch_adapter(Store.open(str(store)), "toy-b", tmp_path)), adapter_name="toy-b")
        local = encode_png(generate_image(pipe, Job("toy-b", PROMPT, 7, 3, None, 64, 64)))
    finally:
        torch.set_num_threads(threads)
    assert local == ref["toy-b"]


def test_lru_eviction(server):
    client, _, _ = server

    def cache(a: str) -> str:
        r = image(client, a, seed=1)
        assert r.status_code == 200, r.text
        return r.headers["x-adapter-cache"]

    cache("toy-a"), cache("toy-b")  # whatever came before, the cache is now exactly {a, b}, b most recent
    assert stats(client)["loaded"] == ["toy-a", "toy-b"]
    expected = [("toy-c", "miss", ["toy-b", "toy-c"]),  # evicts a (least recently used)
                ("toy-b", "hit", ["toy-b", "toy-c"]),
                ("toy-a", "miss", ["toy-a", "toy-b"]),  # evicts c
                ("toy-c", "miss", ["toy-a", "toy-c"]),  # evicts b
                ("toy-a", "hit", ["toy-a", "toy-c"])]
    for adapter, hit, loaded in expected:
        assert cache(adapter) == hit, adapter
        s = stats(client)
        # The pipeline holds exactly the cached adapters: eviction deleted the others from it.
        assert s["loaded"] == loaded and s["pipeline_adapters"] == loaded, (adapter, s)


async def _burst(url: str, bodies: list[dict], limit: int | None) -> list[httpx.Response]:
    sem = asyncio.Semaphore(limit or len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=AUTH) as client:
        async def one(body: dict) -> httpx.Response:
            async with sem:
                return await client.post("/v1/images", json=body)
        return await asyncio.gather(*(one(b) for b in bodies))


def test_concurrent_requests_across_adapters(server):
    client, _, _ = server
    ref = {(a, s): png(client, a, seed=s) for a in IDS for s in (1, 2)}
    rnd = random.Random(0)
    keys = [rnd.choice(sorted(ref)) for _ in range(20)]
    bodies = [{"adapter": a, "prompt": PROMPT, "seed": s} for a, s in keys]
    # At most 4 in flight, within the server's 2 running + 4 queued: every request must succeed.
    responses = asyncio.run(_burst(str(client.base_url), bodies, limit=4))
    for (a, s), r in zip(keys, responses):
        assert r.status_code == 200, r.text
        assert r.content == ref[(a, s)], (a, s)
    s = stats(client)
    assert len(s["pipeline_adapters"]) <= 2 and s["pipeline_adapters"] == s["loaded"]


def test_overload_answers_503(server):
    client, _, _ = server
    body = {"adapter": "toy-c", "prompt": PROMPT, "seed": 5, "steps": 30, "width": 128, "height": 128}
    ref = png(client, "toy-c", seed=5, steps=30, width=128, height=128)
    # 24 at once against 2 running + 4 queued: the rest are refused at once instead of piling up.
    responses = asyncio.run(_burst(str(client.base_url), [body] * 24, limit=None))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"] == "overloaded" and r.headers["retry-after"] == "1"
        else:
            assert r.content == ref
    assert png(client, "toy-c", seed=5, steps=30, width=128, height=128) == ref  # still serving afterwards


def test_app_arguments_are_checked():
    base = {"model": "m", "store": "s"}
    assert parse_args({**base, "cache_size": "4"})["cache_size"] == 4  # `serve run k=v` gives strings
    for bad in [{"model": "m"}, {**base, "cache_size": "x"}, {**base, "cache_size": 0}, {**base, "colour": 1}]:
        with pytest.raises(ValueError):
            parse_args(bad)


def _host_port(client: httpx.Client) -> tuple[str, int]:
    return client.base_url.host, client.base_url.port


def _raw(client: httpx.Client, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    with socket.create_connection(_host_port(client), timeout=timeout) as s:
        s.sendall(head.encode("latin-1"))
        try:
            s.sendall(body)
        except OSError:  # the server answered and closed before taking it all
            pass
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                [x for x in data.split(b"\r\n") if x.lower().startswith(b"content-length")][0].split(b":")[1]):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head_, _, rest = data.partition(b"\r\n\r\n")
    return int(head_.split(b" ")[1]), rest


def test_unauthenticated_big_body_is_refused_from_headers(server):
    client, _, _ = server
    # 10 MB announced, 1 MB sent: the 401 comes from the headers, tiny, nothing echoed (was: a 36.8 MB 422).
    status, body = _raw(client, "POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                "Content-Length: 10700000\r\n\r\n", b'{"adapter": "' + b"A" * 1_000_000)
    assert status == 401 and len(body) < 300 and b"AAAA" not in body
    status, body = _raw(client, "POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                f"Authorization: Bearer {TOKEN}\r\nContent-Length: 10700000\r\n\r\n", b"{" * 100_000)
    assert status == 413 and len(body) < 300


def test_only_utf8_json_is_accepted(server):
    client, _, _ = server
    body = json.dumps({"adapter": "toy-a", "prompt": PROMPT, "seed": 1})
    for content, ctype, status in [(body.encode("utf-16"), "application/json", 400),
                                   (body.encode("utf-16-le"), "application/json", 400),
                                   (body.encode(), "text/plain", 415),
                                   (body.encode("utf-16"), "application/json; charset=utf-16", 415)]:
        r = client.post("/v1/images", content=content, headers={**AUTH, "content-type": ctype})
        assert r.status_code == status, (ctype, r.text)
        assert set(r.json()) == {"error", "reason"} and "toy-a" not in r.text


def test_errors_never_echo_input(server):
    client, _, _ = server
    marker = "ECHO-7f3a"
    bodies = [{"adapter": "toy-a", "prompt": PROMPT, marker: 1}, {"adapter": marker, "prompt": PROMPT},
              {"adapter": "toy-a", "prompt": marker * 50}, {"adapter": "toy-a", "prompt": PROMPT, "steps": marker},
              {"adapter": f"{marker}/..", "prompt": PROMPT}, {"adapter": "toy-a", "prompt": PROMPT, "seed": [marker]},
              {f"{marker}{i}": i for i in range(200)}]
    for b in bodies:
        r = client.post("/v1/images", json=b, headers=AUTH)
        assert 400 <= r.status_code < 500 and marker not in r.text and len(r.content) < 600, r.text


def test_stalled_clients_do_not_take_the_endpoint(server):
    """More stalled half-bodies (with a valid token) than the Ingress has slots (64): the proxy's guard holds
    them, so /healthz and authenticated requests still answer."""
    client, _, _ = server
    socks = []
    try:
        for i in range(80):
            s = socket.create_connection(_host_port(client), timeout=30)
            if i % 2:  # half a body, then silence
                s.sendall(("POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           f"Authorization: Bearer {TOKEN}\r\nContent-Length: 200\r\n\r\n").encode()
                          + b'{"adapter": "toy-a", ')
            else:  # half the headers, then silence
                s.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Ty")
            socks.append(s)
        time.sleep(2)  # let them all reach the server
        with httpx.Client(base_url=str(client.base_url), timeout=20) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/v1/adapters", headers=AUTH).json() == {"adapters": IDS}
            assert c.post("/v1/images", json={"adapter": "toy-a", "prompt": PROMPT, "seed": 1},
                          headers=AUTH).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_abandoned_request_is_cancelled(server):
    client, _, _ = server
    before = stats(client)["generation"]
    body = {"adapter": "toy-a", "prompt": PROMPT, "seed": 1, "steps": 500, "width": 128, "height": 128}
    with pytest.raises(httpx.TimeoutException):  # the client gives up long before 500 steps are done
        client.post("/v1/images", json=body, headers=AUTH, timeout=3)
    deadline = time.monotonic() + 120
    while (g := stats(client)["generation"])["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"the abandoned request was not cancelled: {g}"
        time.sleep(0.5)
    assert g["completed"] == before["completed"] and g["steps"] - before["steps"] < 500, g
    assert png(client, "toy-a", seed=2)  # and the replica serves the next request


def test_queues_are_bounded_with_retry_after(server):
    _, model, store = server
    app = build_app({"model": str(model), "store": str(store), "max_queued": 5, "retry_after_s": 3})
    ingress = app._bound_deployment
    gen = ingress.init_args[0]._bound_deployment
    assert gen.max_queued_requests == 5 and gen.backpressure_config.retry_after_s == 3
    assert 0 < ingress.max_queued_requests < 10_000 and ingress.backpressure_config.retry_after_s == 3


def test_a_damaged_adapter_in_the_store_answers_500_and_the_replica_stays_healthy(server):
    import shutil

    from safetensors.torch import load_file, save_file

    from blockskip_ray.distributed.serve_app import UNUSABLE
    from blockskip_ray.store import ADAPTER_FILE
    client, _, store = server
    before = png(client, "toy-b", seed=11)
    bad = Path(store) / "subjects" / "bad-wide"
    shutil.copytree(Path(store) / "subjects" / "toy-a", bad)
    try:
        sd = load_file(str(bad / "adapter" / ADAPTER_FILE))
        key = next(k for k in sd if k.endswith("lora_A.weight"))
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 3)  # diffusers would widen the base layer
        save_file(sd, str(bad / "adapter" / ADAPTER_FILE))
        r = image(client, "bad-wide")
        assert r.status_code == 500 and r.json() == {"error": "internal", "reason": UNUSABLE}, r.text
        assert png(client, "toy-b", seed=11) == before  # every replica's pipeline is untouched
    finally:
        shutil.rmtree(bad)
