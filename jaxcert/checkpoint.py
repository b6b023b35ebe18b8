"""Orbax-backed checkpoints of a training-state pytree in ``<workdir>/checkpoints``.

The trainer saves a plain nested dict of arrays, e.g.::

    {"params": {...}, "batch_stats": {...} or {}, "opt_state": <optax state>,
     "step": int32 scalar, "rng": jax.random.key_data(key)}

and restores it into a *target* pytree of the same structure (concrete arrays,
``jax.ShapeDtypeStruct`` or numpy values). The result always has exactly the
target's tree structure (optax NamedTuples, tuples, empty dicts included), with
``jax.Array`` leaves.

Design notes
------------
* Saves are synchronous: ``save`` returns only after the step directory is
  committed, so the caller may donate / overwrite the saved buffers right after.
* Atomicity is orbax's: a step is written to ``<step>.orbax-checkpoint-tmp*``
  and renamed when complete. Such leftovers of an interrupted save are never
  listed as steps; a writing :class:`Checkpointer` deletes them when opened.
* Structure is checked against the checkpoint's stored metadata *by leaf path*
  before reading any array, so a mismatch gives a :class:`CheckpointError`
  listing the differing paths. Empty containers hold no leaves, so a stored
  ``{}`` that the target lacks (or vice versa) is not a mismatch.
* Orbax's per-save INFO chatter (dozens of absl lines per save under
  ``absl.app``) is filtered out; its warnings and errors are kept.
* Every process of a multi-process job must make the same calls (orbax
  coordinates them); leaves without a sharding are restored replicated.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

__all__ = ["CheckpointError", "Checkpointer", "restore_latest"]

CHECKPOINT_SUBDIR = "checkpoints"
_MAX_LISTED = 5  # paths shown per category in a mismatch message


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt, or does not match the requested structure."""


# --------------------------------------------------------------------------- logging


class _DropOrbaxInfo(logging.Filter):
  """Drops orbax's DEBUG/INFO records (absl logs them via the 'absl' logger) and
  the warning about opening a directory read-only; other warnings/errors pass."""

  _marker = os.sep + "orbax" + os.sep
  # Warnings that only restate what we asked for (restore_latest opens read-only).
  _expected = ("Given directory is read only",)

  def filter(self, record: logging.LogRecord) -> bool:
    if self._marker not in (record.pathname or ""):
      return True
    if record.levelno >= logging.ERROR:
      return True
    if record.levelno >= logging.WARNING:
      return not any(str(record.msg).startswith(m) for m in self._expected)
    return False


def _quiet_orbax_info() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


_quiet_orbax_info()


# --------------------------------------------------------------------------- pytree helpers


def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _norm_path(path) -> tuple[str, ...]:
  """Key path independent of container type: NamedTuple fields and dict keys are
  names, tuple/list entries indices (orbax stores NamedTuples as dicts, tuples as lists)."""
  return tuple(_key_str(k) for k in path)


def _fmt_path(p: tuple[str, ...]) -> str:
  return "/".join(p) if p else "<root>"


def _flat_by_path(tree) -> dict[tuple[str, ...], Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    out[_norm_path(path)] = leaf
  return out


def _default_sharding() -> jax.sharding.Sharding:
  if jax.process_count() > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _abstract_leaf(path: str, x) -> jax.ShapeDtypeStruct:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x if x.sharding is not None else jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=_default_sharding())
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, (np.ndarray, np.generic, int, float, bool, complex)):
    a = np.asarray(x)
    return jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype),
                                sharding=_default_sharding())
  raise CheckpointError(
      f"restore target leaf {path} has unsupported type {type(x).__name__}; target leaves "
      "must be jax arrays, jax.ShapeDtypeStruct or numpy arrays/scalars.")


def _stored_shapes(a: jax.ShapeDtypeStruct) -> set[tuple[int, ...]]:
  """Shapes a stored leaf may have for target ``a`` (typed PRNG keys: key data shape too)."""
  shapes = {tuple(a.shape)}
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(a.shape, a.dtype))
    shapes.add(tuple(data.shape))
  return shapes


def _savable(state: PyTree) -> PyTree:
  # orbax rejects numpy scalars (np.int32(3)); 0-d numpy arrays are fine.
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, state)


class _DropUnretrievedAsyncErrors(logging.Filter):
  """Drops asyncio's "exception was never retrieved" reports (used while collecting
  the tasks a failed orbax restore leaves behind; the error itself is re-raised)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


def _collect_failed_restore_tasks() -> None:
  # A failed orbax/tensorstore read leaves sibling asyncio tasks whose exceptions
  # (the same corruption) would be dumped as tracebacks whenever they are
  # garbage-collected. Collect them now, quietly.
  asyncio_logger = logging.getLogger("asyncio")
  filt = _DropUnretrievedAsyncErrors()
  asyncio_logger.addFilter(filt)
  try:
    gc.collect()
  finally:
    asyncio_logger.removeFilter(filt)


def _short(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  first = msg[0] if msg else ""
  if len(first) > 300:
    first = first[:300] + "..."
  return f"{type(e).__name__}: {first}"


# --------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Orbax-backed checkpoints of a training state pytree in `workdir/checkpoints`.

  Use as a context manager (or call :meth:`close`). ``read_only=True`` opens an
  existing directory without creating, cleaning or deleting anything.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               read_only: bool = False):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 (or None to keep all), got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.workdir = os.fspath(workdir)
    self.directory = os.path.abspath(os.path.join(self.workdir, CHECKPOINT_SUBDIR))
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0,
          enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
          cleanup_tmp_directories=True,  # leftovers of interrupted saves
          enable_async_checkpointing=False)  # save() returns when the step is committed
    registry = ocp.handlers.create_default_handler_registry(
        default=ocp.StandardCheckpointHandler())  # lets a fresh manager read item metadata
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            handler_registry=registry)
    except Exception as e:
      raise CheckpointError(
          f"cannot open checkpoint directory {self.directory}: {_short(e)}. Check that the "
          "path is a writable directory (or pass another --workdir).") from e

  # -- context manager / lifecycle

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._manager is not None:
      try:
        self.wait_until_finished()
      finally:
        self._manager.close()
        self._manager = None

  def wait_until_finished(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def _mgr(self) -> ocp.CheckpointManager:
    if self._manager is None:
      raise CheckpointError(f"Checkpointer for {self.directory} is closed.")
    return self._manager

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- queries

  def all_steps(self) -> list[int]:
    """Committed steps on disk, ascending (tmp dirs of unfinished saves excluded)."""
    mgr = self._mgr()
    mgr.reload()
    return sorted(mgr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -- save

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves ``state`` as ``step``; returns whether a checkpoint was written.

    Without ``force`` a step is skipped when it is not a multiple of
    ``save_interval_steps`` or not newer than the latest saved step. Returns
    only after the checkpoint is committed, so ``state``'s buffers may be
    donated afterwards.
    """
    mgr = self._mgr()
    if self.read_only:
      raise CheckpointError(f"Checkpointer for {self.directory} is read-only; cannot save.")
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if force and step in mgr.all_steps():
      raise CheckpointError(
          f"a checkpoint for step {step} already exists at {self._step_dir(step)}; "
          "orbax does not overwrite steps. Delete it first or save a different step.")
    try:
      saved = mgr.save(step, args=ocp.args.StandardSave(_savable(state)), force=force)
      mgr.wait_until_finished()
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(
          f"saving step {step} to {self._step_dir(step)} failed: {_short(e)}. Check disk "
          "space and permissions of the directory.") from e
    return bool(saved)

  # -- restore

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """Restores ``step`` (default: latest) into a pytree with ``target``'s structure.

    ``target`` may hold concrete arrays (their dtype and sharding are used),
    ``jax.ShapeDtypeStruct`` or numpy values. Raises :class:`CheckpointError` if
    there is no such step, the structure/shapes differ, or the data is corrupt.
    """
    mgr = self._mgr()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(
            f"no checkpoints in {self.directory}; train first (run train.py with "
            f"--workdir={self.workdir}).")
      step = steps[-1]
    step = int(step)
    step_dir = self._step_dir(step)
    if step not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory} (available steps: "
          f"{steps or 'none'}).")

    def corrupt(e: BaseException) -> CheckpointError:
      return CheckpointError(
          f"checkpoint for step {step} at {step_dir} is corrupt or incomplete and could not be "
          f"restored ({_short(e)}). Delete {step_dir} to fall back to an earlier step "
          f"(available: {steps}) or retrain.")

    target_treedef = jax.tree_util.tree_structure(target)
    target_flat = _flat_by_path(target)
    abstract_flat = {p: _abstract_leaf(_fmt_path(p), x) for p, x in target_flat.items()}

    try:
      meta = mgr.item_metadata(step)
    except Exception as e:
      raise corrupt(e) from e
    stored_tree = getattr(meta, "tree", None)
    if stored_tree is not None:
      self._check_structure(step_dir, step, _flat_by_path(stored_tree), abstract_flat)
      # Restore in the stored structure (what orbax validates against), filled
      # with the target's shapes/dtypes/shardings; re-nest into target's below.
      restore_item = jax.tree_util.tree_map_with_path(
          lambda path, _: abstract_flat[_norm_path(path)], stored_tree)
    elif meta is None:
      # Tree metadata file unreadable/absent: orbax can still restore from the
      # target alone (and validates against the stored arrays).
      restore_item = jax.tree_util.tree_unflatten(
          target_treedef, [abstract_flat[p] for p in target_flat])
    else:
      raise corrupt(ValueError(f"the state item is missing from {step_dir}"))

    try:
      restored = mgr.restore(step, args=ocp.args.StandardRestore(restore_item))
    except Exception as e:
      _collect_failed_restore_tasks()
      msg = str(e)
      if "tree structures do not match" in msg or "not compatible with the stored shape" in msg:
        raise CheckpointError(
            f"checkpoint for step {step} at {step_dir} does not match the target structure: "
            f"{_short(e)}") from e
      raise corrupt(e) from e

    restored_flat = _flat_by_path(restored)
    try:
      leaves = [restored_flat[p] for p in target_flat]
    except KeyError as e:
      raise corrupt(KeyError(f"leaf {_fmt_path(e.args[0])} missing after restore")) from e
    leaves = [x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x), a.sharding)
              for x, a in zip(leaves, abstract_flat.values(), strict=True)]
    return jax.tree_util.tree_unflatten(target_treedef, leaves)

  @staticmethod
  def _check_structure(step_dir: str, step: int, stored: dict, target: dict) -> None:
    missing = [p for p in target if p not in stored]
    unexpected = [p for p in stored if p not in target]
    shapes = []
    for p, a in target.items():
      shape = getattr(stored.get(p), "shape", None)
      if p in stored and shape is not None and tuple(shape) not in _stored_shapes(a):
        shapes.append(f"{_fmt_path(p)}: checkpoint {tuple(shape)} vs target {tuple(a.shape)}")
    if not (missing or unexpected or shapes):
      return

    def listing(items, what):
      if not items:
        return []
      shown = ", ".join(items[:_MAX_LISTED]) + (", ..." if len(items) > _MAX_LISTED else "")
      return [f"{len(items)} {what} ({shown})"]

    parts = (listing([_fmt_path(p) for p in missing], "target leaves missing in checkpoint")
             + listing([_fmt_path(p) for p in unexpected], "checkpoint leaves not in target")
             + listing(shapes, "shape mismatches"))
    raise CheckpointError(
        f"checkpoint for step {step} at {step_dir} does not match the target structure: "
        + "; ".join(parts) + ". It was probably written with a different model/optimizer "
        "configuration: restore with the same configuration, or use a fresh --workdir.")


# --------------------------------------------------------------------------- certify entry point


def restore_latest(workdir: str, target: PyTree) -> tuple[int, PyTree]:
  """(step, state) of the latest checkpoint in ``workdir``, for evaluation.

  Opens the directory read-only. Raises :class:`CheckpointError` if ``workdir``
  or its checkpoints are missing, or the latest checkpoint cannot be restored
  into ``target`` (corrupt, or a different structure).
  """
  workdir = os.fspath(workdir)
  hint = f"run train.py with --workdir={workdir} first"
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir} does not exist; {hint}.")
  directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):
    raise CheckpointError(f"workdir {workdir} has no checkpoints ({directory} is missing); {hint}.")
  with Checkpointer(workdir, read_only=True) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointError(f"workdir {workdir} has no checkpoints ({directory} is empty); {hint}.")
    return step, ckpt.restore(target, step)
