"""Several devices and several processes: one data-parallel mesh axis.

Everything in jaxcert that runs on more than one device uses a 1-D mesh whose axis
``DATA`` (``"data"``) splits a batch: training (:func:`jaxcert.training.make_train_step`:
the global batch split over ``DATA``, parameters and optimizer state replicated,
gradients averaged with ``pmean`` inside ``jax.shard_map``), feature and IBP-box
computation (:func:`jaxcert.models.map_batches`: queries split over ``DATA``) and
Monte-Carlo smoothing (:func:`jaxcert.smoothing.smoothed_embed`: images and samples
split over the same devices, partial sums added with ``psum``). docs/MULTIDEVICE.md
says what is sharded how.

Several processes (multi-host): :func:`initialize` calls
``jax.distributed.initialize`` before JAX starts; the training mesh then spans every
process's devices and each process feeds only the rows of the global batch that its
devices hold (:func:`process_rows`, :func:`shard_batch`, built on
``jax.make_array_from_process_local_data``). Evaluation meshes (:func:`local_mesh`)
hold only this process's devices, so feature boxes and smoothing need no
cross-process collectives and every process can run them on its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA", "batch_spec", "check_divisible", "current_mesh", "initialize",
    "local_mesh", "make_mesh", "process_rows", "process_split", "replicate", "shard_batch",
    "to_host", "use_mesh",
]

DATA = "data"

_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "jaxcert_parallel_mesh", default=None)


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """Starts ``jax.distributed`` when ``cfg.distributed`` (``config.parallel``) is set.

  Must run before any JAX computation (``jax.distributed.initialize`` refuses
  otherwise). ``coordinator_address``, ``num_processes`` and ``process_id`` may be
  None on clusters that JAX detects itself (Slurm, Open MPI, Cloud TPU); elsewhere set
  all three. Does nothing when ``cfg.distributed`` is False or when the distributed
  runtime is already up (e.g. the caller initialised it).
  """
  if not cfg.distributed or jax.distributed.is_initialized():
    return
  n, pid = cfg.num_processes, cfg.process_id
  if n is not None and int(n) < 1:
    raise ValueError(f"config.parallel.num_processes must be >= 1 or None, got {n!r}")
  if pid is not None and n is not None and not 0 <= int(pid) < int(n):
    raise ValueError(f"config.parallel.process_id must lie in [0, num_processes={n}), "
                     f"got {pid!r}")
  jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                             num_processes=None if n is None else int(n),
                             process_id=None if pid is None else int(pid))


def _mesh_of(devices) -> Mesh:
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                       devices=list(devices))


def make_mesh(num_devices: int | None = None, *, name: str = "num_devices") -> Mesh:
  """The data-parallel mesh over the first ``num_devices`` of ``jax.devices()``.

  ``num_devices`` None: every device of every process. With several processes a
  mesh must hold every device (each process feeds its own devices' rows), so a
  smaller count raises. ``name`` is used in error messages (the config key).
  """
  devices = jax.devices()
  if num_devices is None:
    return _mesh_of(devices)
  if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or not (
      1 <= num_devices <= len(devices)):
    raise ValueError(f"{name} must be an integer in [1, {len(devices)}] (the devices "
                     f"jax sees) or None (all of them), got {name}={num_devices!r}")
  if jax.process_count() > 1 and num_devices != len(devices):
    raise ValueError(f"{name}={num_devices} leaves devices of some of the "
                     f"{jax.process_count()} processes out: with several processes "
                     f"use every device ({len(devices)}) or None")
  return _mesh_of(devices[:int(num_devices)])


@functools.lru_cache(maxsize=None)
def _local_mesh(devices: tuple) -> Mesh:
  return _mesh_of(devices)


def local_mesh() -> Mesh:
  """The mesh over this process's devices (``jax.local_devices()``)."""
  return _local_mesh(tuple(jax.local_devices()))


def current_mesh() -> Mesh:
  """The mesh of the innermost :func:`use_mesh`, else :func:`local_mesh`.

  The default mesh of the evaluation helpers (``models.map_batches``,
  ``smoothing.smoothed_embed``).
  """
  return _ACTIVE.get() or local_mesh()


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
  """Within the block, :func:`current_mesh` is ``mesh``
  (e.g. ``use_mesh(make_mesh(1))`` to evaluate on one device)."""
  if not isinstance(mesh, Mesh) or DATA not in mesh.axis_names:
    raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis {DATA!r}, got "
                     f"mesh={mesh!r}")
  token = _ACTIVE.set(mesh)
  try:
    yield mesh
  finally:
    _ACTIVE.reset(token)


def batch_spec(ndim: int, axis: int = 0) -> PartitionSpec:
  """PartitionSpec splitting dimension ``axis`` of an ``ndim``-array over ``DATA``."""
  if not 0 <= axis < ndim:
    raise ValueError(f"axis must lie in [0, ndim={ndim}), got axis={axis}")
  return PartitionSpec(*([None] * axis + [DATA]))


def check_divisible(size: int, mesh: Mesh, name: str) -> None:
  """Raises ValueError unless ``size`` (a global batch) splits evenly over ``mesh``."""
  n = mesh.shape[DATA]
  if int(size) % n:
    raise ValueError(f"{name}={size} must be divisible by the number of devices, {n}: "
                     f"each device takes an equal share of the batch (choose a multiple "
                     f"of {n} or set config.parallel.num_devices)")


def process_rows(mesh: Mesh, size: int) -> slice:
  """Rows ``[lo, hi)`` of a global batch of ``size`` that this process's devices hold.

  All rows on one process. The rows of a process are contiguous for meshes from
  :func:`make_mesh` (device order follows process order); anything else raises.
  """
  check_divisible(size, mesh, "the global batch size")
  sharding = NamedSharding(mesh, PartitionSpec(DATA))
  spans = sorted({(ix[0].start or 0, size if ix[0].stop is None else ix[0].stop)
                  for ix in sharding.addressable_devices_indices_map((size,)).values()})
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"this process's devices hold non-contiguous rows {spans} of the "
                     "batch: build the mesh with parallel.make_mesh")
  return slice(lo, hi)


def shard_batch(batch: Any, mesh: Mesh, specs: Any = None, *,
                global_size: int | None = None) -> Any:
  """Global ``jax.Array``s from this process's rows of a batch.

  ``batch``: a pytree of host arrays, each holding the rows :func:`process_rows`
  names (all rows on one process) along the dimension its spec splits over ``DATA``.
  ``specs``: a matching pytree of PartitionSpecs (None: split dimension 0).
  ``global_size``: the global batch size (None: this process's rows times the
  number of processes, i.e. an even split).
  """
  if specs is None:
    specs = jax.tree.map(lambda x: batch_spec(np.ndim(x)), batch)

  def put(x, spec):
    x = np.asarray(x)
    axis = list(spec).index(DATA)
    shape = list(x.shape)
    shape[axis] = (global_size if global_size is not None
                   else x.shape[axis] * jax.process_count())
    check_divisible(shape[axis], mesh, "the global batch size")
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x,
                                                  tuple(shape))

  return jax.tree.map(put, batch, specs)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf replicated on every device of ``mesh`` (same value on each).

  Across processes every process must pass the same values (e.g. parameters from the
  same seed); they are read on the host then.
  """
  sharding = NamedSharding(mesh, PartitionSpec())

  def put(x):
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda ix: host[ix])

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """numpy copies of the leaves; arrays spanning several processes are gathered."""

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def process_split(split: str, *, process_index: int | None = None,
                  process_count: int | None = None):
  """This process's part of the tfds split ``split`` (``tfds.even_splits``).

  For input pipelines that read examples per process: each of the ``process_count``
  processes (default ``jax.process_count()``) reads a disjoint, near-equal part.
  Returns a split that ``tfds.load`` / ``builder.as_data_source`` accept.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not (isinstance(count, int) and count >= 1 and isinstance(index, int)
          and 0 <= index < count):
    raise ValueError(f"process_index must lie in [0, process_count) with process_count "
                     f">= 1, got process_index={index!r}, process_count={count!r}")
  import tensorflow_datasets as tfds  # noqa: PLC0415
  return tfds.even_splits(split, n=count)[index]
