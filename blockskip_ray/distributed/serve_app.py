"""Ray Serve application: every trained adapter behind one HTTP endpoint (design section 5).

Two deployments. `Ingress` (FastAPI, no CPU reserved) authenticates, validates and bounds requests, then
calls `Generator` through a handle with `multiplexed_model_id=<adapter>`, so Serve routes a request to a
replica that already holds that adapter. `Generator` loads the base pipeline once per replica and keeps up to
`cache_size` LoRA adapters loaded (`serve.multiplexed`, LRU); eviction deletes the adapter from the pipeline.
Overload: the handle's `max_queued_requests` raises BackPressureError, answered as 503 JSON with Retry-After;
the Ingress has its own bounded queue (Serve's `backpressure_config` adds Retry-After there).
Hostile clients: `HttpGuard` (blockskip_ray/http_guard.py) wraps the FastAPI app (and, through Serve's proxy
callback, the HTTP proxy): token before body, size/time/encoding limits. A request whose client disconnects
is cancelled by Serve; the Generator then stops the pipeline before or between denoising steps.

Entry points: `build_app(args)` (for `serve run blockskip_ray.distributed.serve_app:build_app model=M store=S`
and KubeRay RayService), `blockskip serve` (see `serve_run.py`).
"""

import asyncio
import os
import secrets
import tempfile
import threading
from dataclasses import asdict, fields
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..http_guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, GuardConfig, HttpGuard
from ..models.fetch import check_model
from ..models.loading import load_pipeline
from ..serving import (AdapterHost, AdapterUnusable, Cancelled, ImageRequest, Job, ServeLimits, check_bearer, pick_device_dtype,
                       resolve, token_digest)
from ..store import ADAPTER_FILE, Store, adapter_prefix, list_adapters

TOKEN_ENV = "BLOCKSKIP_API_TOKEN"


class _Lease:
    """What the multiplex cache holds per adapter; Serve calls `__del__` on LRU eviction."""

    def __init__(self, host: AdapterHost, adapter_id: str):
        self.host, self.adapter_id, self.released = host, adapter_id, False

    def __del__(self) -> None:
        # Called once by Serve on eviction (in a worker thread) and again by the GC: only the first counts.
        if not self.released:
            self.released = True
            self.host.unload(self.adapter_id)


UNUSABLE = "the adapter could not be loaded: damaged in the store, or trained for another model"


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, model: str, store: str, device: str = "auto", cache_size: int = 3):
        dev, dtype = pick_device_dtype(device)
        pipe = load_pipeline(model, dev, dtype)  # once per replica; an s3:// model is fetched once per node
        self.host = AdapterHost(pipe, Store.open(store), tempfile.mkdtemp(prefix="blockskip-serve-"))
        self.cache_size = cache_size

        async def load_adapter(adapter_id: str) -> _Lease:
            await asyncio.to_thread(self.host.load, adapter_id)
            return _Lease(self.host, adapter_id)

        # Decorated here, not on the class, so the cache size is a deployment argument.
        self._adapter = serve.multiplexed(max_num_models_per_replica=cache_size)(load_adapter)
        self.counts = {"completed": 0, "cancelled": 0, "steps": 0}  # requests and denoising steps run
        self._counts_lock = threading.Lock()

    def _generate(self, job: Job, cancel: threading.Event) -> bytes | None:
        progress: list[int] = []
        outcome = "cancelled"
        try:
            png = self.host.generate_png(job, cancel, progress)
            outcome = "completed"
            return png
        except Cancelled:
            return None
        finally:
            with self._counts_lock:
                self.counts[outcome] += 1
                self.counts["steps"] += len(progress)

    async def generate(self, job: dict) -> dict[str, Any]:
        j = Job(**job)
        hit = j.adapter in self.host.loaded
        try:
            await self._adapter(j.adapter)
        except KeyError:  # removed from the store after the ingress checked
            return {"status": 404, "reason": "unknown adapter"}
        except AdapterUnusable:  # damaged in the store or made for another model; the pipeline is untouched
            return {"status": 500, "reason": UNUSABLE}
        cancel = threading.Event()
        try:
            # The pipeline runs in a thread, which a cancelled await does not stop: the event does, before
            # the first step or after the current one (Serve cancels this call when the client disconnects).
            png = await asyncio.to_thread(self._generate, j, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise
        except AdapterUnusable:  # an evicted adapter reloaded for this request only
            return {"status": 500, "reason": UNUSABLE}
        return {"png": png, "cache": "hit" if hit else "miss"}

    def stats(self) -> dict[str, Any]:
        return {"cache_size": self.cache_size, "loaded": sorted(self.host.loaded),
                "pipeline_adapters": self.host.pipeline_adapters(), "generation": dict(self.counts)}


class ErrorBody(BaseModel):
    error: str
    reason: str


api = FastAPI(title="blockskip-ray image service", version="1",
              description="Generate images with per-subject LoRA adapters trained by blockskip-ray.")
_bearer = HTTPBearer(auto_error=False)
_ERRORS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
           422: "invalid_request", 500: "internal", 503: "overloaded"}
_ERROR_DOCS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in (400, 401, 404, 408, 413, 415, 422, 503)}
_FIELDS = frozenset(ImageRequest.model_fields)
# The ingress's guard settings: set by Ingress.__init__ (the token digest is a deployment argument), read
# by the middleware per request. One Ingress per replica process, so one value.
_guard_config = GuardConfig()
api.add_middleware(HttpGuard, config=lambda: _guard_config)


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": _ERRORS.get(status, "error"), "reason": reason}, status_code=status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return _error(400, "malformed JSON body")
    # Never echo the input: a location is named only by known field names (an unknown key is "unknown
    # field"), pydantic's messages name the expected type, not the value, and at most 3 errors are listed.
    parts = []
    for e in errs[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "extra_forbidden":
            parts.append("unknown field (allowed: " + ", ".join(sorted(_FIELDS)) + ")")
            continue
        name = ".".join(loc) if loc and all(x in _FIELDS for x in loc) else ("body" if not loc else "field")
        parts.append(f"{name}: {str(e.get('msg', 'invalid'))[:160]}")
    more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
    return _error(422, "; ".join(parts) + more)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error ({type(exc).__name__})")  # no details: they may name paths or keys


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, store: str, limits: dict[str, Any], digest: str | None,
                 guard: dict[str, Any] | None = None, retry_after_s: float = 1.0):
        global _guard_config
        self.gen = generator
        self.store = Store.open(store)
        self.limits = ServeLimits(**limits)
        env = os.environ.get(TOKEN_ENV)
        self.digest = digest or (token_digest(env) if env else None)
        self.retry_after = str(max(1, round(retry_after_s)))
        _guard_config = GuardConfig(digest=self.digest, **(guard or {}))

    def _auth(self, creds: HTTPAuthorizationCredentials | None) -> None:
        if self.digest is None:
            return
        header = f"{creds.scheme} {creds.credentials}" if creds else None
        if not check_bearer(header, self.digest):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness; open even when auth is on (it reveals nothing)."""
        return {"status": "ok"}

    @api.get("/v1/adapters", responses=_ERROR_DOCS)
    async def adapters(self, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> dict[str, list[str]]:
        """The adapter ids available in the store."""
        self._auth(creds)
        return {"adapters": await asyncio.to_thread(list_adapters, self.store)}

    @api.get("/v1/stats", responses=_ERROR_DOCS)
    async def stats(self, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> dict[str, Any]:
        """Limits and the adapters loaded in one Generator replica (for operators and tests)."""
        self._auth(creds)
        return {"limits": self.limits.to_dict(), "replica": await self.gen.stats.remote()}

    @api.post("/v1/images", response_class=Response, responses={
        200: {"content": {"image/png": {}}, "description": "the PNG image; headers X-Seed, X-Adapter-Cache"},
        **_ERROR_DOCS})
    async def images(self, req: ImageRequest,
                     creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Response:
        """Generate one image with the adapter `adapter`."""
        self._auth(creds)
        try:
            job = resolve(req, self.limits, secrets.randbelow(2**31))
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        if not await asyncio.to_thread(self.store.exists, f"{adapter_prefix(job.adapter)}/{ADAPTER_FILE}"):
            raise HTTPException(404, "unknown adapter")  # no echo of the id
        try:
            out = await self.gen.options(multiplexed_model_id=job.adapter).generate.remote(asdict(job))
        except BackPressureError:
            return _error(503, "server overloaded: request queue full, retry later", {"Retry-After": self.retry_after})
        if "status" in out:
            raise HTTPException(out["status"], out["reason"])
        return Response(out["png"], media_type="image/png",
                        headers={"X-Seed": str(job.seed), "X-Adapter-Cache": out["cache"]})


# build_app arguments: name -> (type, default). Values from `serve run k=v` arrive as strings.
APP_ARGS: dict[str, tuple[type, Any]] = {
    "model": (str, None), "store": (str, None), "device": (str, "auto"), "token": (str, None),
    "cache_size": (int, 3), "num_replicas": (int, 1), "num_cpus": (float, 1.0), "num_gpus": (float, 0.0),
    "max_ongoing": (int, 2), "max_queued": (int, 16), "retry_after_s": (float, 1.0),
    "max_body_bytes": (int, DEFAULT_MAX_BODY_BYTES), "body_timeout_s": (float, DEFAULT_BODY_TIMEOUT_S),
    **{f.name: (f.type if isinstance(f.type, type) else {"int": int, "float": float}[f.type], f.default)
       for f in fields(ServeLimits)},
}


def parse_args(args: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise ValueError(f"unknown serve argument(s) {unknown}: expected some of {sorted(APP_ARGS)}")
    out: dict[str, Any] = {}
    for name, (typ, default) in APP_ARGS.items():
        v = args.get(name, default)
        if v is None and name in ("model", "store"):
            raise ValueError(f"serve argument {name!r} is required")
        try:
            out[name] = None if v is None else typ(v)
        except (TypeError, ValueError):
            raise ValueError(f"serve argument {name}={v!r}: expected {typ.__name__}") from None
    if out["cache_size"] < 1 or out["max_ongoing"] < 1 or out["max_queued"] < 0 or out["num_replicas"] < 1:
        raise ValueError("cache_size, max_ongoing and num_replicas must be >= 1 and max_queued >= 0")
    if out["retry_after_s"] < 0:
        raise ValueError("retry_after_s must be >= 0")
    GuardConfig(max_body_bytes=out["max_body_bytes"], body_timeout_s=out["body_timeout_s"])  # checks them
    return out


def guard_settings(a: dict[str, Any]) -> dict[str, Any]:
    return {"max_body_bytes": a["max_body_bytes"], "body_timeout_s": a["body_timeout_s"]}


def build_app(args: dict[str, Any]):
    """Application builder: `serve run blockskip_ray.distributed.serve_app:build_app model=M store=S [k=v ...]`."""
    a = parse_args(args)
    limits = ServeLimits(**{f.name: a[f.name] for f in fields(ServeLimits)})
    # A hub id, an unpublished URI or a directory that is no FLUX/SANA pipeline fails here, in one line,
    # before any replica starts (replicas fetch an s3:// model into their node's cache, see models/fetch.py).
    check_model(a["model"])
    token = a["token"] or os.environ.get(TOKEN_ENV)
    backpressure = BackpressureConfig(retry_after_s=a["retry_after_s"])
    gen = Generator.options(
        num_replicas=a["num_replicas"], max_ongoing_requests=a["max_ongoing"], max_queued_requests=a["max_queued"],
        backpressure_config=backpressure, ray_actor_options={"num_cpus": a["num_cpus"], "num_gpus": a["num_gpus"]},
    ).bind(a["model"], a["store"], a["device"], a["cache_size"])
    # The Ingress answers fast (the Generator's queue is bounded and a full one is a 503), so its own bound is
    # only reached by a flood: Serve then answers 503 with Retry-After from `backpressure`.
    ingress_slots = max(64, 4 * (a["max_ongoing"] + a["max_queued"]))
    # Only a digest of the token goes into the deployment config; the token itself is never stored or logged.
    return Ingress.options(max_ongoing_requests=ingress_slots, max_queued_requests=ingress_slots,
                           backpressure_config=backpressure).bind(
        gen, a["store"], limits.to_dict(), token_digest(token) if token else None, guard_settings(a),
        a["retry_after_s"])
