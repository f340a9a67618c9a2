"""Quiet console for the long commands (`demo`, `run`, `serve`): the project's own progress on the terminal,
everything else (Ray, Ray Train/Data/Serve, C++ raylet/GCS lines, peft/transformers warnings) in a log file.

Quiet mode redirects the process's file descriptors 1 and 2 (so also C++ output and child processes such as
the raylet) to the log file and keeps a private duplicate of the terminal for the project's lines. That is the
only way to catch everything: Ray prints from Python loggers, from its log monitor thread (worker output), and
from C++. `--verbose` keeps today's behaviour (everything on the terminal) and still prints the project's
lines. On top, Ray is asked to be less chatty where it has knobs (RAY_DEDUP_LOGS, logging levels), so the log
file stays readable.

While a job trains, `watch` polls the job's status table and each running subject's progress.json (written
by the trainer) and shows a live view: a rich table on a terminal, otherwise one line per subject each time
it passes another 25% of its steps. State changes come from the driver as one line each (`event`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, TextIO

# Ray's own knobs, set before ray starts (no effect on an already running Ray).
QUIET_ENV = {
    "RAY_DEDUP_LOGS": "1",  # collapse repeated worker lines
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # Ray Data's bars would go into the log file
    "TQDM_DISABLE": "1",  # library progress bars (diffusers pipelines inside workers)
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
LIBRARY_LOGGERS = ("ray", "ray.train", "ray.data", "ray.serve", "ray.tune", "filelock", "urllib3")


class Console:
    """Where the project's own lines go (the terminal even while fds 1/2 point at the log file)."""

    def __init__(self, out: TextIO, log_file: Path | None, verbose: bool):
        self.out, self.log_file, self.verbose = out, log_file, verbose
        self._lock = threading.Lock()
        self._live = None

    def event(self, msg: str) -> None:
        """One line (a state change, a stage, the summary)."""
        with self._lock:
            if self._live is not None:
                self._live.console.print(msg, markup=False, highlight=False)
            else:
                self.out.write(msg + "\n")
                self.out.flush()

    __call__ = event

    @contextlib.contextmanager
    def watch(self, store, job_id: str, every_s: float = 1.0) -> Iterator[None]:
        """Live view of the job's running subjects (step, loss, ETA) while the block runs."""
        stop = threading.Event()
        tty = hasattr(self.out, "isatty") and self.out.isatty()
        thread = threading.Thread(target=self._poll, args=(store, job_id, every_s, stop, tty), daemon=True,
                                  name="blockskip-live-view")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _poll(self, store, job_id: str, every_s: float, stop: threading.Event, tty: bool) -> None:
        from ..store.status import JobStatus

        shown: dict[str, int] = {}  # subject -> last quarter printed (non-tty)
        live = None
        if tty:
            from rich.console import Console as RichConsole
            from rich.live import Live

            live = Live(console=RichConsole(file=self.out), refresh_per_second=4, transient=True)
            live.start()
            self._live = live
        try:
            while not stop.is_set():
                try:
                    rows = [r for r in JobStatus(store, job_id).read() if r["state"] == "running"]
                    progress = {r["subject_id"]: _read_progress(store, r["subject_id"]) for r in rows}
                except Exception:  # noqa: BLE001 - a half-written table: try again next tick
                    progress = {}
                if live is not None:
                    live.update(_table(progress))
                else:
                    for sid, p in progress.items():
                        if p and p.get("steps"):
                            quarter = int(4 * p["step"] / p["steps"])
                            if quarter > shown.get(sid, 0) and p["step"] < p["steps"]:
                                shown[sid] = quarter
                                self.event(f"  {sid}: {format_progress(p)}")
                stop.wait(every_s)
        finally:
            if live is not None:
                self._live = None
                live.stop()


def _read_progress(store, sid: str) -> dict | None:
    try:
        return store.read_json(f"subjects/{sid}/progress.json")
    except (FileNotFoundError, ValueError):
        return None


def format_progress(p: dict) -> str:
    loss = "" if p.get("loss") is None else f", loss {p['loss']:.4f}"
    eta = "" if p.get("eta_s") is None else f", ETA {p['eta_s']:.0f} s"
    return f"step {p['step']}/{p['steps']}{loss}{eta}"


def _table(progress: dict[str, dict | None]):
    from rich.table import Table

    t = Table(title="training", title_justify="left", box=None)
    for col in ("subject", "step", "loss", "ETA"):
        t.add_column(col)
    for sid, p in sorted(progress.items()):
        if not p:
            t.add_row(sid, "starting", "", "")
            continue
        t.add_row(sid, f"{p['step']}/{p['steps']}", "" if p.get("loss") is None else f"{p['loss']:.4f}",
                  "" if p.get("eta_s") is None else f"{p['eta_s']:.0f} s")
    return t


@contextlib.contextmanager
def console(verbose: bool = False, log_file: str | Path = "blockskip.log") -> Iterator[Console]:
    """Quiet (default): fds 1/2 -> log_file, the returned Console writes to the terminal. Verbose: no change."""
    if verbose:
        yield Console(sys.stdout, None, True)
        return
    log_path = Path(log_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    term = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    saved = (os.dup(1), os.dup(2))
    log_fh = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log_fh.fileno(), 1)
    os.dup2(log_fh.fileno(), 2)
    saved_levels = {n: logging.getLogger(n).level for n in LIBRARY_LOGGERS}
    for n in LIBRARY_LOGGERS:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # shown once each, in the log file
            yield Console(term, log_path, False)
    finally:
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log_fh.close()
        term.close()
        for n, lvl in saved_levels.items():
            logging.getLogger(n).setLevel(lvl)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


__all__ = ["console", "Console", "format_progress", "QUIET_ENV"]
