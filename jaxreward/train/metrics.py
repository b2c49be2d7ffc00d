"""Metric writers: JSONL + TensorBoard event files in the workdir, and a summary table."""
from __future__ import annotations

import json
import logging
import math
import os
import weakref
from typing import Any, Mapping

import jax
import numpy as np


def save_figure(fig, path: str, dpi: float | str = 120) -> str:
    """Writes a matplotlib figure to `path` (format from its suffix) and
    closes it; returns `path`. On a pod only process 0 writes (every process
    draws the same figure); the image goes to a temporary name first and is
    renamed, so a killed run never leaves half an image.
    """
    import matplotlib.pyplot as plt
    try:
        if jax.process_index() == 0:
            tmp = path + ".tmp"
            fig.savefig(tmp, dpi=dpi, format=os.path.splitext(path)[1].lstrip(".") or "png")
            os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (one host transfer for the whole dict)."""
    host = jax.device_get(dict(metrics))
    return {k: float(np.asarray(v)) for k, v in host.items()}


class MetricWriter:
    """Writes `<workdir>/metrics.jsonl` (one JSON object per write) and
    TensorBoard event files under `<workdir>/tensorboard` (tensorboardX).
    Only process 0 writes. The JSONL line is on disk when `write` returns;
    TensorBoard events are queued (tensorboardX) until `close()` or
    `close_open_writers()`, which a Ctrl-C runs (`main.interrupted`).

    Each (step, prefix) is written once: on a resumed run, pass the restored
    step as `resume_step` and records after it (written after the last
    checkpoint, before a crash) are dropped, since the run writes them again;
    `resume_step=0` (a fresh start) drops every old record (`None` keeps all);
    a write whose (step, prefix) is already in the file is skipped, so
    re-running a finished workdir adds no duplicate rows.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self._active = jax.process_index() == 0
        self._tb = None
        self._seen: set[tuple[int, str]] = set()
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        kept = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    # Step 0 has no checkpoint: a fresh start (resume_step 0) keeps nothing,
                    # e.g. not the step-0 eval of a killed run under another config.
                    if resume_step is None or (resume_step > 0 and record.get("step", 0) <= resume_step):
                        kept.append(record)
                        self._seen.add((record.get("step"), _prefix_of(record)))
        self._jsonl = open(path, "w", encoding="utf-8")
        for record in kept:
            self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            # A NaN metric is a value here (KTO's mean over a side with no example), not
            # a fault: tensorboardX's unnamed "NaN or Inf found" line per scalar says nothing.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        except ImportError:  # TensorBoard files are optional; JSONL is not.
            self._tb = None
        _OPEN.add(self)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self._active or (int(step), prefix) in self._seen:
            return
        self._seen.add((int(step), prefix))
        record = {"step": int(step), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        _OPEN.discard(self)
        if not self._active:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


_OPEN: "weakref.WeakSet[MetricWriter]" = weakref.WeakSet()


def close_open_writers() -> None:
    """Closes every MetricWriter not yet closed, so queued TensorBoard events
    reach the disk. For exits that skip the interpreter's teardown
    (`main.interrupted` ends a Ctrl-C with `os._exit`); never raises."""
    for writer in list(_OPEN):
        try:
            writer.close()
        except Exception:  # an exit path: keep closing the others
            pass


def _prefix_of(record: Mapping[str, Any]) -> str | None:
    """The prefix of a metrics.jsonl record ("train", "eval", ...)."""
    for key in record:
        if "/" in key:
            return key.split("/", 1)[0]
    return None


def format_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None,
                 floatfmt: str = ".4f") -> str:
    """A plain aligned text table (header, rule, rows)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl` (empty if there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curve(workdir: str, key: str, filename: str, ylabel: str,
               band: tuple[str, str] | None = None, reference: float | None = None) -> str | None:
    """Plots `key` of every metrics.jsonl record that has it against step
    (optionally a shaded `band` of two keys, e.g. a 95% interval, and a
    horizontal `reference` line) into `<workdir>/<filename>`; returns the
    path, or None when matplotlib is missing or there are no points."""
    rows = [r for r in read_metrics(workdir) if key in r]
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [r[key] for r in rows], marker="o", label=key)
    if band and all(b in rows[0] for b in band):
        ax.fill_between(steps, [r[band[0]] for r in rows], [r[band[1]] for r in rows],
                        alpha=0.25, label="95% interval")
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, os.path.join(workdir, filename))
