"""Training curves: TensorBoard scalars, throttled progress records, the loss PNG and the sample grid."""
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blockskip_ray.method.curves import TrainingCurves, draw_loss_curve, file_sink, sample_grid


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Parse TensorBoard event files (TFRecord framing + Event protos) without TensorBoard."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_scalars_progress_and_png(tmp_path):
    clock, records = Clock(), []
    c = TrainingCurves(tmp_path / "logs", total_steps=10, sink=records.append, every_s=2.0, clock=clock)
    for step in range(1, 11):
        clock.t += 0.5  # 2 steps/s
        c.log(step, 1.0 / step, lr=1e-3, step_time_s=0.5, memory_bytes=3 * 2**20)
    c.close(tmp_path / "loss_curve.png")
    sc = read_scalars(tmp_path / "logs")
    assert [s for s, _ in sc["train/loss"]] == list(range(1, 11))
    assert sc["train/loss"][3][1] == pytest.approx(0.25) and sc["train/lr"][0][1] == pytest.approx(1e-3)
    assert sc["train/step_time_s"][0][1] == 0.5 and sc["train/memory_mib"][0][1] == 3.0
    # first step, then every 2 s of the fake clock (steps 5 and 9), the last step, and close
    assert [r["step"] for r in records] == [1, 5, 9, 10, 10]
    assert records[1]["eta_s"] == pytest.approx(2.5) and records[-1]["eta_s"] == 0 and records[-1]["loss"] == 0.1
    im = np.asarray(Image.open(tmp_path / "loss_curve.png").convert("RGB"))
    assert im.shape == (400, 640, 3) and (im[:, :, 2] > im[:, :, 0] + 60).sum() > 50  # the blue curves are drawn


def test_file_sink_and_no_log_dir(tmp_path):
    c = TrainingCurves(None, 3, sink=file_sink(tmp_path / "progress.json"))
    c.log(1, 0.5)
    import json
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 1
    assert not list(tmp_path.glob("events*"))


def test_loss_curve_handles_one_step_and_nan(tmp_path):
    draw_loss_curve([1], [0.3], tmp_path / "one.png")
    draw_loss_curve([1, 2, 3], [0.3, float("nan"), 0.1], tmp_path / "nan.png")
    with pytest.raises(ValueError, match="as many steps"):
        draw_loss_curve([1, 2], [0.1], tmp_path / "bad.png")


def test_sample_grid(tmp_path):
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        p = tmp_path / f"s{i}.png"
        Image.new("RGB", (32, 32), colour).save(p)
        paths.append(p)
    g = Image.open(sample_grid(paths, tmp_path / "grid.png")).convert("RGB")
    assert g.size == (3 * 32 + 4 * 4, 32 + 2 * 4)
    assert g.getpixel((4 + 16, 20)) == (255, 0, 0) and g.getpixel((4 + 2 * 36 + 16, 20)) == (0, 0, 255)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from blockskip_ray.method.personalize import progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress_bar(4, "train")
    bar.update(4)
    bar.refresh()
    bar.close()
    assert "train" in term.getvalue() and "4/4" in term.getvalue()
    assert progress_bar(4, "train", enabled=False).disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(4, "train").disable
