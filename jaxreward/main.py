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

Bad input ends the run with one line `error: <what and where>` on stderr and
exit status 2, not a traceback: a flag or config field that does not exist
(with ml_collections' suggestion), a value that does not parse, a config
file or variant that does not exist, an impossible value, and any
`jaxreward.errors.USER_ERRORS` raised by a driver's run (bad data lines,
chat templates, damaged checkpoints, missing paths). Set
`JAXREWARD_TRACEBACK=1` to get the traceback instead.
"""
from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    """SIGINT handler until the driver starts (`_start_interrupts`): nothing
    has been trained yet, so a Ctrl-C ends the process at once, in one line.
    Raising KeyboardInterrupt there instead printed tracebacks: inside a C
    extension's initialization it became an ImportError, inside jax's gc
    callback it was swallowed ("Exception ignored in ...") and the run went
    on to the end with exit status 0."""
    del signum, frame
    os.write(2, b"error: interrupted (Ctrl-C) before the run started\n")
    os._exit(130)


def _catch_interrupts_while_starting():
    """Installs `_interrupted_while_starting`, unless SIGINT was set to
    something other than Python's default (e.g. ignored, as in a shell's
    background job: it stays ignored)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


if __name__ == "__main__":  # python -m jaxreward.main: before the libraries below load (seconds)
    _catch_interrupts_while_starting()

import _thread  # noqa: E402 - after the handler above
import importlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxreward import errors, hostmem  # noqa: E402

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT_CONFIG = str(PACKAGE_ROOT / "configs" / "quickstart.py")

config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config: path/to/file.py[:variant].",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics). Default: runs/<task>.")

# Fields a resumed run may change: they do not change what is trained.
# model.prefix_sharing changes how a forward is laid out, not what it computes
# (up to float rounding), so a run may switch it when it resumes.
# A refused resume lists at most this many changed fields (then "... and N more").
MAX_LISTED_CHANGES = 12
RESUMABLE_CHANGES = ("train.stop_after_steps", "train.progress_bar", "train.log_every",
                     "train.eval_every", "train.checkpoint_every", "data.eval_batch_size",
                     "model.prefix_sharing")


class UnknownTask(errors.UserError):
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
      UserError (ConfigError, UnknownTask): one line naming the field.
    """
    from jaxreward.train import defaults
    driver = load_driver(config.get("task"))
    defaults.check_common(config, skip=getattr(driver, "STRICT_FIELDS", ()))
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


def check_resume_config(config, workdir: str, resumable: tuple[str, ...] = (),
                        added: dict | None = None) -> None:
    """A workdir holding checkpoints resumes only under the config that wrote
    them (up to `RESUMABLE_CHANGES`, and the fields or sections a driver
    lists in its own `RESUMABLE_CHANGES`, passed as `resumable`: e.g. the
    VAS job's decode-time settings); else a ConfigError lists the changes.

    A field the stored config lacks (it was added to the job later) is no
    change when it is None (unset) or at the value that keeps the old
    behaviour, given by the driver's `ADDED_FIELDS` (`added`: field ->
    value, e.g. `{"reference.sync_every": 0}`).

    One more change is allowed: a larger `train.num_steps` extends the run.
    Then `train.schedule_steps` is set to the stored schedule length, so the
    learning-rate schedule of the steps already taken is unchanged and the
    added steps run at its final value (see `train.loop.schedule_steps`).
    """
    stored_path = os.path.join(workdir, "config.json")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
        return
    from jaxreward.train import defaults
    if not os.path.isfile(stored_path):  # without it a changed config would resume unnoticed
        raise defaults.ConfigError(
            f"--workdir={workdir} holds checkpoints but no config.json, so the config that wrote them "
            "is unknown; put its config.json back, or use a new --workdir")
    try:
        with open(stored_path, encoding="utf-8") as f:
            stored = _flat(json.load(f))
    except (ValueError, AttributeError) as e:  # bad JSON / UTF-8, or not an object
        raise errors.CorruptFileError(f"{stored_path} is damaged ({type(e).__name__}: {e}); it records "
                                      "the config of the checkpoints beside it: put it back, or use a "
                                      "new --workdir") from None
    current = _flat(json.loads(config.to_json_best_effort()))
    if stored.get("task") != current.get("task"):
        # Another job's config, or JSON that is no config at all: one line, not
        # a listing of every field.
        what = (f"task {stored['task']!r}" if isinstance(stored.get("task"), str)
                else "no task field, so it is not a jaxreward config")
        raise defaults.ConfigError(
            f"--workdir={workdir} holds checkpoints whose {stored_path} names {what}, not "
            f"{current.get('task')!r}; use a new --workdir")
    old_steps, new_steps = stored.get("train.num_steps"), current.get("train.num_steps")
    old_schedule = stored.get("train.schedule_steps")
    extending = isinstance(old_steps, int) and isinstance(new_steps, int) and new_steps > old_steps
    # A run extended before keeps its schedule when it is re-run (resumed) as
    # it was written: the stored schedule_steps then carries over unasked.
    carried = (not extending and new_steps == old_steps and old_schedule
               and not current.get("train.schedule_steps"))
    if extending or carried:
        config.train.schedule_steps = old_schedule or old_steps
        current = _flat(json.loads(config.to_json_best_effort()))
        for key in ("train.num_steps", "train.schedule_steps"):
            stored[key] = current[key]
    changed = [f"{k}: {stored.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
               for k in sorted(set(stored) | set(current))
               if stored.get(k) != current.get(k) and k not in RESUMABLE_CHANGES
               and not any(k == p or k.startswith(p + ".") for p in resumable)
               and not (k not in stored and (current[k] is None or k in (added or {})
                                             and current[k] == added[k]))]
    if changed:
        shown = changed[:MAX_LISTED_CHANGES]
        if len(changed) > len(shown):
            shown.append(f"... and {len(changed) - len(shown)} more")
        raise defaults.ConfigError(
            f"--workdir={workdir} holds checkpoints of a different config; changed fields:\n  "
            + "\n  ".join(shown) + "\nUse a new --workdir (or restore those values) to resume.")
    if extending:
        print(f"extending the run from {old_steps} to {new_steps} steps; the learning-rate "
              f"schedule keeps its {config.train.schedule_steps} steps and the added steps run "
              "at its final value")


def lock_workdir(workdir: str):
    """Holds an exclusive lock on `workdir` for this process's lifetime (an
    `flock` on the folder itself: no lock file, released by the kernel when
    the process ends, even by SIGKILL), so two runs cannot interleave their
    checkpoints and metrics. Skipped for multi-host runs
    (`JAXREWARD_DISTRIBUTED=1`), whose processes share the workdir.

    Raises:
      errors.UserError: another process holds it.
    """
    if os.environ.get("JAXREWARD_DISTRIBUTED") == "1":
        return None
    import fcntl
    fd = os.open(workdir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise errors.UserError(f"--workdir={workdir} is in use by another run; wait for it to finish, "
                               "or use another --workdir") from None
    return fd


def fail(message: str, error: BaseException | None = None):
    """Ends the run: `error: <message>` on stderr, exit status 2; with
    `JAXREWARD_TRACEBACK=1`, re-raises `error` (the traceback) instead."""
    if error is not None and os.environ.get("JAXREWARD_TRACEBACK") == "1":
        raise error
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def check_same_config(config) -> None:
    """A pod's processes must run one config: each gathers every process's
    config (as JSON) and refuses a run where any differs from process 0's,
    naming the fields (else the processes train on each other's shards of
    different data and config.json records only process 0's values).

    Raises:
      errors.UserError: the configs differ (raised on every process).
    """
    import numpy as np
    from jaxreward import parallel
    text = config.to_json_best_effort(sort_keys=True).encode()
    sizes = parallel.gather_processes(np.array([len(text)], np.int64))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:len(text)] = np.frombuffer(text, np.uint8)
    texts = [bytes(row[:int(n)]).decode() for row, n in
             zip(parallel.gather_processes(buf), sizes.reshape(-1))]
    if all(t == texts[0] for t in texts):
        return

    def flat(x, prefix=""):
        if isinstance(x, dict):
            return {k: v for key, val in x.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: x}
    first = flat(json.loads(texts[0]))
    diffs = []
    for p, t in enumerate(texts[1:], 1):
        other = flat(json.loads(t))
        diffs += [f"{k}: process 0 {first.get(k)!r}, process {p} {other.get(k)!r}"
                  for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)]
    raise errors.UserError("the processes were launched with different configs (give every process the same "
                           "--config flags): " + "; ".join(diffs[:10]))


def interrupted(workdir: str, error: BaseException | None = None):
    """Ends a run stopped by Ctrl-C: one line on stderr, exit status 130 (the
    shell's for SIGINT); with `JAXREWARD_TRACEBACK=1`, re-raises `error`."""
    if error is not None and os.environ.get("JAXREWARD_TRACEBACK") == "1":
        raise error
    sys.stderr.write(f"error: interrupted (Ctrl-C); re-run the same command to resume --workdir={workdir} "
                     "from its last checkpoint\n")
    # Leave without the interpreter's teardown: a Ctrl-C during an XLA compile left
    # its threads running, and finalizing the runtime under them segfaulted (exit 139
    # after this line). Checkpoint saves are already finished (`_finish_checkpoints`);
    # TensorBoard's queued events are written here (os._exit runs no close()).
    from jaxreward.train import metrics as metrics_lib
    metrics_lib.close_open_writers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _unknown_field_message(error: BaseException, argv: list[str]) -> str | None:
    """For ml_collections' AttributeError/KeyError on `--config.a.b=...` with a
    field that does not exist: "unknown config field a.b (did you mean a.c?)
    in --config.a.b=..."; None when no `--config.` argument names that key
    (then it is not an override typo but, e.g., a bug in `get_config`)."""
    while isinstance(error, (AttributeError, KeyError)) and len(error.args) == 1 \
            and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    key = re.match(r"\s*'([^']*)'", text)
    if key is None:
        return None
    key = key.group(1)
    guess = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv[1:]:
        m = re.match(r"--?config\.([^=]+)(=.*)?$", arg)
        if m and key in m.group(1).split("."):
            path = m.group(1).split(".")
            at = path.index(key)
            hint = f" (did you mean {'.'.join(path[:at] + [guess.group(1)])}?)" if guess else ""
            return f"unknown config field {'.'.join(path[:at + 1])}{hint} in {arg}"
    return None


def _root(error: BaseException) -> BaseException:
    """The first exception of a chain (`__cause__`, else `__context__`),
    stopping at an error raised `from None` (`__suppress_context__`): that
    one is the error the code chose to report, not the one it replaced
    (e.g. a get_config that turns a KeyError into a message naming the variants)."""
    seen = {id(error)}
    while ((nxt := error.__cause__ or (None if error.__suppress_context__ else error.__context__)) is not None
           and id(nxt) not in seen):
        seen.add(id(nxt))
        error = nxt
    return error


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with bad flags and config overrides as one line.

    ml_collections raises a bare AttributeError/KeyError for an unknown
    `--config.<field>` (a traceback of ~60 lines) and wraps errors of
    `get_config` (e.g. an unknown variant) with their traceback as text;
    here each becomes `error: ...` (exit status 2), as does a config file
    that does not load.
    """
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        traced = "Traceback (most recent call last)" in str(e)
        fail(errors.message(_root(e) if traced else e), e)
    except (AttributeError, KeyError) as e:
        text = _unknown_field_message(e, argv)
        if text is None:
            raise
        fail(text, e)
    try:
        flags.FLAGS.config.get("task")
    except OSError as e:  # ml_collections defers "cannot load the config file" to first use
        detail = errors.message(_root(e)).split("; ")[-1]
        fail(f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: cannot load "
             f"the config file ({detail})", e)
    return rest


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --config=FILE[:variant], "
             "--workdir=DIR, --config.<field>=VALUE)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # quiet library INFO logs by default
    if os.environ.get("JAXREWARD_TRACEBACK") != "1":
        logging.get_absl_logger().addFilter(_drop_interrupt_tracebacks)
    config = flags.FLAGS.config
    try:
        driver = check_config(config)
        workdir = flags.FLAGS.workdir or os.path.join("runs", config.task)
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:  # a file in the way, no permission, ...
            raise errors.UserError(f"--workdir={workdir}: cannot create the folder "
                                   f"({type(e).__name__}: {e.strerror or e})") from None
        # The lock first: a run in progress owns the workdir, its checkpoints and config.
        _lock = lock_workdir(workdir)  # noqa: F841 - held until the process ends
        check_resume_config(config, workdir, getattr(driver, "RESUMABLE_CHANGES", ()),
                            getattr(driver, "ADDED_FIELDS", {}))
    except (ValueError, *errors.USER_ERRORS) as e:  # a check_config raises ValueError naming the field
        fail(errors.message(e), e)
    import jax
    if jax.process_count() > 1:
        try:
            check_same_config(config)
        except errors.UserError as e:
            fail(errors.message(e), e)
    if jax.process_index() == 0:  # a pod's processes share the workdir: one writer
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:  # atomic: a kill never leaves half a file
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)
    logging.info("config:\n%s", config)
    try:
        _start_interrupts()
        driver.run(config, workdir)
        from jaxreward import parallel
        parallel.finish_processes()  # a pod: no process leaves with a collective in flight
    except errors.USER_ERRORS as e:
        _finish_checkpoints()
        fail(errors.message(e), e)
    except KeyboardInterrupt as e:  # Ctrl-C: the saves already made stay, and the run resumes
        _finish_checkpoints(after_ctrl_c=True)
        interrupted(workdir, e)
    except BaseException:
        _finish_checkpoints()
        raise


def _drop_interrupt_tracebacks(record) -> bool:
    """absl logging filter: drops a library's log of a Ctrl-C (orbax logs the
    KeyboardInterrupt that lands while it waits for a save, traceback and
    all, before re-raising it); `interrupted` then says it in one line."""
    info = record.exc_info
    if info and info[0] is not None and issubclass(info[0], KeyboardInterrupt):
        return False
    args = record.args if isinstance(record.args, tuple) else ()
    # orbax's "... raised: %s" with the interrupt as its only argument; a record whose
    # text merely mentions one (a real error's chained traceback) is kept.
    return not (len(args) == 1 and isinstance(args[0], KeyboardInterrupt))


def _start_interrupts():
    """From here on a Ctrl-C raises KeyboardInterrupt, which `main` turns into
    a resumable stop (saves finished, one line, exit 130), and one that a
    library swallows is raised again (`_redeliver_swallowed_interrupts`)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not getattr(sys.unraisablehook, "redelivers_interrupts", False):
        sys.unraisablehook = _redeliver_swallowed_interrupts(sys.unraisablehook)


def _redeliver_swallowed_interrupts(previous):
    """A `sys.unraisablehook` that raises a swallowed Ctrl-C again.

    Python cannot propagate an exception out of a gc callback, a `__del__`
    or a weakref callback: it prints "Exception ignored in ..." and goes on.
    A Ctrl-C that lands while one runs (jax registers a gc callback, so this
    happens at any time) was lost that way: the run went on. This hook
    re-sends SIGINT to the main thread (`_thread.interrupt_main`) from a
    timer thread 10 ms later, once the callback has returned (sent from the
    hook itself, it would be raised inside the hook and swallowed again);
    every other unraisable error goes to `previous`.
    """
    import threading

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            timer = threading.Timer(0.01, _thread.interrupt_main)
            timer.daemon = True
            timer.start()
            return
        previous(unraisable)
    hook.redelivers_interrupts = True
    return hook


def _finish_checkpoints(after_ctrl_c: bool = False):
    """A run that ends by an error or a Ctrl-C still completes its in-flight
    checkpoint save. Meanwhile a (further) Ctrl-C stops at once
    (`_interrupted_while_finishing`); after a first Ctrl-C that is said
    when a save is in flight, since finishing one can take seconds."""
    from jaxreward.train import checkpoint as ckpt_lib
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupted_while_finishing)
    if after_ctrl_c and ckpt_lib.saving_in_progress():
        print("finishing the checkpoint save in flight before stopping (Ctrl-C again stops at once, "
              "without it)", file=sys.stderr, flush=True)
    ckpt_lib.close_open()


def _interrupted_while_finishing(signum, frame):
    """SIGINT handler while `_finish_checkpoints` waits: one line, exit 130.
    The cut-off save leaves a `<step>.orbax-checkpoint-tmp` folder, which a
    resume ignores: it restores the last complete step."""
    del signum, frame
    # Reached after a first Ctrl-C, or as the first one while an error's path finishes the save.
    os.write(2, b"error: interrupted (Ctrl-C) while the checkpoint save in flight was finishing: stopped "
                b"without it; re-run the same command to resume from the last complete checkpoint\n")
    try:
        from jaxreward.train import metrics as metrics_lib
        metrics_lib.close_open_writers()
    finally:
        os._exit(130)


def run():
    _catch_interrupts_while_starting()  # already done under python -m; not when called as a function
    # JAXREWARD_MALLOC=heap: glibc malloc settings that stop XLA on CPU
    # re-faulting its temp buffers every step (hostmem); before any JAX work.
    if hostmem.from_environment():
        print(f"jaxreward: host allocator: {hostmem.describe()}", file=sys.stderr)
    # Multi-host runs (pods) must call jax.distributed.initialize() first;
    # set JAXREWARD_DISTRIBUTED=1 to do so (distributed_initialize).
    if os.environ.get("JAXREWARD_DISTRIBUTED") == "1":
        try:
            distributed_initialize()
        except errors.UserError as e:
            fail(errors.message(e), e)
    app.run(main, flags_parser=parse_flags)


def distributed_initialize() -> None:
    """`jax.distributed.initialize()` for a multi-process run.

    On a cluster jax finds the coordinator, the process count and this
    process's index itself (Cloud TPU, SLURM, Open MPI, Kubernetes). Anywhere
    else, set them: `JAX_COORDINATOR_ADDRESS=host:port` (jax's own variable),
    `JAXREWARD_NUM_PROCESSES` and `JAXREWARD_PROCESS_ID`. On CPU the
    processes exchange data through gloo collectives, which is how the tests
    run two processes on one machine as a stand-in for a pod.

    Raises:
      errors.UserError: one of the two counts is set without the other, or is
        not an integer.
    """
    import jax
    env = {k: os.environ.get(k) for k in ("JAXREWARD_NUM_PROCESSES", "JAXREWARD_PROCESS_ID")}
    given = {k: v for k, v in env.items() if v is not None}
    if len(given) == 1:
        missing = next(k for k in env if k not in given)
        raise errors.UserError(f"{next(iter(given))} is set without {missing}; set both, or neither "
                               "to let jax detect the cluster")
    try:
        counts = {k: int(v) for k, v in given.items()}
    except ValueError:
        raise errors.UserError(f"JAXREWARD_NUM_PROCESSES / JAXREWARD_PROCESS_ID must be integers, got "
                               f"{given}") from None
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if counts:  # jax waits up to 300 s for every process, then aborts blaming "another task"
        print(f"jaxreward: process {counts['JAXREWARD_PROCESS_ID']} waiting for "
              f"{counts['JAXREWARD_NUM_PROCESSES']} processes at {os.environ.get('JAX_COORDINATOR_ADDRESS')} "
              "(up to 300 s; a process that never starts ends the others with a DEADLINE_EXCEEDED abort)",
              file=sys.stderr, flush=True)
    jax.distributed.initialize(num_processes=counts.get("JAXREWARD_NUM_PROCESSES"),
                               process_id=counts.get("JAXREWARD_PROCESS_ID"))


if __name__ == "__main__":
    sys.exit(run())
