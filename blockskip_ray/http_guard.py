"""A small ASGI middleware that stands between hostile clients and the image service (stdlib only).

It runs twice: in Ray Serve's HTTP proxy (through Serve's proxy callback, see `proxy_middlewares`) and in
the FastAPI ingress. In the proxy it keeps slow or stalled clients away from the ingress replica: the body
is read there, bounded in size and time, before Serve hands the request to a replica (Serve otherwise lets
the replica pull the body from the proxy, so a client that stalls mid-body holds a replica slot for as long
as it likes). For every HTTP request, in this order:

1. bearer token (when one is configured), from the headers only: 401 before a byte of the body is read;
2. Content-Length above `max_body_bytes`: 413 at once, nothing buffered; a malformed one: 400;
3. a request with a body must say `Content-Type: application/json` (charset, if given, utf-8): else 415;
4. the body is read with one deadline for the whole body (`body_timeout_s`: 408) and counted while it
   streams, chunked or not (413 as soon as it passes the limit);
5. the body must be UTF-8 without a byte order mark and without NUL bytes (JSON never needs a raw NUL;
   UTF-16/32 text always has them): else 400. Python's json.loads would otherwise guess UTF-16.

Error bodies are a fixed JSON `{"error", "reason"}` of a few hundred bytes that never contains anything from
the request. Paths in `open_paths` (health, docs) and Serve's own `/-/` routes (KubeRay's probes) need no
token; the size, time and encoding rules apply to them too.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_ENV = "BLOCKSKIP_API_TOKEN"
TOKEN_DIGEST_ENV = "BLOCKSKIP_API_TOKEN_SHA256"  # what `blockskip serve` hands to Ray: never the token itself
MAX_BODY_ENV = "BLOCKSKIP_MAX_BODY_BYTES"
BODY_TIMEOUT_ENV = "BLOCKSKIP_BODY_TIMEOUT_S"
# Ray Serve (2.60: ray/serve/_private/constants.py, http_util.configure_http_middlewares) calls this import
# path in every proxy actor and wraps its ASGI app with the returned starlette Middleware list.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "blockskip_ray.http_guard:proxy_middlewares"

DEFAULT_MAX_BODY_BYTES = 16 * 1024  # a prompt request is under 2 KB
DEFAULT_BODY_TIMEOUT_S = 10.0
OPEN_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json")
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")  # UTF-8, UTF-16 LE/BE (UTF-32 LE starts like UTF-16 LE)
ERROR_CODES = {400: "bad_request", 401: "unauthorized", 408: "request_timeout", 413: "payload_too_large",
               415: "unsupported_media_type"}


def token_digest(token: str) -> str:
    """What the server keeps instead of the token itself (so it never sits in deployment configs)."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(authorization: str | None, digest: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header against a token digest."""
    scheme, _, given = (authorization or "").partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    # Compare digests of equal length; compare_digest keeps the timing independent of where they differ.
    return hmac.compare_digest(token_digest(given.strip()), digest) and ok_scheme


@dataclass(frozen=True)
class GuardConfig:
    digest: str | None = None  # sha256 hex of the bearer token; None = auth off
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    open_paths: tuple[str, ...] = field(default=OPEN_PATHS)

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or not self.body_timeout_s > 0:
            raise ValueError(f"max_body_bytes must be >= 1 and body_timeout_s > 0, got {self.max_body_bytes}, "
                             f"{self.body_timeout_s}")
        if self.digest is not None and (len(self.digest) != 64 or any(c not in "0123456789abcdef" for c in self.digest)):
            raise ValueError("token digest must be 64 lowercase hex characters (sha256)")

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None) -> "GuardConfig":
        """Settings of the proxy-side guard: BLOCKSKIP_API_TOKEN (or its digest), body size and time limits."""
        env = os.environ if env is None else env
        token, digest = env.get(TOKEN_ENV), env.get(TOKEN_DIGEST_ENV)
        try:
            return cls(digest=token_digest(token) if token else (digest.strip().lower() if digest else None),
                       max_body_bytes=int(env.get(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES)),
                       body_timeout_s=float(env.get(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_S)))
        except ValueError as e:
            raise ValueError(f"bad HTTP guard setting in the environment: {e}") from None

    def env(self) -> dict[str, str]:
        """The environment that makes `from_env` give this config (the digest, never a token)."""
        out = {MAX_BODY_ENV: str(self.max_body_bytes), BODY_TIMEOUT_ENV: str(self.body_timeout_s)}
        if self.digest:
            out[TOKEN_DIGEST_ENV] = self.digest
        return out

    def with_digest(self, digest: str | None) -> "GuardConfig":
        return replace(self, digest=digest)


class _Reject(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def error_body(status: int, reason: str) -> bytes:
    return json.dumps({"error": ERROR_CODES.get(status, "error"), "reason": reason}).encode()


async def _respond(send: Send, status: int, reason: str) -> None:
    body = error_body(status, reason)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # the unread rest of the request must not be parsed as a new one
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    values = _header(headers, b"content-length")
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].strip().isdigit():
        raise _Reject(400, "malformed Content-Length header")
    return int(values[0])


def _check_content_type(headers: list[tuple[bytes, bytes]]) -> None:
    values = _header(headers, b"content-type")
    if len(values) != 1:
        raise _Reject(415, "Content-Type must be application/json")
    media, *params = [p.strip() for p in values[0].decode("latin-1").split(";")]
    if media.lower() != "application/json":
        raise _Reject(415, "Content-Type must be application/json")
    for p in params:
        key, _, value = p.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise _Reject(415, "JSON must be UTF-8 (charset=utf-8)")


def _check_utf8(body: bytes) -> None:
    if body.startswith(_BOMS):
        raise _Reject(400, "JSON must be UTF-8 without a byte order mark")
    if b"\x00" in body:
        raise _Reject(400, "JSON must be UTF-8 (the body has NUL bytes)")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Reject(400, "JSON must be UTF-8 (the body is not valid UTF-8)") from None


class HttpGuard:
    """ASGI middleware: `HttpGuard(app, config)`; `config` is a GuardConfig or a function returning one
    (read per request, so an ingress can set it once its constructor knows the token)."""

    def __init__(self, app: ASGIApp, config: GuardConfig | Callable[[], GuardConfig] | None = None):
        self.app = app
        self._config = config if callable(config) else (lambda c=config or GuardConfig(): c)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cfg = self._config()
        headers = list(scope.get("headers") or [])
        try:
            path = scope.get("path", "")
            if cfg.digest and not (path in cfg.open_paths or path.startswith("/-/")):
                auth = _header(headers, b"authorization")
                if len(auth) != 1 or not check_bearer(auth[0].decode("latin-1"), cfg.digest):
                    raise _Reject(401, "missing or wrong bearer token")
            length = _content_length(headers)
            chunked = any(b"chunked" in v.lower() for v in _header(headers, b"transfer-encoding"))
            if length is not None and length > cfg.max_body_bytes:
                raise _Reject(413, f"request body larger than {cfg.max_body_bytes} bytes")
            has_body = chunked or bool(length)
            if has_body:
                _check_content_type(headers)
            body, disconnected = await self._read_body(receive, cfg)
            if disconnected:
                return  # the client is gone: nobody to answer
            if has_body or body:
                _check_utf8(body)
        except _Reject as r:
            await _respond(send, r.status, r.reason)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, which Serve watches for

        await self.app(scope, replay, send)

    @staticmethod
    async def _read_body(receive: Receive, cfg: GuardConfig) -> tuple[bytes, bool]:
        """The whole body within one deadline and the size limit; (body, client disconnected)."""
        parts: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.body_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _Reject(408, f"request body not received within {cfg.body_timeout_s:g} s")
            try:
                msg = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise _Reject(408, f"request body not received within {cfg.body_timeout_s:g} s") from None
            if msg["type"] == "http.disconnect":
                return b"", True
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise _Reject(413, f"request body larger than {cfg.max_body_bytes} bytes")
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts), False


def proxy_middlewares() -> list[Any]:
    """Ray Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=blockskip_ray.http_guard:
    proxy_middlewares): the guard, configured from the proxy's environment."""
    from starlette.middleware import Middleware  # Serve requires starlette Middleware objects here

    return [Middleware(HttpGuard, config=GuardConfig.from_env())]


__all__ = ["GuardConfig", "HttpGuard", "proxy_middlewares", "token_digest", "check_bearer", "PROXY_CALLBACK",
           "PROXY_CALLBACK_ENV", "TOKEN_ENV", "TOKEN_DIGEST_ENV"]
