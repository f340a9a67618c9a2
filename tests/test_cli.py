"""The command line: fast start (no torch/peft/ray for --help, status, jobs), help text and defaults on every
option, RAY_ADDRESS fallback, one-line auth errors, `blockskip jobs`, running subjects' progress in `status`."""
import argparse
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blockskip_ray import cli
from blockskip_ray.store import JobStatus, Store

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "peft", "ray", "diffusers", "transformers")


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.mark.parametrize("argv", [["--help"], ["status", "j", "--store", "{tmp}"], ["jobs", "--store", "{tmp}"],
                                  ["train", "--help"], ["estimate", "--help"], ["demo", "--help"],
                                  ["serve", "--help"], ["run", "--help"], ["submit", "--help"]])
def test_start_imports_no_heavy_library(argv, tmp_path):
    """`blockskip --help` / `status` / `jobs` start in well under a second because they import none of these
    (measured: docs; here the cause is checked, not wall time)."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = ("import sys\nfrom blockskip_ray.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert "HEAVY []" in out, out[-500:]


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    for name, sp in _subparsers(parser).choices.items():
        text = sp.format_help()
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"{name} {a.option_strings or a.dest}: no help text"
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
                assert "default" in (a.help or "") or f"(default: {a.default})" in " ".join(text.split()), \
                    f"{name} {a.option_strings}: default {a.default!r} not shown"


def test_summaries_match_the_modules():
    full = {a.dest: a.help for a in _subparsers(cli.build_parser())._choices_actions}
    assert full == cli.COMMANDS


def test_train_target_choices_match_lora():
    from blockskip_ray.commands.train import TARGET_CHOICES
    from blockskip_ray.method.lora import TARGET_CHOICES as LORA

    assert TARGET_CHOICES == LORA


@pytest.fixture
def fake_submit(monkeypatch):
    import blockskip_ray.distributed.submit as sub

    calls = []
    monkeypatch.setattr(sub, "submit", lambda job, address, *a: (calls.append(address), ("sid-1", "python -m x"))[1])
    return calls


def test_submit_address_falls_back_to_ray_address(fake_submit, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert cli.main(["submit", str(ROOT / "jobs/demo-tiny.yaml")]) == 0
    assert fake_submit == ["http://head:8265"]
    assert "follow: ray job logs --address http://head:8265 --follow sid-1" in capsys.readouterr().out
    monkeypatch.delenv("RAY_ADDRESS")
    assert cli.main(["submit", str(ROOT / "jobs/demo-tiny.yaml")]) == 2
    assert "RAY_ADDRESS" in capsys.readouterr().err


def test_submit_hint_sets_auth_mode_when_a_token_is_used(fake_submit, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0k")
    assert cli.main(["submit", str(ROOT / "jobs/demo-tiny.yaml"), "--address", "http://h:8265"]) == 0
    out = capsys.readouterr().out
    assert "follow: RAY_AUTH_MODE=token ray job logs --address http://h:8265 --follow sid-1" in out
    assert "t0k" not in out  # never print the token


class _Deny(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = b"Unauthorized: missing or invalid authentication token"
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _deny

    def log_message(self, *a):
        pass


def test_auth_error_is_one_line_with_the_fix(monkeypatch, capsys):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    try:
        code = cli.main(["submit", str(ROOT / "jobs/demo-tiny.yaml"), "--address", f"http://127.0.0.1:{srv.server_port}"])
    finally:
        srv.shutdown()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "RAY_AUTH_TOKEN" in err and "RAY_AUTH_MODE=token" in err and "needs a token" in err


def _job(store, job_id, states):
    JobStatus(store, job_id).set_many([{"subject_id": f"s{i}", "stage": "train", "state": s} for i, s in enumerate(states)])


def test_jobs_lists_every_job_with_counts(tmp_path, capsys):
    store = Store.open(str(tmp_path))
    _job(store, "alpha", ["succeeded", "succeeded", "failed"])
    _job(store, "beta", ["running", "pending"])
    (tmp_path / "jobs" / "not a job").mkdir()
    assert cli.main(["jobs", "--store", str(tmp_path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"job_id": "alpha", "subjects": 3, "pending": 0, "running": 0, "succeeded": 2, "failed": 1, "skipped": 0},
        {"job_id": "beta", "subjects": 2, "pending": 1, "running": 1, "succeeded": 0, "failed": 0, "skipped": 0}]
    assert cli.main(["jobs", "--store", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["job_id", "subjects", "pending", "running", "succeeded", "failed", "skipped"]
    assert lines[1].split() == ["alpha", "3", "0", "0", "2", "1", "0"]
    assert cli.main(["jobs", "--store", str(tmp_path / "empty")]) == 0
    assert "no jobs" in capsys.readouterr().out


def test_status_shows_step_and_loss_of_running_subjects(tmp_path, capsys):
    store = Store.open(str(tmp_path))
    _job(store, "j", ["running", "running", "succeeded"])
    store.write_json("subjects/s0/progress.json", {"step": 12, "steps": 30, "loss": 0.25, "eta_s": 9.4})
    store.write_json("subjects/s2/progress.json", {"step": 30, "steps": 30, "loss": 0.1, "eta_s": 0})
    assert cli.main(["status", "j", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "s0: step 12/30, loss 0.2500, ETA 9 s" in out
    assert "s2: step" not in out  # finished subjects show no progress line; s1 has none yet
    assert cli.main(["status", "j", "--store", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["progress"]["step"] == 12 and rows[1]["progress"] is None and "progress" not in rows[2]
