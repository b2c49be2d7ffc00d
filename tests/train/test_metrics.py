"""train/metrics.py: MetricWriter keeps exactly the records a resumed run does not write again."""
import json
import os

from jaxreward.train import metrics as metrics_lib


def _records(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_resume_keeps_records_up_to_the_checkpoint_and_a_fresh_start_keeps_none(tmp_path):
    w = metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
    w.write(0, {"reward": 1.30}, prefix="eval")   # a step-0 eval, then killed before any checkpoint
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.close()
    # Resumed from the checkpoint at step 2: step 3 is dropped (the run writes it again), and a
    # repeated write of a kept (step, prefix) is skipped.
    w = metrics_lib.MetricWriter(str(tmp_path), resume_step=2)
    w.write(2, {"loss": 99.0})
    w.write(3, {"loss": 3.5})
    w.close()
    assert _records(tmp_path) == [{"step": 0, "eval/reward": 1.30}, {"step": 1, "train/loss": 1.0},
                                  {"step": 2, "train/loss": 2.0}, {"step": 3, "train/loss": 3.5}]
    # A fresh start in the same workdir (no checkpoint, maybe another config) keeps nothing:
    # its step-0 eval is written, not skipped as a duplicate of the old run's.
    w = metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
    w.write(0, {"reward": 0.69}, prefix="eval")
    w.close()
    assert _records(tmp_path) == [{"step": 0, "eval/reward": 0.69}]


def test_save_figure_writes_once_whole_and_only_on_process_0(tmp_path, monkeypatch):
    """Every process of a pod draws the same plot; before, each wrote the same
    PNG path at once (interleaved bytes possible). Now process 0 writes it
    under a temporary name and renames it; the others write nothing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from jaxreward.train import metrics as metrics_lib
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = str(tmp_path / "curve.png")
    assert metrics_lib.save_figure(fig, path) == path
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["curve.png"]
    assert not plt.fignum_exists(fig.number)   # closed
    monkeypatch.setattr(metrics_lib.jax, "process_index", lambda: 1)
    fig, _ = plt.subplots()
    metrics_lib.save_figure(fig, str(tmp_path / "other.png"))
    assert os.listdir(tmp_path) == ["curve.png"] and not plt.fignum_exists(fig.number)


def _event_scalars(logdir):
    """(tag, step, value) of every scalar in the TensorBoard event files under logdir.
    An event file is TFRecord: u64 length, u32 crc, Event proto, u32 crc per record."""
    import struct
    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_a_ctrl_c_exit_keeps_every_record_tensorboard_included(tmp_path):
    # main.interrupted ends a Ctrl-C with os._exit(130): no close(), no atexit. Before the fix the
    # TensorBoard events waited in tensorboardX's queue (flushed every 120 s) and were lost.
    import subprocess
    import sys
    script = ("from jaxreward.train import metrics as m; from jaxreward import main\n"
              f"w = m.MetricWriter({str(tmp_path)!r}, resume_step=0)\n"
              "w.write(1, {'loss': 0.5}); w.write(2, {'loss': 0.25}, prefix='eval')\n"
              f"main.interrupted({str(tmp_path)!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")
    assert _records(tmp_path) == [{"step": 1, "train/loss": 0.5}, {"step": 2, "eval/loss": 0.25}]
    assert sorted(_event_scalars(tmp_path / "tensorboard")) == [("eval/loss", 2, 0.25), ("train/loss", 1, 0.5)]


def test_nan_metrics_do_not_spam_tensorboardx_warnings(tmp_path, caplog):
    # The README: "A side with no example in a batch (all desirable, say) reads NaN, not 0."
    # Each such NaN also printed tensorboardX's unnamed warning on stderr:
    #   W1205 21:30:37.839110 ... x2num.py:13] NaN or Inf found in input tensor.
    # 4 lines per logged step and eval (20 for a 4-step run on an all-desirable file),
    # none saying which metric; the NaN is the documented value, not a problem.
    import logging
    writer = metrics_lib.MetricWriter(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        writer.write(1, {"loss": 0.5, "rewards/rejected": float("nan"), "logps/rejected": float("nan")},
                     prefix="train")
        writer.close()
    assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()], caplog.text
