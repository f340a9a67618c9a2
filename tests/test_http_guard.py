"""HttpGuard in front of a small ASGI app on a real uvicorn socket (no Ray): order of checks, limits, encoding."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from blockskip_ray.http_guard import (PROXY_CALLBACK, GuardConfig, HttpGuard, proxy_middlewares, token_digest)

TOKEN = "guard-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
MARKER = "ECHO-MARKER-7f3a"
seen: list[bytes] = []  # bodies the inner app received


async def inner(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    seen.append(body)
    out = json.dumps({"path": scope["path"], "len": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    port = _free_port()
    cfg = GuardConfig(digest=token_digest(TOKEN), max_body_bytes=1024, body_timeout_s=0.5)
    server = uvicorn.Server(uvicorn.Config(HttpGuard(inner, cfg), host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def raw(url: str, head: str, body: bytes = b"", read: bool = True, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send raw bytes (headers, then `body`) and return (status, response body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while read:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                hdr, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in hdr.split(b"\r\n") if line.lower().startswith(b"content-length")]
                if length and len(rest) >= length[0]:
                    break
    hdr, _, rest = data.partition(b"\r\n\r\n")
    return int(hdr.split(b" ")[1]), rest


def test_auth_before_body(url):
    seen.clear()
    # Claims 10 MB and sends none of it: the answer comes from the headers alone.
    status, body = raw(url, "POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: 10000000\r\n\r\n")
    assert status == 401 and len(body) < 200 and json.loads(body)["error"] == "unauthorized"
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}]:
        r = httpx.post(f"{url}/v1/images", content=b'{"a": 1}', headers={**JSON, **headers})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert seen == []


def test_open_paths_need_no_token(url):
    for path in ("/healthz", "/-/healthz", "/-/routes", "/openapi.json", "/docs"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    assert httpx.get(f"{url}/v1/adapters").status_code == 401
    assert httpx.get(f"{url}/healthz/../v1/adapters").status_code == 401  # normalized to /v1/adapters


def test_size_limit(url):
    seen.clear()
    status, body = raw(url, "POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer guard-token-1\r\n"
                            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
    assert status == 413 and len(body) < 200
    # Chunked: counted while it streams; the first chunks fit, the total does not.
    def chunks():
        for _ in range(20):
            yield b"x" * 100
    r = httpx.post(f"{url}/v1/images", content=chunks(), headers={**AUTH, **JSON})
    assert r.status_code == 413
    ok = httpx.post(f"{url}/v1/images", content=b'{"p": "' + b"y" * 900 + b'"}', headers={**AUTH, **JSON})
    assert ok.status_code == 200 and ok.json()["len"] == 909
    assert httpx.post(f"{url}/v1/images", content=b"[" * 2000, headers={**AUTH, **JSON}).status_code == 413
    assert len(seen) == 1
    status, _ = raw(url, "POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer guard-token-1\r\n"
                         "Content-Type: application/json\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n")
    assert status == 400


def test_stalled_body_times_out(url):
    t0 = time.monotonic()
    status, body = raw(url, "POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer guard-token-1\r\n"
                            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n", b'{"half": ')
    assert status == 408 and json.loads(body)["error"] == "request_timeout"
    assert time.monotonic() - t0 < 4  # the 0.5 s deadline, not the client's 5 s socket timeout


@pytest.mark.parametrize("headers,body,status", [
    ({"content-type": "text/plain"}, b'{"a": 1}', 415),
    ({}, b'{"a": 1}', 415),
    ({"content-type": "application/x-www-form-urlencoded"}, b"a=1", 415),
    ({"content-type": "application/json; charset=utf-16"}, '{"a": 1}'.encode("utf-16"), 415),
    ({"content-type": "application/json"}, '{"a": 1}'.encode("utf-16-le"), 400),
    ({"content-type": "application/json"}, '{"a": 1}'.encode("utf-16"), 400),
    ({"content-type": "application/json"}, '{"a": 1}'.encode("utf-32"), 400),
    ({"content-type": "application/json"}, b"\xef\xbb\xbf" + b'{"a": 1}', 400),
    ({"content-type": "application/json"}, b'{"a": "\xff\xfe"}', 400),
    ({"content-type": "application/json; charset=UTF-8"}, '{"a": "é"}'.encode(), 200),
    ({"content-type": "Application/JSON"}, b'{"a": 1}', 200),
])
def test_only_utf8_json(url, headers, body, status):
    r = httpx.post(f"{url}/v1/images", content=body, headers={**AUTH, **headers})
    assert r.status_code == status, r.text
    if status != 200:
        assert set(r.json()) == {"error", "reason"}


def test_errors_never_echo_input(url):
    cases = [
        ("POST", f"/v1/{MARKER}", {"content-type": f"text/{MARKER}"}, b"x"),
        ("POST", "/v1/images", {**JSON, "Authorization": f"Bearer {MARKER}"}, MARKER.encode()),
        ("POST", "/v1/images", {**AUTH, "content-type": f"application/json; charset={MARKER}"}, b"{}"),
        ("POST", "/v1/images", {**AUTH, **JSON}, MARKER.encode() * 200),
        ("POST", "/v1/images", {**AUTH, **JSON}, MARKER.encode("utf-16")),
    ]
    for method, path, headers, body in cases:
        r = httpx.request(method, f"{url}{path}", content=body, headers=headers)
        assert 400 <= r.status_code < 500 and MARKER not in r.text and len(r.content) < 300, (path, r.text)


def test_config_from_env():
    cfg = GuardConfig.from_env({"BLOCKSKIP_API_TOKEN": "t", "BLOCKSKIP_MAX_BODY_BYTES": "77"})
    assert cfg.digest == token_digest("t") and cfg.max_body_bytes == 77 and cfg.body_timeout_s == 10.0
    assert GuardConfig.from_env(cfg.env()) == cfg and "t" not in cfg.env().values()
    assert GuardConfig.from_env({}).digest is None
    for env in [{"BLOCKSKIP_MAX_BODY_BYTES": "x"}, {"BLOCKSKIP_BODY_TIMEOUT_S": "0"},
                {"BLOCKSKIP_API_TOKEN_SHA256": "abc"}]:
        with pytest.raises(ValueError):
            GuardConfig.from_env(env)


def test_proxy_callback(monkeypatch):
    from starlette.middleware import Middleware

    monkeypatch.setenv("BLOCKSKIP_API_TOKEN_SHA256", token_digest("x"))
    [m] = proxy_middlewares()
    assert isinstance(m, Middleware) and m.cls is HttpGuard and m.kwargs["config"].digest == token_digest("x")
    module, _, name = PROXY_CALLBACK.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is proxy_middlewares
