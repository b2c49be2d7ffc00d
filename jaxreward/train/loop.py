"""Small helpers every training driver shares, so resume, logging and eval
timing behave the same in all of them (experiments/*.py)."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax

from jaxreward.train import checkpoint as ckpt_lib


def due(step: int, every: int, total: int) -> bool:
    """True when something that runs every `every` steps runs after `step`.

    `step` counts finished optimizer steps (1-based). It is due at multiples
    of `every` and always at the last step `total`; `every = 0` means only at
    `total`. Example: every=4, total=10 -> due at 4, 8, 10.
    """
    return step == total or (every > 0 and step % every == 0)


def stop_step(train_config) -> int:
    """Where this invocation stops: `train.num_steps`, or earlier at
    `train.stop_after_steps` (a simulated preemption; 0 = off)."""
    stop = train_config.num_steps
    if train_config.stop_after_steps:
        stop = min(stop, train_config.stop_after_steps)
    return stop


def schedule_steps(train_config) -> int:
    """Length of the learning-rate schedule: `train.schedule_steps`, or
    `train.num_steps` when that is 0.

    Extension rule: when a finished or preempted run is resumed with a
    larger `train.num_steps`, main sets `train.schedule_steps` to the
    original `num_steps`, so the steps already taken keep their schedule
    and the added steps run at the schedule's final value
    (`learning_rate × final_lr_ratio`).
    """
    return train_config.get("schedule_steps", 0) or train_config.num_steps


def restore_or_init(checkpointer: ckpt_lib.Checkpointer, make_state: Callable[..., Any],
                    init_args: tuple, shardings: Any, data_iter: Any = None) -> tuple[Any, bool]:
    """The latest checkpoint of `checkpointer` if there is one, else a new state.

    Args:
      checkpointer: the run's `Checkpointer` (`<workdir>/checkpoints`).
      make_state: jitted `(*init_args) -> TrainState` (with out_shardings).
      init_args: its arguments (e.g. the initial params).
      shardings: the `TrainState` shardings to restore onto.
      data_iter: an object with `restore(state_dict)` (a batcher/loader), or
        None; its position is restored from the checkpoint.

    Returns:
      `(state, resumed)`. Prints where it resumed from.
    """
    if checkpointer.latest_step() is None:
        return make_state(*init_args), False
    abstract = ckpt_lib.abstract_like(jax.eval_shape(make_state, *init_args), shardings)
    state, data_state = checkpointer.restore(abstract)
    if data_iter is not None:
        try:
            data_iter.restore(data_state)
        except (KeyError, ValueError, TypeError) as e:  # a data position edited or from another loader
            from jaxreward import errors
            step = int(state.step)
            raise errors.CorruptFileError(
                f"checkpoint {checkpointer.step_dir(step)}: its data position {data_state!r} does not fit "
                f"this run's data ({type(e).__name__}: {e}); move that step aside to resume from an "
                "older one, or use a new --workdir") from None
    print(f"Resuming from checkpoint at step {int(state.step)} ({checkpointer.directory})")
    return state, True


def log_train(writer, step: int, metrics, bar=None, show=("loss", "accuracy"),
              finite=(("loss", "optimizer.learning_rate"),)) -> dict[str, float]:
    """Writes one step's train metrics and returns them as floats.

    Args:
      writer: a `metrics.MetricWriter`.
      step: finished optimizer steps.
      metrics: the step's metric dict (device scalars).
      bar: a tqdm bar whose postfix shows the `show` metrics, or None.
      finite: (metric, learning-rate config field) pairs that must be
        finite, checked in order; the first that is not names its field
        (PPO checks the value model's loss first, against
        `value_optimizer.learning_rate`). Absent metrics are skipped.

    Raises:
      errors.DivergedError: a `finite` metric is NaN or infinite (names it, the step and the field;
        a `FloatingPointError` and a `UserError`: one line on the command line).
    """
    from jaxreward.train import metrics as metrics_lib
    values = metrics_lib.to_floats(metrics)
    for name, field in finite:
        if name in values and not math.isfinite(values[name]):
            from jaxreward import errors
            raise errors.diverged(name, values[name], step, field)
    writer.write(step, values)
    if bar is not None:
        bar.set_postfix({k: f"{values[k]:.4f}" for k in show if k in values})
    return values


def stopped_early(state_step: int, num_steps: int) -> bool:
    """True (and says how to continue) when the run stopped before `num_steps`."""
    if state_step >= num_steps:
        return False
    print(f"stopped at step {state_step} of {num_steps} (train.stop_after_steps); "
          "re-run with the same --workdir to continue")
    return True
