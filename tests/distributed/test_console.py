"""Quiet console: the project's lines on the terminal, Ray/library/C-level output in the log file; live view."""
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

from blockskip_ray.distributed.console import Console
from blockskip_ray.store import JobStatus, Store

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import logging, os, subprocess, sys, warnings
from blockskip_ray.distributed.console import console
with console(verbose=sys.argv[2] == "1", log_file=sys.argv[1]) as con:
    con.event("PROJECT line")
    print("python print from a library")
    logging.getLogger("ray.train").warning("ray train chatter")
    os.write(2, b"C-level stderr line\\n")
    subprocess.run(["echo", "child process line"])
    warnings.warn("peft warning")
print("after the block")
"""


def _run(tmp_path, verbose):
    log = tmp_path / "quiet.log"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"], capture_output=True,
                       text=True, cwd=ROOT)
    return p.stdout + p.stderr, log.read_text() if log.exists() else ""


def test_quiet_sends_everything_but_project_lines_to_the_log(tmp_path):
    term, log = _run(tmp_path, verbose=False)
    assert term.splitlines() == ["PROJECT line", "after the block"], term
    for line in ("python print from a library", "ray train chatter", "C-level stderr line", "child process line",
                 "peft warning"):
        assert line in log, line
    assert "PROJECT line" not in log


def test_verbose_shows_everything(tmp_path):
    term, log = _run(tmp_path, verbose=True)
    for line in ("PROJECT line", "python print from a library", "ray train chatter", "C-level stderr line",
                 "child process line"):
        assert line in term, line
    assert log == ""


def test_watch_prints_running_subjects_progress(tmp_path):
    store = Store.open(str(tmp_path))
    JobStatus(store, "j").set_many([{"subject_id": "a", "stage": "train", "state": "running"},
                                    {"subject_id": "b", "stage": "done", "state": "succeeded"}])
    out = io.StringIO()  # not a terminal: one line per quarter of the steps
    con = Console(out, None, False)
    with con.watch(store, "j", every_s=0.05):
        for step, want in ((3, 0), (6, 1), (9, 1), (12, 2)):
            store.write_json("subjects/a/progress.json", {"step": step, "steps": 20, "loss": 1 / step, "eta_s": 20 - step})
            deadline = time.monotonic() + 20  # wait for the poller (a loaded machine), no timing assertion
            while len(out.getvalue().splitlines()) < want and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # a few more polls: no extra line may appear
        con.event("a: succeeded")
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["  a: step 6/20, loss 0.1667, ETA 14 s", "  a: step 12/20, loss 0.0833, ETA 8 s",
                         "a: succeeded"], lines
    assert not any(line.strip().startswith("b:") for line in lines)
    assert not [t for t in threading.enumerate() if t.name == "blockskip-live-view"]
