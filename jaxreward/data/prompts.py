"""Which prompts an on-policy RL step uses (GRPO/RLOO/PPO), and how its rows are grouped.

Shapes: B prompts per step, G completions per prompt (a group), R = B·G rows.

- `PromptSampler`: B prompt indices per step, each prompt exactly once per
  epoch, never twice in one step, resumable from a small JSON state.
- `expand_groups`: prompt indices `[B]` -> row indices `[R]`, each prompt's G
  completions contiguous (row b·G + j is completion j of prompt b).
- `group_shard_check`: every device shard and micro-batch must hold whole
  groups, since group advantages (GRPO, RLOO) compare a prompt's completions.
- `filter_degenerate_groups`: DAPO's dynamic sampling filter (groups whose
  rewards are all equal carry no group-relative signal).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class PromptSampler:
    """Seeded prompt indices for RL steps, each prompt exactly once per epoch.

    The stream is the concatenation of one permutation of range(num_prompts)
    per epoch, epoch e's drawn with `np.random.default_rng([seed, e])`; step s
    takes the next B indices. A step that straddles an epoch boundary takes
    the rest of epoch e, then the first prompts of epoch e+1. So that no index
    appears twice in one step, epoch e+1's permutation is then reordered
    deterministically: the prompts already in this step (the "deferred" ones)
    move to its end, keeping their relative order, as do the others. Each
    prompt is still used exactly once per epoch, whatever num_prompts and B,
    and two steps of one epoch never share a prompt.

    Epoch e's order thus depends on how epoch e-1 ended; `state()` carries
    the deferred prompts (fewer than B) so that `restore` needs no replay.

    Example:
        sampler = PromptSampler(len(records), prompts_per_step=8, seed=0)
        prompt_ids_B = sampler.next()              # int64 [8]
        row_ids_R = expand_groups(prompt_ids_B, 4)  # int64 [32]
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, seed: int):
        """Args:
          num_prompts: N >= 1 prompts, indexed 0..N-1.
          prompts_per_step: B, 1 <= B <= N.
          seed: an integer >= 0.

        Raises:
          ValueError: a non-integer or out-of-range argument; B > N says so
            (a step cannot hold B distinct prompts).
        """
        self.num_prompts = _check_int("num_prompts", num_prompts, 1)
        self.prompts_per_step = _check_int("prompts_per_step", prompts_per_step, 1)
        self.seed = _check_int("seed", seed, 0)
        if self.prompts_per_step > self.num_prompts:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} is more than the "
                             f"{self.num_prompts} prompts: a step cannot hold that many distinct prompts; "
                             f"lower prompts_per_step or add prompts")
        self._set(epoch=0, position=0, deferred=())

    def _set(self, epoch: int, position: int, deferred) -> None:
        self._epoch, self._position = epoch, position
        self._deferred = tuple(int(i) for i in deferred)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts).astype(np.int64)
        if self._deferred:
            moved = np.isin(order, self._deferred)
            order = np.concatenate([order[~moved], order[moved]])
        self._order = order  # int64 [N]: this epoch's prompts in the order they are used

    @property
    def epoch(self) -> int:
        """The epoch the next step starts in (0-based): the number of full passes done."""
        return self._epoch

    def next(self) -> np.ndarray:
        """The prompt indices of the next step: int64 `[B]`, distinct, in [0, N)."""
        B, N = self.prompts_per_step, self.num_prompts
        take = self._order[self._position:self._position + B]
        if len(take) == B:
            if self._position + B == N:
                self._set(self._epoch + 1, 0, ())
            else:
                self._position += B
            return take.copy()
        rest = take.copy()  # the end of this epoch; the step continues into the next one
        self._set(self._epoch + 1, B - len(rest), rest)
        return np.concatenate([rest, self._order[:B - len(rest)]])

    __next__ = next

    def __iter__(self):
        return self

    def state(self) -> dict:
        """A JSON-serializable dict to `restore` from: seed, num_prompts,
        epoch, position (prompts of this epoch already used) and deferred
        (prompts moved to this epoch's end, < B of them)."""
        return {"seed": self.seed, "num_prompts": self.num_prompts, "epoch": self._epoch,
                "position": self._position, "deferred": list(self._deferred)}

    def restore(self, state: Mapping) -> None:
        """Continues from `state` (from `state()`), exactly as the saved sampler would.

        prompts_per_step may differ from the saved sampler's (each prompt is
        still used once per epoch; the no-repeat-in-a-step rule holds for the
        new B).

        Raises:
          ValueError: a missing or malformed field, or a state saved with
            another seed or num_prompts (the message names both values).
        """
        missing = [k for k in ("seed", "num_prompts", "epoch", "position", "deferred") if k not in state]
        if missing:
            raise ValueError(f"prompt sampler state lacks {', '.join(missing)}; got keys {sorted(state)}")
        for key in ("seed", "num_prompts"):
            if state[key] != getattr(self, key):
                raise ValueError(f"prompt sampler state was saved with {key}={state[key]!r}, "
                                 f"this sampler has {key}={getattr(self, key)}")
        N = self.num_prompts
        epoch = _check_int("state['epoch']", state["epoch"], 0)
        position = _check_int("state['position']", state["position"], 0)
        deferred = list(state["deferred"])
        if position >= N or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                                or not 0 <= i < N for i in deferred) or len(set(deferred)) != len(deferred):
            raise ValueError(f"prompt sampler state is inconsistent for {N} prompts: "
                             f"position={position}, deferred={deferred}")
        self._set(epoch, position, deferred)


def expand_groups(indices_B, group_size: int) -> np.ndarray:
    """Prompt indices `[B]` -> row indices int64 `[R]`, R = B·G.

    Row b·G + j is completion j of prompt b: each prompt's G completions are
    contiguous, so `rewards_R.reshape(B, G)` puts a group in one row.

    Raises:
      ValueError: indices not 1-D, or group_size not an integer >= 1.
    """
    G = _check_int("group_size", group_size, 1)
    indices_B = np.asarray(indices_B)
    if indices_B.ndim != 1:
        raise ValueError(f"prompt indices must be 1-D [B], got shape {indices_B.shape}")
    return np.repeat(indices_B.astype(np.int64), G)


def group_shard_check(R: int, G: int, num_shards: int, micro_batches: int) -> None:
    """Checks that every device shard and micro-batch holds whole groups.

    The R rows (groups of G contiguous rows, see `expand_groups`) are split
    into num_shards × micro_batches equal pieces; group-relative advantages
    (GRPO, RLOO) need each piece to hold R / (num_shards·micro_batches) rows,
    a multiple of G.

    Raises:
      ValueError: a non-positive argument, or a split that cuts a group; the
        message gives the numbers and the multiple R must be.
    """
    R, G = _check_int("R", R, 1), _check_int("G", G, 1)
    num_shards = _check_int("num_shards", num_shards, 1)
    micro_batches = _check_int("micro_batches", micro_batches, 1)
    pieces = num_shards * micro_batches
    need = pieces * G
    if R % need:
        per_piece = f"{R / pieces:g} rows" if R % pieces else f"{R // pieces} rows"
        raise ValueError(f"R={R} rows split over {num_shards} shard(s) × {micro_batches} micro-batch(es) "
                         f"gives {per_piece} per piece, which is not whole groups of G={G}: "
                         f"R must be a multiple of {num_shards}×{micro_batches}×{G} = {need}")


def filter_degenerate_groups(rewards_R, G: int) -> tuple[np.ndarray, int]:
    """DAPO dynamic sampling: which groups have rewards that are not all equal.

    A group whose G rewards are exactly equal (all correct or all wrong)
    gives zero group-relative advantage, hence no gradient; DAPO drops such
    groups and samples more prompts ("DAPO: An Open-Source LLM Reinforcement
    Learning System at Scale", Yu et al., 2025, dynamic sampling). Equality is
    exact (no tolerance). With G = 1 every group is degenerate.

    Args:
      rewards_R: float `[R]` rewards, R = B·G, each group's G rows contiguous.
      G: group size >= 1.

    Returns:
      (keep_B bool `[B]`: True for a group to keep, num_dropped: int).

    Raises:
      ValueError: rewards not 1-D, R not a multiple of G, or a NaN/inf reward.
    """
    G = _check_int("G", G, 1)
    rewards_R = np.asarray(rewards_R)
    if rewards_R.ndim != 1 or rewards_R.shape[0] % G:
        raise ValueError(f"rewards must be 1-D [R] with R a multiple of G={G}; got shape {rewards_R.shape}")
    if not np.isfinite(rewards_R).all():
        raise ValueError(f"rewards hold NaN/inf at rows {np.flatnonzero(~np.isfinite(rewards_R))[:5].tolist()}")
    rewards_BG = rewards_R.reshape(-1, G)
    keep_B = ~np.all(rewards_BG == rewards_BG[:, :1], axis=1)
    return keep_B, int(np.sum(~keep_B))
