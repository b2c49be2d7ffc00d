"""Command line: run one experiment config.

    python -m jaxreward.main --config=configs/<file>.py:<variant> --workdir=DIR \
        [--config.optimizer.learning_rate=1e-5 ...]

`config.task` picks the experiment in `jaxreward/tasks/`. Without --config,
the quickstart (configs/quickstart.py) runs. Re-running with the same
--workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "quickstart.py")

config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config: path/to/file.py[:variant].",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics). Default: runs/<task>.")

TASKS = {
    "quickstart": "jaxreward.tasks.quickstart",
    "reward_model": "jaxreward.tasks.reward_model",
    "best_of_n": "jaxreward.tasks.best_of_n",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # quiet library INFO logs by default
    config = flags.FLAGS.config
    if config.get("task") not in TASKS:
        raise app.UsageError(f"config.task={config.get('task')!r}; known tasks: {sorted(TASKS)}")
    try:
        validate_config(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    workdir = flags.FLAGS.workdir or os.path.join("runs", config.task)
    check_resume_config(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info("config:\n%s", config)
    importlib.import_module(TASKS[config.task]).run(config, workdir)


# Config fields that must be integers >= 1 / >= 0 wherever a config has them.
AT_LEAST_ONE = ("data.batch_size", "data.eval_batch_size", "train.num_steps", "train.log_every",
                "train.checkpoint_every", "train.micro_batches", "prompt_batch_size", "n",
                "best_of_n.num_prompts", "best_of_n.max_n", "synthetic.num_train_pairs",
                "synthetic.num_eval_pairs", "synthetic.prompt_length",
                "synthetic.response_length", "reward.num_objectives")
AT_LEAST_ZERO = ("train.eval_every", "train.stop_after_steps", "data.num_eval_pairs",
                 "data.max_train_pairs", "data.max_eval_pairs", "data.max_prompt_length",
                 "sampling.max_new_tokens", "sampling.top_k", "objective")
# Fields a resumed run may change: they do not change what is trained.
RESUMABLE_CHANGES = ("train.stop_after_steps", "train.progress_bar", "train.log_every",
                     "train.eval_every", "train.checkpoint_every", "data.eval_batch_size")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate_config(config) -> None:
    """Raises ValueError naming the first config field with an impossible value."""
    flat = _flat(config.to_dict())
    for names, low in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        for name in names:
            if name in flat:
                v = flat[name]
                if not isinstance(v, int) or isinstance(v, bool) or v < low:
                    raise ValueError(f"config field {name} must be an integer >= {low}, got {v!r}")
    if "data.max_length" in flat and flat["data.max_length"] < 2:
        raise ValueError(f"config field data.max_length must be >= 2, got {flat['data.max_length']}")
    if "train.micro_batches" in flat and "data.batch_size" in flat:
        if flat["data.batch_size"] % flat["train.micro_batches"]:
            raise ValueError(f"config field data.batch_size={flat['data.batch_size']} does not "
                             f"split into train.micro_batches={flat['train.micro_batches']}")


def check_resume_config(config, workdir: str) -> None:
    """A workdir holding checkpoints resumes only under the config that wrote
    them (up to `RESUMABLE_CHANGES`); else a UsageError lists the changes."""
    stored_path = os.path.join(workdir, "config.json")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not (os.path.exists(stored_path) and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
        return
    with open(stored_path, encoding="utf-8") as f:
        stored = _flat(json.load(f))
    current = _flat(json.loads(config.to_json_best_effort()))
    changed = [f"{k}: {stored.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
               for k in sorted(set(stored) | set(current))
               if stored.get(k) != current.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise app.UsageError(
            f"--workdir={workdir} holds checkpoints of a different config; changed fields:\n  "
            + "\n  ".join(changed) + "\nUse a new --workdir (or restore those values) to resume.")


def run():
    # Multi-host runs (pods) must call jax.distributed.initialize() first;
    # set JAXREWARD_DISTRIBUTED=1 to do so from the launcher's environment.
    if os.environ.get("JAXREWARD_DISTRIBUTED") == "1":
        import jax
        jax.distributed.initialize()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
