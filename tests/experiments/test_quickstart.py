"""The quickstart's ensemble variant as a user runs it: `ensemble_tiny`
through the CLI, stopped at step 10 and re-run (resume), then the ensemble
export, the per-ranking best-of-N table and the plot."""
import json
import os

import numpy as np

from tests.experiments.test_cli import _cli


def test_ensemble_tiny_trains_resumes_exports_and_ranks(tmp_path):
    wd = tmp_path / "qs"
    args = ("--config=configs/quickstart.py:ensemble_tiny", f"--workdir={wd}",
            "--config.train.progress_bar=False")
    first = _cli(*args, "--config.train.stop_after_steps=10")
    assert "stopped at step 10 of 20 (train.stop_after_steps)" in first.stdout
    assert sorted(os.listdir(wd / "ensemble" / "checkpoints")) == ["10"]
    assert not (wd / "best_of_n.json").exists() and not (wd / "reward_ensemble").exists()
    # Every member's batch position is in the checkpoint: 10 batches of 32 from 256 pairs
    # (8 per epoch) -> epoch 1, batch 2, for each of the 3 members.
    data = json.loads((wd / "ensemble" / "checkpoints" / "10" / "data" / "metadata").read_text())
    assert data == {"members": [{"epoch": 1, "index": 2}] * 3}

    second = _cli(*args)
    assert second.stdout.count("Resuming from checkpoint at step 10") == 2  # the proxy and the ensemble
    summary = json.loads((wd / "best_of_n.json").read_text())
    ens = summary["ensemble"]
    assert ens["members"] == 3 and ens["std_coef"] == 1.0
    rows = ens["gold_by_ranker"]
    assert [r["N"] for r in rows] == [1, 2, 4, 8]
    np.testing.assert_allclose([r["kl_bound"] for r in rows], [0.0, 0.19315, 0.63629, 1.20444], atol=1e-5)
    # N = 1: every ranking keeps the first sample.
    first_row = rows[0]
    assert len({round(first_row[k], 6) for k in first_row if k not in ("N", "kl_bound")}) == 1
    # The single-proxy column is the quickstart's own curve.
    assert [r["proxy"] for r in rows] == [r["gold_reward"] for r in summary["best_of_n"]]
    for name, curve in ens["curves"].items():
        score = [r["proxy_reward"] for r in curve]  # the ranking's own reward of its pick
        assert all(b >= a - 1e-6 for a, b in zip(score, score[1:])), name  # nested subsets
        assert all(r["oracle_gold"] >= r["gold_reward"] - 1e-6 for r in curve), name
    assert ens["member0_vs_proxy_corr"] > 0.999  # member 0 is seeded like the proxy
    assert 0.5 <= ens["eval"]["accuracy_mean"] <= 1.0 and ens["eval"]["num_pairs"] == 64
    assert "N  kl_bound    proxy  member_avg  ens_mean  ens_mean-1std  ens_min   oracle" in second.stdout

    # The ensemble's own metrics: train rows once per logged step across the restart, then the eval.
    lines = [json.loads(l) for l in open(wd / "ensemble" / "metrics.jsonl")]
    assert [l["step"] for l in lines if "train/loss" in l] == [5, 10, 15, 20]
    assert {"train/loss_e0", "train/loss_e2", "train/accuracy_e1"} <= set(lines[0])
    assert {"eval/accuracy_e0", "eval/accuracy_mean_minus_std", "eval/accuracy_min"} <= set(lines[-1])

    # The export is one folder of member exports that best-of-N loads as one reward function.
    meta = json.loads((wd / "reward_ensemble" / "ensemble.json").read_text())
    assert meta["members"] == 3 and meta["head_seeds"] == [1, 2, 3] and meta["data_seeds"] == [0, 1, 2]
    assert all((wd / "reward_ensemble" / f"member_{e}" / "reward_model.json").exists() for e in range(3))
    if ens["plot"] is not None:
        assert os.path.getsize(ens["plot"]) > 10_000
