"""Checkpoints with orbax: train state (params, optimizer, step, RNG) + data position.

Re-running with the same workdir restores the latest checkpoint, so a run
interrupted after step k and restarted continues exactly as if it had not
stopped (the data iterator resumes at the same batch).

Damaged checkpoints are found, named and skipped. Each step gets a
`sha256.json` listing the SHA-256 of its files (orbax itself checks the
structure it reads but not array bytes: a flipped byte in a data file
restores silently). It is written by orbax's save thread before the step's
folder is renamed into place, so a run killed at any moment leaves no
committed step without it. `Checkpointer.restore` verifies it, then tries orbax; if
the latest step fails either way it says which file and why, falls back to
the next older step, and moves the bad one aside to `<step>.unreadable`
(kept, not deleted) so the run can write that step again. Exports
(`save_params`) carry the same digests for `models/reward_io.py` to check.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import threading
import traceback
import weakref
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxreward.errors import CorruptFileError

MANIFEST = "sha256.json"  # in each step folder: {"sha256": {relative path: hex digest}}
# Written by orbax's step bookkeeping, possibly after the step is final: not digested.
# commit_success.txt: orbax's commit marker on storage without atomic renames.
_UNDIGESTED = (MANIFEST, MANIFEST + ".tmp", "_CHECKPOINT_METADATA", "commit_success.txt")
# orbax writes a step into `<step>` + this, then renames it to `<step>`.
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def file_digests(directory: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """`{path relative to directory: sha256 hex}` of every file under it
    (sorted; names in `skip` at the top level are left out)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel in skip:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[rel.replace(os.sep, "/")] = digest.hexdigest()
    return out


def check_digests(directory: str, expected: dict[str, str]) -> list[str]:
    """What differs from `expected` (`file_digests` at save time): "missing
    <file>" or "<file> changed (sha256 differs)"; empty when intact."""
    problems = []
    for rel, digest in sorted(expected.items()):
        path = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(path):
            problems.append(f"missing {rel}")
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != digest:
            problems.append(f"{rel} changed (sha256 differs; {os.path.getsize(path)} bytes)")
    return problems


class _Unreadable(Exception):
    """One step cannot be restored; the message says which file and why."""


def _describe(error: BaseException, step_dir: str) -> str:
    """A short reason for an orbax/tensorstore failure, naming the files it
    mentions (tensorstore messages run to kilobytes)."""
    if isinstance(error, FileNotFoundError) and error.filename:
        name = str(error.filename)
        return f"missing {os.path.relpath(name, step_dir) if os.path.isabs(name) else name}"
    text = str(error)
    files = []
    for path in re.findall(r'local file "([^"]+)"', text) + re.findall(r"File (/\S+) not found", text):
        rel = os.path.relpath(path, step_dir) if path.startswith(step_dir) else path
        if rel not in files and rel != ".":
            files.append(rel)
    code = re.match(r"([A-Z_]{4,}):", text)
    first = text.strip().splitlines()[0] if text.strip() else ""
    if files:
        return (f"{code.group(1) + ' ' if code else ''}reading {', '.join(files)} "
                f"({type(error).__name__})")
    # A data file cut short or damaged inside orbax's OCDBT store: the message
    # is a TensorStore spec; its relative kvstore path is the array's key.
    arrays = [p.rstrip("/").replace("/", ".") for p in re.findall(r"'path': '([^'/][^']*)'", text)]
    if "error while reading array" in first and arrays:
        return (f"array {arrays[0]} cannot be read: a data file under {os.path.basename(step_dir)} "
                "is truncated or damaged")
    return f"{type(error).__name__}: {first[:200]}"


def _orbax_read(read: Callable[[], Any], folder: str) -> Any:
    """`read()` (an orbax restore of `folder`); any failure becomes
    `_Unreadable` with `_describe`'s short reason."""
    _drop_orbax_orphan_reports()
    try:
        return read()
    except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many kinds)
        raise _Unreadable(_describe(e, folder)) from e


def _drop_orbax_orphan_reports() -> None:
    """Installs (once) a `sys.unraisablehook` filter for orbax's orphaned reads.

    When one array read fails, orbax leaves its other reads pending, and
    each is reported whenever it is collected (later, from orbax's own
    threads) as "Exception ignored in: <coroutine ...>" with a ~70-line
    TensorStore spec, or, once its event loop is closed, as a bare
    "RuntimeError: Event loop is closed" raised inside asyncio. The failure
    itself is raised and named; these copies of it are dropped. Every other
    report goes to the hook that was there.
    """
    current = sys.unraisablehook
    if getattr(current, "drops_orbax_orphans", False):
        return

    def hook(unraisable):
        where = getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
        frames = [f.filename for f in traceback.extract_tb(unraisable.exc_traceback)]
        # A pending read finalized after its event loop closed fails inside asyncio with
        # "Event loop is closed" and no object to name it: dropped too (asyncio frames only).
        closed_loop = (isinstance(unraisable.exc_value, RuntimeError) and frames
                       and str(unraisable.exc_value) == "Event loop is closed"
                       and all(os.sep + "asyncio" + os.sep in f for f in frames))
        if not ("orbax" in where or any("orbax" in f or "tensorstore" in f for f in frames) or closed_loop):
            current(unraisable)

    hook.drops_orbax_orphans = True
    sys.unraisablehook = hook


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for `(TrainState, data_state)`.

    Args:
      directory: where checkpoints go (`<workdir>/checkpoints`).
      max_to_keep: number of recent checkpoints kept.
      checksums: write and verify each step's `sha256.json` (reads every
        file once more at save and restore).
    """

    def __init__(self, directory: str, max_to_keep: int = 2, checksums: bool = True):
        self.directory = os.path.abspath(directory)
        self.checksums = checksums
        self._saving: int | None = None  # the step of the save in flight
        # Digests are written by orbax's background save thread once the
        # step's files are final and before its folder is renamed into
        # place, so every committed step carries its sha256.json: a run
        # killed at any moment leaves no unchecked step behind.
        async_options = ocp.AsyncOptions(
            post_finalization_callback=self._write_digests if checksums else None)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 async_options=async_options))
        self._closed = False
        _OPEN.add(self)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, data_state: dict,
             lr_fields: tuple[tuple[str, str], ...] = (("", "optimizer.learning_rate"),)) -> None:
        """Saves `(state, data_state)` as `step` (asynchronously).

        A state that holds a NaN or infinite value is refused and nothing is
        written: a run diverges between two log steps too, and a checkpoint
        of NaN weights would be resumed from or exported.

        Args:
          step: finished optimizer steps.
          state: the train state pytree.
          data_state: the data iterator's position (JSON).
          lr_fields: (path prefix, learning-rate config field) pairs; the
            first leaf that is not finite names the field of the first
            prefix its path starts with (PPO: `("value", "value_optimizer.learning_rate")`).

        Raises:
          errors.DivergedError: a floating leaf holds NaN or inf (names its path and the step).
        """
        refuse_nonfinite(state, "checkpoint", step, lr_fields)
        self._manager.wait_until_finished()  # orbax waits here anyway; _saving then names this save
        self._saving = step
        # A Ctrl-C inside orbax's synchronous part cut the save off before its background part
        # existed: `<step>.orbax-checkpoint-tmp` stayed and the step was lost. It is raised
        # right after, so the caller finishes the save (`close_open`) and stops.
        with _interrupts_deferred():
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def _write_digests(self) -> None:
        """orbax's post-finalization callback (its save thread): the step's
        files are complete in `<step>.orbax-checkpoint-tmp`, which orbax
        renames to `<step>` next; writes their digests there (process 0)."""
        if jax.process_index() != 0 or self._saving is None:
            return
        folder = self.step_dir(self._saving) + _ORBAX_TMP_SUFFIX
        if not os.path.isdir(folder):  # a storage layout without a tmp folder: the step is final
            folder = self.step_dir(self._saving)
        digests = file_digests(folder, skip=_UNDIGESTED)
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"sha256": digests}, f, indent=0)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs
        with `.sharding`, e.g. from `jax.eval_shape` + shardings).

        Without `step`: the latest step that restores. A step that fails (a
        file missing, truncated or changed since it was saved, or anything
        orbax cannot read) is reported on stderr by name and reason, and the
        next older one is tried; when one restores, the failed newer ones
        are moved aside to `<step>.unreadable`. With several processes
        nothing is moved: the error says what to move.

        Raises:
          FileNotFoundError: if there is no checkpoint.
          CorruptFileError: no step restores (each one's reason is listed),
            or `step` was given and it does not, or (several processes) the
            latest does not but an older one does.
        """
        self._manager.wait_until_finished()  # a save of this process in flight commits first
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        if step is not None:
            try:
                return self._restore_step(step, abstract_state)
            except _Unreadable as e:
                raise CorruptFileError(f"checkpoint {self.step_dir(step)} cannot be restored: {e}") from e
        failed = []
        for s in steps:
            try:
                out = self._restore_step(s, abstract_state)
            except _Unreadable as e:
                failed.append((s, str(e)))
                print(f"warning: checkpoint {self.step_dir(s)} cannot be restored: {e}",
                      file=sys.stderr, flush=True)
                continue
            if failed:
                self._set_aside([f for f, _ in failed], s)
            return out
        listing = "\n  ".join(f"step {s}: {why}" for s, why in failed)
        raise CorruptFileError(
            f"no checkpoint under {self.directory} can be restored:\n  {listing}\n"
            f"Move or delete {self.directory} to start over (or restore the files named).")

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        folder = self.step_dir(step)
        manifest = os.path.join(folder, MANIFEST)
        if self.checksums and not os.path.exists(manifest):
            # Written with the step since this version; older runs sealed a step
            # at the next save, so a kill in between left it without one.
            print(f"warning: checkpoint {folder} has no {MANIFEST} (written by an older version, "
                  "or the file was removed): restoring it without checking its bytes",
                  file=sys.stderr, flush=True)
        if self.checksums and os.path.exists(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    expected = json.load(f)["sha256"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise _Unreadable(f"{MANIFEST} is unreadable ({type(e).__name__})") from e
            problems = check_digests(folder, expected)
            if problems:
                raise _Unreadable("; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        out = _orbax_read(lambda: self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())), folder)
        return out.state, dict(out.data)

    def _set_aside(self, steps: list[int], good: int) -> None:
        """Moves unreadable steps newer than `good` out of orbax's sight."""
        if jax.process_count() > 1:
            moves = " ".join(f"mv {self.step_dir(s)} {self.step_dir(s)}.unreadable" for s in steps)
            raise CorruptFileError(
                f"checkpoint step(s) {steps} under {self.directory} cannot be restored (see the "
                f"warnings above) but step {good} can; on one host run: {moves}; then re-run")
        for s in steps:
            target, k = self.step_dir(s) + ".unreadable", 1
            while os.path.exists(target):
                target, k = f"{self.step_dir(s)}.unreadable-{k}", k + 1
            os.rename(self.step_dir(s), target)
            print(f"warning: moved the unreadable checkpoint to {target}; resuming from step {good}",
                  file=sys.stderr, flush=True)
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes the pending save and closes; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._manager.wait_until_finished()
        self._manager.close()


# Checkpointers not closed yet: `close_open` finishes them when a run ends by an error.
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@jax.jit
def _leaves_finite(leaves: list) -> jax.Array:
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves])


def refuse_nonfinite(tree: Any, what: str, step: int | None = None,
                     lr_fields: tuple[tuple[str, str], ...] = (("", "optimizer.learning_rate"),)) -> None:
    """Raises before a `what` ("checkpoint", "export") of `tree` is written
    when a floating leaf holds NaN or inf.

    Raises:
      errors.DivergedError: one line naming the first bad leaf's path, the
        step (if given) and the learning-rate field of the first `lr_fields`
        prefix the path starts with.
    """
    bad = first_nonfinite(tree)
    if bad is None:
        return
    from jaxreward import errors
    field = next((f for prefix, f in lr_fields if bad.startswith(prefix)), lr_fields[-1][1])
    raise errors.diverged(f"value in {bad} ({what} not written)", None, step, field)


def first_nonfinite(tree: Any) -> str | None:
    """The `/`-joined path of the first floating leaf of `tree` holding a NaN
    or an inf, or None when every one is finite (one jitted reduction)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    floating = [(path, x) for path, x in flat
                if hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    if not floating:
        return None
    ok = jax.device_get(_leaves_finite([x for _, x in floating]))
    for (path, _), fine in zip(floating, ok):
        if not fine:
            return leaf_path(path)
    return None


def leaf_path(keys) -> str:
    """A pytree leaf's key path (from `tree_flatten_with_path`) as `a/b/0`."""
    def name(key: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return "/".join(name(k) for k in keys)


@contextlib.contextmanager
def _interrupts_deferred():
    """Holds back a Ctrl-C (SIGINT with Python's default handler, in the main
    thread) until the block ends, then raises it as KeyboardInterrupt."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def saving_in_progress() -> bool:
    """True while a `Checkpointer` of this process has a save running in the background."""
    return any(c._manager.is_saving_in_progress() for c in list(_OPEN))


def close_open() -> None:
    """Finishes and closes every `Checkpointer` still open in this process.

    `jaxreward.main` calls it when a driver raises, before it prints the
    error: a save still running in the background then completes (and is
    sealed) instead of being cut off at exit, which left a
    `<step>.orbax-checkpoint-tmp` folder and orbax tracebacks after the
    one-line error. A checkpointer that fails to close is named in one
    line on stderr; the others still close.
    """
    for checkpointer in list(_OPEN):
        try:
            checkpointer.close()
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to report
            print(f"warning: could not finish the checkpoint save in {checkpointer.directory}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def save_params(directory: str, params: Any) -> dict[str, str]:
    """Saves a param pytree alone (e.g. an exported reward model); returns
    `file_digests` of what it wrote (on process 0; {} elsewhere).

    Raises:
      errors.DivergedError: a leaf holds NaN or inf (nothing is written).
    """
    refuse_nonfinite(params, "export")
    checkpointer = ocp.StandardCheckpointer()
    directory = os.path.abspath(directory)
    checkpointer.save(directory, params, force=True)
    checkpointer.wait_until_finished()
    return file_digests(directory) if jax.process_index() == 0 else {}


def load_params(directory: str, shardings: Any = None, digests: dict[str, str] | None = None) -> Any:
    """Loads `save_params`' tree (onto `shardings` if given, else device 0).

    Raises:
      CorruptFileError: `digests` (from `save_params`) are given and a file
        is missing or changed, or orbax cannot read the folder; the files
        are named.
    """
    checkpointer = ocp.StandardCheckpointer()
    directory = os.path.abspath(directory)
    if digests:
        problems = check_digests(directory, digests)
        if problems:
            raise CorruptFileError(f"{directory} is damaged: " + "; ".join(problems[:5])
                                   + (" ..." if len(problems) > 5 else ""))
    def read():
        meta = checkpointer.metadata(directory)
        tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
        # No shardings: this process's first device, not the saved shardings
        # (an export written on 8 devices or 2 processes loads on 1 device).
        targets = shardings if shardings is not None else jax.tree.map(
            lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), tree)
        restored = checkpointer.restore(directory, abstract_like(tree, targets))
        # Uncommitted (as freshly made params are), so a jit may place them on any mesh.
        return restored if shardings is not None else jax.tree.map(jax.numpy.asarray, jax.device_get(restored))
    try:
        return _orbax_read(read, directory)
    except _Unreadable as e:
        raise CorruptFileError(f"{directory} cannot be read: {e}") from None
