"""train/metrics.py: MetricWriter keeps exactly the records a resumed run does not write again."""
import json

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
