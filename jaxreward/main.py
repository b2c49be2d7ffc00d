"""Command line: run one experiment config.

    python -m jaxreward.main --config=configs/<file>.py:<variant> --workdir=DIR \
        [--config.optimizer.learning_rate=1e-5 ...]

`config.task` picks the experiment in `jaxreward/tasks/`. Without --config,
the quickstart (configs/quickstart.py) runs. Re-running with the same
--workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import importlib
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
    workdir = flags.FLAGS.workdir or os.path.join("runs", config.task)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info("config:\n%s", config)
    importlib.import_module(TASKS[config.task]).run(config, workdir)


def run():
    # Multi-host runs (pods) must call jax.distributed.initialize() first;
    # set JAXREWARD_DISTRIBUTED=1 to do so from the launcher's environment.
    if os.environ.get("JAXREWARD_DISTRIBUTED") == "1":
        import jax
        jax.distributed.initialize()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
