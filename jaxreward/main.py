"""Command line: run one experiment config.

    python -m jaxreward.main --config=configs/<file>.py:<variant> --workdir=DIR \
        [--config.optimizer.learning_rate=1e-5 ...]

Dispatch rule: `config.task = "<job>"` runs `run(config, workdir)` of
`experiments/<job>.py` (a dotted task such as `proj.<study>.<driver>` runs
`experiments/proj/<study>/<driver>.py`). There is no table of tasks: a new
job is a new driver file and its config. `experiments/` is looked up in the
current directory, then beside the installed `jaxreward` package (a clone,
or `pip install -e .` of one). Without --config, the quickstart runs.

Before any model loads, the shared config blocks are checked
(`train.defaults.check_common`), then the driver's own `check_config(config)`
if it has one. Re-running with the same --workdir resumes from its latest
checkpoint, under the same config only (see `check_resume_config`).
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT_CONFIG = str(PACKAGE_ROOT / "configs" / "quickstart.py")

config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config: path/to/file.py[:variant].",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics). Default: runs/<task>.")

# Fields a resumed run may change: they do not change what is trained.
RESUMABLE_CHANGES = ("train.stop_after_steps", "train.progress_bar", "train.log_every",
                     "train.eval_every", "train.checkpoint_every", "data.eval_batch_size")


class UnknownTask(ValueError):
    """`config.task` names no driver in `experiments/`."""


def experiments_dir() -> pathlib.Path:
    """`./experiments` if it exists, else the one beside the `jaxreward` package.

    Raises:
      UnknownTask: neither exists (e.g. jaxreward installed without its repo).
    """
    for candidate in (pathlib.Path.cwd() / "experiments", PACKAGE_ROOT / "experiments"):
        if (candidate / "__init__.py").exists():
            return candidate
    raise UnknownTask("no experiments/ folder found in the current directory or beside the "
                      f"jaxreward package ({PACKAGE_ROOT}); clone the repository and run from "
                      "its root, or `pip install -e .` a clone")


def available_tasks(root: pathlib.Path) -> list[str]:
    """Task names of every driver under `root` (dotted for `proj/` studies)."""
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        if rel.name.startswith("_") or any(p.startswith((".", "_")) for p in rel.parts):
            continue
        names.append(".".join(rel.parts))
    return names


def load_driver(task: str):
    """The module of `experiments/<task>.py`.

    Raises:
      UnknownTask: no such driver, or it has no `run`; lists the drivers found.
    """
    root = experiments_dir()
    found = available_tasks(root)
    if not isinstance(task, str) or task not in found:
        raise UnknownTask(f"config.task={task!r} names no driver in {root}; found: "
                          f"{', '.join(found)}")
    if str(root.parent) not in sys.path:
        sys.path.insert(0, str(root.parent))
    module = importlib.import_module(f"experiments.{task}")
    if not callable(getattr(module, "run", None)):
        raise UnknownTask(f"{module.__file__} has no run(config, workdir)")
    return module


def check_config(config) -> object:
    """Shared checks, then the driver's own; returns the driver module.

    Raises:
      ValueError (ConfigError, UnknownTask): one line naming the field.
    """
    from jaxreward.train import defaults
    driver = load_driver(config.get("task"))
    defaults.check_common(config)
    if hasattr(driver, "check_config"):
        driver.check_config(config)
    return driver


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # quiet library INFO logs by default
    config = flags.FLAGS.config
    try:
        driver = check_config(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    workdir = flags.FLAGS.workdir or os.path.join("runs", config.task)
    check_resume_config(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info("config:\n%s", config)
    driver.run(config, workdir)


def run():
    # Multi-host runs (pods) must call jax.distributed.initialize() first;
    # set JAXREWARD_DISTRIBUTED=1 to do so from the launcher's environment.
    if os.environ.get("JAXREWARD_DISTRIBUTED") == "1":
        import jax
        jax.distributed.initialize()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
