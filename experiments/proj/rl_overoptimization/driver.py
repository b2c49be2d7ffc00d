"""Study driver: several RL runs against one proxy reward model, on one plot.

Reads top to bottom: run each configured job (a subprocess of
`jaxreward.main`, so each is an ordinary, resumable run with its own
workdir), read the eval points each wrote to `rl.json` (gold and proxy
reward, KL(π‖π_ref) of held-out samples over training) and the best-of-N
curve of the same proxy, print one table, draw one PNG.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections

from jaxreward.errors import UserError
from jaxreward.train import defaults
from jaxreward.train import metrics as metrics_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RUN_RECORD = "study_run.json"  # the arguments a sub-run's summary was made with


def check_config(config: ml_collections.ConfigDict) -> None:
    """Each run has its own name (its sub-workdir and its row) and an existing config file."""
    names = [run[0] for run in config.study.runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise defaults.ConfigError(f"config field study.runs names {', '.join(twice)} more than once; each run "
                                   "needs its own name (it is the run's sub-workdir and table row)")
    for name, config_file, _, _ in config.study.runs:
        if not os.path.isfile(os.path.join(ROOT, config_file)):
            raise defaults.ConfigError(f"config field study.runs: run {name!r} names {config_file}, which is "
                                       f"not a file under {ROOT}")


def run_one(name: str, config_file: str, variant: str, overrides, workdir: str, seed: int = 0) -> dict:
    """Runs (or reuses) one job and returns its summary (`rl.json`, or `ppo.json`).

    The study's `seed` is passed on (an override of `seed` wins). A summary is
    reused only when it was made by the same arguments (`<workdir>/<name>/study_run.json`);
    otherwise the job runs again in its workdir, which resumes it, extends it
    (more steps) or refuses a changed config in one line.
    """
    out = os.path.join(workdir, name)
    summary = os.path.join(out, "ppo.json" if "ppo" in os.path.basename(config_file) else "rl.json")
    if not any(k == "seed" for k, _ in overrides):
        overrides = (("seed", seed),) + tuple(overrides)
    args = [f"--config={os.path.join(ROOT, config_file)}:{variant}", f"--workdir={out}"] + [
        f"--config.{k}={v}" for k, v in overrides]
    record = os.path.join(out, RUN_RECORD)
    try:
        with open(record, encoding="utf-8") as f:
            reusable = os.path.exists(summary) and json.load(f) == args
    except (OSError, ValueError):
        reusable = False
    if not reusable:
        print(f"\n=== {name}: {' '.join(args)}", flush=True)
        done = subprocess.run([sys.executable, "-m", "jaxreward.main"] + args, cwd=ROOT)
        if done.returncode:
            raise UserError(f"study run {name!r} failed with exit status {done.returncode} (its own "
                            f"error is printed above): {' '.join(args)}")
        with open(record, "w", encoding="utf-8") as f:
            json.dump(args, f)
    with open(summary, encoding="utf-8") as f:
        return json.load(f)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    results = {name: run_one(name, cfg, variant, overrides, workdir, seed=config.seed)
               for name, cfg, variant, overrides in config.study.runs}
    rows = []
    for name, res in results.items():
        pts = res["points"]
        best = max(pts, key=lambda p: p["reward/gold"])
        last = pts[-1]
        rows.append({"run": name, "gold start": pts[0]["reward/gold"],
                     "gold peak": best["reward/gold"], "√KL at peak": best["sqrt_kl"],
                     "gold end": last["reward/gold"], "proxy end": last["reward"], "√KL end": last["sqrt_kl"]})
    print("\ngold and proxy reward of held-out samples (KL in nats per response)")
    print(metrics_lib.format_table(rows))
    curve = next(iter(results.values()))["best_of_n"]
    if curve:
        print("\nbest-of-N of the reference, ranked by the same proxy")
        print(metrics_lib.format_table(curve, ["N", "sqrt_kl", "reward", "reward/gold"]))
    if config.study.plot:
        path = os.path.join(workdir, "rl_overoptimization.png")
        plot(path, results, curve)
        print(f"plot: {path}")
    with open(os.path.join(workdir, "study.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "best_of_n": curve}, f, indent=2)
    return {"rows": rows, "results": results}


def plot(path: str, results: dict, curve: list[dict]) -> None:
    """Gold (solid) and proxy (dashed) reward against √KL, one color per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, res) in enumerate(results.items()):
        x = [p["sqrt_kl"] for p in res["points"]]
        ax_g.plot(x, [p["reward/gold"] for p in res["points"]], "o-", color=f"C{i}", label=name, ms=3)
        ax_p.plot(x, [p["reward"] for p in res["points"]], "o-", color=f"C{i}", label=name, ms=3)
    if curve:
        x = [c["sqrt_kl"] for c in curve]
        ax_g.plot(x, [c["reward/gold"] for c in curve], "k--", marker="s", ms=3, label="best-of-N")
        ax_p.plot(x, [c["reward"] for c in curve], "k--", marker="s", ms=3, label="best-of-N")
    for ax, what in ((ax_g, "gold reward"), (ax_p, "proxy reward")):
        ax.set_xlabel("√KL(π‖π_ref) (k3, nats^½; best-of-N: √ of its bound)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax_g.legend(fontsize=7)
    ax_g.set_title("gold reward of held-out samples")
    ax_p.set_title("proxy reward (what RL optimizes)")
    fig.tight_layout()
    metrics_lib.save_figure(fig, path)

