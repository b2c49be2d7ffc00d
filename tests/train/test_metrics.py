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
