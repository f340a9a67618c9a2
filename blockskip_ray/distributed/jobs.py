"""`blockskip run`: a catalog job on the current Ray cluster (or a local one it starts).

    validate catalog -> status table -> selection (once per model) -> precompute -> Ray Train run per subject
    (C at once, fractional GPUs) -> adapter + metrics + samples in the store -> summary

The driver is the single writer of `jobs/{job_id}/status.parquet` (store.JobStatus); workers write only their
subject's artifacts. Rerunning a job continues it: succeeded subjects whose adapter is in the store are left
alone, the others run again and Ray Train hands them their last persisted checkpoint (see training.py).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..method.catalog import Subject, load_catalog
from ..store import ADAPTER_FILE, JobStatus, Store, delete_features, validate_id
from ..store.lease import DEFAULT_TTL_S, Lease, write_driver_record
from ..store.status import STATES, utc_now
from .jobspec import JobSpec, check_model

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class JobResult:
    job_id: str
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # subject/row key -> reason
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)
    wall_s: float = 0.0
    model_dir: str = ""  # the resolved local pipeline directory
    prompts: dict[str, str] = field(default_factory=dict)  # subject id -> instance prompt (valid rows)

    @property
    def ok(self) -> bool:
        return not self.failed


# ---------------------------------------------------------------------------------------------- inputs
def resolve_model(job: JobSpec, log: Log = _stderr) -> str:
    """A local pipeline dir: `tiny:flux` / `tiny:sana` are built into work_dir once; `toy:flux` is the
    pretrained toy model shipped in the package."""
    if job.model.startswith("tiny:"):
        family = job.model.split(":", 1)[1]
        if family not in ("flux", "sana"):
            raise ValueError(f"model {job.model!r}: expected tiny:flux or tiny:sana")
        out = Path(job.work_dir) / "models" / f"tiny-{family}"
        if not (out / "model_index.json").is_file():
            from ..models.tiny import init_model
            log(f"building the tiny {family} model into {out}")
            init_model(family, out)
        return str(out.resolve())
    if job.model.startswith("toy:"):  # the pretrained toy model shipped in the package (toy/weights)
        from ..toy import toy_model_dir
        if job.model != "toy:flux":
            raise ValueError(f"model {job.model!r}: the only toy pipeline is toy:flux")
        return str(toy_model_dir(job.model))
    from ..models import fetch
    fetch.check_model(job.model)  # hub ids, unpublished URIs, non-pipelines: one line, before any worker starts
    # s3://: fetched once per node into its model cache (workers fetch the same path on their own node).
    return str(fetch.ensure_local(job.model).resolve())


def resolve_catalog(job: JobSpec, log: Log = _stderr) -> str:
    """The catalog file; `synthetic:N` writes N synthetic subjects (toy robots) + catalog.jsonl into work_dir;
    `toy:N` the first N held-out subjects of the toy domain (for the `toy:flux` model)."""
    assert job.catalog is not None
    if job.catalog.startswith("toy:"):
        from ..toy.catalog import write_toy_catalog
        path = write_toy_catalog(job.catalog, Path(job.work_dir) / "catalog")
        log(f"toy catalog {job.catalog} (held-out toy identities) at {path}")
        return str(path)
    if not job.catalog.startswith("synthetic:"):
        return job.catalog
    import json

    from ..method.images import make_synthetic_subject
    n = int(job.catalog.split(":", 1)[1])
    root = Path(job.work_dir) / "catalog"
    rows = []
    for i in range(n):
        sid = f"toy-{i + 1}"
        if not (root / sid).is_dir():
            make_synthetic_subject(root / sid, n=4, size=128, seed=i)
        rows.append({"id": sid, "images": sid, "prompt": f"a photo of sks{i + 1} toy", "class": "toy",
                     "eval_prompts": [f"a photo of sks{i + 1} toy on a beach"]})
    path = root / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"synthetic catalog of {n} subjects at {path}")
    return str(path)


def error_key(row: int, raw_id: str | None, taken: set[str]) -> str:
    """The status-table key of a bad catalog row: its id when valid and unused, else `row-{n}`."""
    try:
        if raw_id is not None and raw_id not in taken:
            return validate_id(raw_id)
    except ValueError:
        pass
    return f"row-{row}"


def validate_catalog(job: JobSpec, status: JobStatus, catalog_path: str, log: Log = _stderr
                     ) -> tuple[list[Subject], dict[str, str]]:
    """load_catalog + record every bad row as failed (stage validate). --strict refuses the job first."""
    valid, errors = load_catalog(catalog_path, job.max_image_pixels)
    if errors and job.strict:
        lines = "; ".join(f"row {r} ({i!r}): {why}" for r, i, why in errors[:10])
        raise ValueError(f"catalog {catalog_path}: {len(errors)} invalid row(s) and strict=true: {lines}")
    taken = {s.id for s in valid}
    failed: dict[str, str] = {}
    rows = []
    now = utc_now()
    for r, raw_id, why in errors:
        key = error_key(r, raw_id, taken)
        taken.add(key)
        reason = f"catalog row {r}" + (f" (id {raw_id!r})" if raw_id is not None else "") + f": {why}"
        failed[key] = reason
        rows.append({"subject_id": key, "stage": "validate", "state": "failed", "error": reason,
                     "started_at": now, "finished_at": now})
        log(f"[{job.job_id}] {key}: failed at validate: {reason}")
    if rows:
        status.set_many(rows)
    log(f"[{job.job_id}] catalog: {len(valid)} valid subject(s), {len(errors)} invalid row(s)")
    return valid, failed


# ---------------------------------------------------------------------------------------------- stages
def selection_lookup(job: JobSpec, store: Store, model_dir: str, log: Log = _stderr):
    """lookup(ratio) -> (n, m) | None from the model's selection table (models/{model_key}/selection.json).

    When the model has no table yet and selection.enabled, the masking probes run first through the public
    `blockskip select` command (on this Ray cluster), with selection.options as its flags."""
    from ..probe.selection import load_selection, lookup_for

    if load_selection(store, model_dir) is None:
        if not job.selection.enabled:
            log(f"[{job.job_id}] selection: no table for this model and selection.enabled=false; default split")
            return None
        log(f"[{job.job_id}] selection: no table for this model yet; running the masking probes")
        run_select(job, store, model_dir)
    return lookup_for(store, model_dir)


def run_select(job: JobSpec, store: Store, model_dir: str) -> None:
    from .jobspec import parse_select_argv, select_argv

    argv = select_argv(job, model_dir, store.uri)
    args = parse_select_argv(argv)  # already checked when the spec was built
    if int(args.func(args) or 0) != 0:
        raise RuntimeError(f"`blockskip {' '.join(argv)}` failed")


def resolve_skip_plan(job: JobSpec, model_dir: str, lookup, log: Log = _stderr) -> tuple[int, int]:
    from ..method.personalize import TrainSpec, num_blocks, resolve_skip
    t = job.train
    probe = TrainSpec(model=model_dir, images="", prompt="", out="", mode=t.mode,
                      skip=tuple(t.skip) if t.skip is not None else None,
                      skip_ratio=None if t.skip is not None else t.skip_ratio)
    return resolve_skip(probe, num_blocks(model_dir), lookup, log=lambda m: log(f"[{job.job_id}] {m}"))


def precompute_stage(job: JobSpec, store: Store, model_dir: str, subjects: list[Subject], skip,
                     log: Log) -> dict[str, str]:
    """Ray Data precompute of every subject's features into the store; returns {subject_id: reason} of failures.

    job.precompute holds PrecomputeConfig fields (feature_dtype, batch_size, concurrency, num_gpus, ...) and
    `enabled` (default true; false: each training worker computes its subject's features itself)."""
    opts = job.precompute.options()
    if not job.precompute.enabled:
        log(f"[{job.job_id}] precompute: disabled (precompute.enabled=false); training workers compute features")
        return {}
    from .precompute import PrecomputeConfig, run_precompute

    t = job.train
    cfg = PrecomputeConfig(model=model_dir, skip=tuple(skip), mode=t.mode, steps=t.steps, resolution=t.resolution,
                           s_max=t.s_max, seed=t.seed, max_text_tokens=t.max_text_tokens, guidance=t.guidance,
                           max_image_pixels=job.max_image_pixels, **opts)
    results = run_precompute(store, subjects, cfg, overwrite=job.overwrite,
                             overwrite_hint="set overwrite: true in the job (or the override overwrite=true)",
                             log=lambda m: log(f"[{job.job_id}] precompute: {m}"))
    return {sid: str(r.get("error") or "precompute failed") for sid, r in results.items() if r["state"] == "failed"}


# ---------------------------------------------------------------------------------------------- driver
class Progress:
    """One line per subject state change, with the running counts."""

    def __init__(self, job_id: str, status: JobStatus, log: Log):
        self.job_id, self.status, self.log = job_id, status, log
        self.lock = threading.Lock()
        self.frozen = False  # set when the driver is leaving: its own close_running has the last word

    def set(self, sid: str, **fields: Any) -> None:
        with self.lock:
            if self.frozen:
                return
            row = self.status.update(sid, **fields)
            counts = self.status.counts()  # kept by the writer: no store read per change
            tail = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            why = f": {row['error']}" if row["state"] == "failed" and row["error"] else ""
            self.log(f"[{self.job_id}] {sid}: {row['state']} ({row['stage']}){why}  [{tail}]")


def init_ray(job: JobSpec, log: Log = _stderr) -> None:
    """ray.address: "auto" joins the recorded cluster when it is alive, else starts a local one (a dead recorded
    cluster is detected in seconds: distributed/ray_address.py); "local" always starts a private local Ray (the
    demo: never someone else's cluster on a shared machine); anything else is a cluster address, which must be
    reachable (else a one-line ValueError)."""
    import ray

    from . import ray_address
    if ray.is_initialized():
        return
    ray_address.init(job.ray.address, job.ray.num_cpus, log=lambda m: log(f"[{job.job_id}] {m}"),
                     local_kwargs={"include_dashboard": False}, log_to_driver=True)


class DriverExit(SystemExit):
    """SIGTERM (or SIGHUP) reached the driver: unwinds like sys.exit(128 + signum), so the job closes its rows."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signame = signal.Signals(signum).name


@contextmanager
def _exit_signals() -> Iterator[None]:
    """In the main thread, turn SIGTERM/SIGHUP into DriverExit (Python's default ends the process at once,
    without `finally`); SIGINT already raises KeyboardInterrupt. Elsewhere (a thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise DriverExit(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def exit_reason(exc: BaseException, lost: str | None = None) -> tuple[str, str]:
    """(driver state, job-level reason) for a driver that ends by this exception."""
    if lost:
        return "exited", f"driver exited: {lost}"
    if isinstance(exc, DriverExit):
        return "exited", f"driver exited: {exc.signame}"
    if isinstance(exc, KeyboardInterrupt):
        return "exited", "driver exited: SIGINT (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return "exited", f"driver exited: exit code {exc.code}"
    text = str(exc).strip().splitlines()
    return "failed", f"driver failed: {type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def close_running(status: JobStatus, reason: str, log: Log = _stderr) -> list[str]:
    """Every row still `running` becomes `failed` with the job-level reason; returns their subject ids."""
    rows = [r for r in status.read() if r["state"] == "running"]
    now = utc_now()
    if rows:
        status.set_many([{"subject_id": r["subject_id"], "state": "failed", "error": reason, "finished_at": now}
                         for r in rows])
        log(f"[{status.job_id}] {len(rows)} running subject(s) closed as failed: {reason}")
    return [r["subject_id"] for r in rows]


def run_job(job: JobSpec, log: Log = _stderr, lease_ttl_s: float = DEFAULT_TTL_S) -> JobResult:
    """The whole job, as the single driver of its job id (store/lease.py). However the driver ends (success,
    exception, SIGTERM/SIGHUP, Ctrl-C), rows left `running` are closed with the job-level reason, the driver's
    final state goes to jobs/{job_id}/driver.json and the lease is released."""
    t0 = time.perf_counter()
    store = Store.open(job.store)
    status = JobStatus(store, job.job_id, write_behind=True)  # a change never waits for the store (store/status.py)
    result = JobResult(job.job_id)
    model_dir = result.model_dir = resolve_model(job, log)
    explicit = check_model(job, model_dir)  # before Ray, selection, the lease or any status row
    lease = Lease(store, job.job_id, ttl_s=lease_ttl_s,
                  on_lost=lambda why: log(f"[{job.job_id}] ERROR: {why}; this driver stops at its next step"))
    lease.acquire()
    started = time.time()
    progress = Progress(job.job_id, status, log)
    state, reason = "failed", None
    try:
        write_driver_record(store, job.job_id, "running", started_at=started)
        with _exit_signals():
            _run_stages(job, store, status, result, model_dir, explicit, progress, lease, log)
        state = "finished"
    except BaseException as e:
        state, reason = exit_reason(e, lease.lost)
        progress.frozen = True  # subject threads still unwinding must not reopen a row
        try:
            close_running(status, reason, log)
            status.compact()  # every change written and folded before the driver goes
        except Exception as close_error:  # noqa: BLE001 - keep the original exception; say what is left
            log(f"[{job.job_id}] could not close the running rows ({close_error}); `blockskip status` shows "
                f"the driver as ended")
        raise
    finally:
        try:
            write_driver_record(store, job.job_id, state, reason, started_at=started)
        finally:
            lease.release()
    result.wall_s = time.perf_counter() - t0
    return result


def _shutdown_subjects(pool: ThreadPoolExecutor) -> None:
    """The driver is leaving: queued subjects never start, running Ray Train runs end with Ray (their threads
    would otherwise keep the process alive until training finished)."""
    pool.shutdown(wait=False, cancel_futures=True)
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass


def _run_stages(job: JobSpec, store: Store, status: JobStatus, result: JobResult, model_dir: str,
                explicit: tuple[int, int] | None, progress: "Progress", lease: Lease, log: Log) -> None:
    from .training import failure_reason, fit_subject, subject_train_spec

    def check_lease() -> None:
        if lease.lost:
            raise RuntimeError(lease.lost)

    if job.catalog is None:  # a selection-only job
        init_ray(job, log)
        lookup = selection_lookup(job, store, model_dir, log)
        for ratio in job.selection.skip_ratios:
            log(f"[{job.job_id}] skip ratio {ratio}: split {lookup(ratio) if lookup else 'n/a (no table)'}")
        return
    subjects, result.failed = validate_catalog(job, status, resolve_catalog(job, log), log)
    result.prompts = {s.id: s.prompt for s in subjects}
    previous = {r["subject_id"]: r for r in status.read()}
    todo: list[Subject] = []
    for s in subjects:
        has_adapter = store.exists(f"subjects/{s.id}/adapter/{ADAPTER_FILE}")
        prev = previous.get(s.id)
        if prev and prev["state"] in ("succeeded", "skipped") and has_adapter:
            log(f"[{job.job_id}] {s.id}: already {prev['state']} in this job; left as is")
            result.skipped.append(s.id)
        elif has_adapter and not prev and not job.overwrite:
            progress.set(s.id, stage="done", state="skipped", error="adapter already in the store (overwrite=false)",
                         started_at=None, finished_at=utc_now())
            result.skipped.append(s.id)
        else:
            if not prev or prev["state"] != "failed" or prev["stage"] != "validate":
                status.update(s.id, state="pending", stage=(prev or {}).get("stage") or "queued", error=None)
            todo.append(s)
    if todo:
        init_ray(job, log)
        if explicit is not None or job.train.mode == "lora":  # an explicit plan (or no skipping): no probes
            log(f"[{job.job_id}] selection: not run (train.skip={list(explicit) if explicit else None}, "
                f"mode {job.train.mode})")
            lookup = None
        else:
            lookup = selection_lookup(job, store, model_dir, log)
        skip = resolve_skip_plan(job, model_dir, lookup, log)
        check_lease()
        now = utc_now()
        status.set_many([{"subject_id": s.id, "stage": "precompute", "state": "running", "error": None,
                          "started_at": now, "finished_at": None} for s in todo])
        log(f"[{job.job_id}] precompute: {len(todo)} subject(s) running")
        bad = precompute_stage(job, store, model_dir, todo, skip, log)
        for sid, reason in bad.items():
            progress.set(sid, stage="precompute", state="failed", error=reason, finished_at=utc_now())
            result.failed[sid] = reason
        todo = [s for s in todo if s.id not in bad]

        def one(s: Subject) -> None:
            check_lease()
            attempts = (status.get(s.id) or {}).get("attempts", 0) + 1
            progress.set(s.id, stage="train", state="running", error=None, attempts=attempts, finished_at=None)
            spec = subject_train_spec(job, model_dir, s.id, s.prompt, "", skip, out="")
            try:
                metrics = fit_subject(job, store, s.id, spec, s.to_json()["images"], list(s.eval_prompts))
            except Exception as e:  # isolate: this subject fails, the others go on
                stage, reason = failure_reason(e)
                progress.set(s.id, stage=stage, state="failed", error=reason, finished_at=utc_now())
                result.failed[s.id] = reason
                return
            progress.set(s.id, stage="done", state="succeeded", error=None, finished_at=utc_now())
            if not job.keep_features:  # the adapter is written: its features are no longer needed
                delete_features(store, s.id)
            result.succeeded.append(s.id)
            result.metrics[s.id] = metrics

        if job.ray.workers:  # long-lived workers, packed subjects (distributed/pool.py)
            from .pool import run_pool

            def on_event(sid: str, kind: str, info: Any) -> None:
                if kind == "running":
                    check_lease()
                    attempts = (status.get(sid) or {}).get("attempts", 0) + 1
                    progress.set(sid, stage="train", state="running", error=None, attempts=attempts, finished_at=None)
                elif kind == "succeeded":
                    progress.set(sid, stage="done", state="succeeded", error=None, finished_at=utc_now())
                    if not job.keep_features:
                        delete_features(store, sid)
                    result.succeeded.append(sid)
                    result.metrics[sid] = info
                else:
                    stage, reason = info
                    progress.set(sid, stage=stage, state="failed", error=reason, finished_at=utc_now())
                    result.failed[sid] = reason

            run_pool(job, store, model_dir, todo, skip, on_event, log)
        else:
            pool = ThreadPoolExecutor(max_workers=job.ray.concurrency, thread_name_prefix="subject")
            try:
                list(pool.map(one, todo))
            except BaseException:
                _shutdown_subjects(pool)
                raise
            pool.shutdown(wait=True)
    status.compact()  # fold this run's status events into status.parquet
    for sid in result.skipped:
        try:
            result.metrics[sid] = store.read_json(f"subjects/{sid}/metrics.json")
        except FileNotFoundError:
            pass


def run_and_serve(job: JobSpec, served_dir: str | None, report: Log = print, log: Log = _stderr
                  ) -> tuple[JobResult, list[Path]]:
    """`blockskip demo`: run the job, report its summary, then (served_dir given) serve every adapter over HTTP,
    save one image per subject into served_dir and stop Serve. Ray is always shut down at the end: the demo's
    job starts a private local Ray, and no Ray process may outlive the command."""
    import ray

    paths: list[Path] = []
    try:
        result = run_job(job, log)
        report(summary(result))
        adapters = sorted(result.succeeded + result.skipped)
        if adapters and served_dir is not None:
            from .serve_run import serve_and_request
            report(f"serving {len(adapters)} adapter(s) from {job.store} over HTTP (Ray Serve) ...")
            paths = serve_and_request(result.model_dir, job.store, adapters, served_dir, prompt=result.prompts,
                                      steps=job.samples.steps, size=job.samples.size or job.train.resolution)
            for p in paths:
                report(f"  served image: {p}")
    finally:
        ray.shutdown()
    return result, paths


def summary(result: JobResult) -> str:
    """Per subject: loss first -> last, steps/s, peak memory, skip plan, adapter and samples."""
    lines = [f"job {result.job_id}: {len(result.succeeded)} succeeded, {len(result.skipped)} skipped, "
             f"{len(result.failed)} failed in {result.wall_s:.1f} s"]
    for sid, m in sorted(result.metrics.items()):
        loss = m.get("loss") or [float("nan")]
        sps = m.get("steps_per_s")
        lines.append(f"  {sid}: loss {loss[0]:.4f} -> {loss[-1]:.4f} over {len(loss)} steps, "
                     f"{'n/a' if sps is None else f'{sps:.2f}'} steps/s, peak {m.get('peak_memory_bytes', 0) / 2**20:.0f} MiB "
                     f"({m.get('peak_memory_kind')}), skip n={m['skip'][0]} m={m['skip'][1]} "
                     f"(blocks {m['kept_blocks'][0]}..{m['kept_blocks'][1]} of {m['num_blocks']} trained)")
        lines.append(f"    adapter {m.get('adapter')}")
        for p in m.get("samples", []):
            lines.append(f"    sample  {p}")
    for sid, why in sorted(result.failed.items()):
        lines.append(f"  {sid}: FAILED: {why}")
    return "\n".join(lines)


__all__ = ["run_job", "JobResult", "summary", "close_running", "exit_reason", "DriverExit", "validate_catalog", "resolve_model", "resolve_catalog",
           "selection_lookup", "init_ray", "error_key"]
