"""Checkpoints with orbax: train state (params, optimizer, step, RNG) + data position.

Re-running with the same workdir restores the latest checkpoint, so a run
interrupted after step k and restarted continues exactly as if it had not
stopped (the data iterator resumes at the same batch).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `(TrainState, data_state)`.

    Args:
      directory: where checkpoints go (`<workdir>/checkpoints`).
      max_to_keep: number of recent checkpoints kept.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs
        with `.sharding`, e.g. from `jax.eval_shape` + shardings).

        Raises:
          FileNotFoundError: if there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, dict(out.data)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def save_params(directory: str, params: Any) -> None:
    """Saves a param pytree alone (e.g. an exported reward model)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), params, force=True)
    checkpointer.wait_until_finished()


def load_params(directory: str, shardings: Any = None) -> Any:
    """Loads `save_params`' tree (onto `shardings` if given, else device 0)."""
    checkpointer = ocp.StandardCheckpointer()
    directory = os.path.abspath(directory)
    if shardings is None:
        return checkpointer.restore(directory)
    meta = checkpointer.metadata(directory)
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    return checkpointer.restore(directory, abstract_like(tree, shardings))
