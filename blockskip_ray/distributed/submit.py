"""`blockskip submit`: send a catalog job to a remote Ray cluster through its job server (JobSubmissionClient).

The job YAML travels in the runtime_env's working_dir, which is uploaded to the cluster and becomes the job's
current directory there:
- default working_dir: the checkout the YAML lives in (the nearest parent holding blockskip_ray/), so the cluster
  runs exactly this code: entrypoint `python -m blockskip_ray.commands.run REL/JOB.yaml ...`;
- otherwise the YAML's own directory, with `blockskip` installed on the cluster: entrypoint `blockskip run JOB.yaml`.
Relative paths inside the job (catalog, store, work_dir) are therefore relative to that directory on the
cluster; use absolute paths or s3:// for anything the cluster already has. The spec and the overrides are
validated here first, so a typo fails before anything is uploaded. No credentials are sent: the cluster's nodes
use their own AWS settings for s3:// stores. Clusters with Ray token authentication (the default for new clusters
in Ray 2.60) need the cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_MODE=token and ~/.ray/auth_token).
"""
from __future__ import annotations

import os
import shlex
import time
import uuid
from pathlib import Path
from typing import Callable

from .jobspec import load_spec

EXCLUDES = [".git", ".venv", "**/__pycache__", "demo-out", "blockskip-work", "blockskip-store", "*.egg-info",
            ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str):
    """A JobSubmissionClient; with RAY_AUTH_TOKEN set, its token goes in the Authorization header explicitly
    (Ray's own lookup depends on RAY_AUTH_MODE as it was when ray was first imported in this process)."""
    from ray.job_submission import JobSubmissionClient

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)


def find_working_dir(job_yaml: Path) -> Path:
    for parent in job_yaml.resolve().parents:
        if (parent / "blockskip_ray" / "__init__.py").is_file():
            return parent
    return job_yaml.resolve().parent


def build_entrypoint(job_yaml: Path, working_dir: Path, store: str | None, overrides: list[str],
                     python: str = "python") -> str:
    job_yaml, working_dir = job_yaml.resolve(), working_dir.resolve()
    try:
        rel = job_yaml.relative_to(working_dir)
    except ValueError:
        raise ValueError(f"the job spec {job_yaml} must be inside the uploaded working dir {working_dir} "
                         "(choose it with --working-dir)") from None
    if (working_dir / "blockskip_ray" / "__init__.py").is_file():
        cmd = [python, "-m", "blockskip_ray.commands.run", rel.as_posix()]
    else:
        cmd = ["blockskip", "run", rel.as_posix()]
    if store:
        cmd += ["--store", store]
    return " ".join(shlex.quote(c) for c in cmd + list(overrides))


def submit(job_yaml: str | Path, address: str, store: str | None = None, overrides: list[str] | None = None,
           working_dir: str | Path | None = None, python: str = "python", agent_wait_s: float = 600
           ) -> tuple[str, str]:
    """Validate, upload, submit; returns (submission_id, entrypoint)."""
    overrides = list(overrides or [])
    job_yaml = Path(job_yaml)
    job = load_spec(job_yaml, overrides + ([f"store={store}"] if store else []))  # fail here, not on the cluster
    wd = Path(working_dir) if working_dir else find_working_dir(job_yaml)
    entrypoint = build_entrypoint(job_yaml, wd, store, overrides, python)
    c = client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            sid = c.submit_job(
                entrypoint=entrypoint,
                submission_id=f"blockskip-{job.job_id}-{uuid.uuid4().hex[:8]}",
                runtime_env={"working_dir": str(wd.resolve()), "excludes": EXCLUDES},
                metadata={"blockskip_job_id": job.job_id},
            )
            return sid, entrypoint
        except RuntimeError as e:
            # A head that just started answers 500 until its job agent is up: wait for it, up to agent_wait_s
            # (a deadline, left as soon as the agent answers; a loaded machine can take minutes).
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait(address: str, submission_id: str, timeout_s: float = 3600, poll_s: float = 2.0,
         log: Callable[[str], None] = print) -> str:
    """Poll until the submission ends; prints state changes; returns the final status (SUCCEEDED/FAILED/...)."""
    c = client(address)
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        status = str(c.get_job_status(submission_id).value)
        if status != last:
            log(f"{submission_id}: {status}")
            last = status
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{submission_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def logs(address: str, submission_id: str) -> str:
    return client(address).get_job_logs(submission_id)


__all__ = ["submit", "wait", "logs", "build_entrypoint", "find_working_dir", "EXCLUDES"]
