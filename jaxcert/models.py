"""Feature extractors f: [0, 1]^{H x W x C} -> R^d (Flax NNX).

The CBIR paper's appendix with the exact layers is not available; MATH.md A gives
the IBP literature's reading, used here (ReLU after every hidden layer, then a
linear map to the embedding):

- ``small``: conv16 4x4/2 (VALID), conv32 4x4/1 (VALID), fc100, linear -> d
- ``large``: conv64 3x3, conv64 3x3, conv128 3x3/2, conv128 3x3, conv128 3x3
  (SAME padding), fc512, linear -> d
- ``resnet18`` / ``resnet50``: :mod:`jaxcert.resnet` (frozen BatchNorm, the
  RetrievalGuard backbones; ImageNet statistics unless the dataset has its own)

Input scaling ``(x - mean) / std`` happens inside the model, so bounds and eps
are always in [0, 1] pixel units. Models hold only ``nnx.Param`` state; training
and certification use the pure function ``apply_fn(graphdef)(params, x)`` with
``params`` a nested dict of arrays.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcert import parallel, validate

ARCHS = ("small", "large", "resnet18", "resnet50")

# Per-channel pixel statistics of the training splits (pixels in [0, 1]).
DATASET_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class _Normalize(nnx.Module):

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)

  def __call__(self, x):
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| along the last axis, with a finite gradient at 0."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class SmallCNN(nnx.Module):
  """3-layer CNN (conv, conv, fc) + linear embedding head."""

  def __init__(self, input_shape: Sequence[int], embed_dim: int = 128, *,
               mean=(0.0,), std=(1.0,), normalize: bool = False, rngs: nnx.Rngs):
    h, w, c = input_shape
    self.normalize = _Normalize(mean, std)
    self.conv1 = nnx.Conv(c, 16, (4, 4), strides=2, padding="VALID", rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (4, 4), strides=1, padding="VALID", rngs=rngs)
    h, w = (h - 4) // 2 + 1, (w - 4) // 2 + 1
    h, w = h - 3, w - 3
    self.fc = nnx.Linear(h * w * 32, 100, rngs=rngs)
    self.head = nnx.Linear(100, embed_dim, rngs=rngs)
    self.l2 = bool(normalize)

  def __call__(self, x):
    x = self.normalize(x)
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
    return l2_normalize(self.head(x)) if self.l2 else self.head(x)


class LargeCNN(nnx.Module):
  """6-layer CNN (5 conv, fc) + linear embedding head."""

  def __init__(self, input_shape: Sequence[int], embed_dim: int = 128, *,
               mean=(0.0,), std=(1.0,), normalize: bool = False, rngs: nnx.Rngs):
    h, w, c = input_shape
    self.normalize = _Normalize(mean, std)
    chans = (64, 64, 128, 128, 128)
    strides = (1, 1, 2, 1, 1)
    convs = []
    prev = c
    for ch, s in zip(chans, strides, strict=True):
      convs.append(nnx.Conv(prev, ch, (3, 3), strides=s, padding=((1, 1), (1, 1)),
                            rngs=rngs))
      prev = ch
      h, w = (h - 1) // s + 1, (w - 1) // s + 1
    self.convs = nnx.List(convs)
    self.fc = nnx.Linear(h * w * prev, 512, rngs=rngs)
    self.head = nnx.Linear(512, embed_dim, rngs=rngs)
    self.l2 = bool(normalize)

  def __call__(self, x):
    x = self.normalize(x)
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    x = jax.nn.relu(self.fc(x.reshape(x.shape[0], -1)))
    return l2_normalize(self.head(x)) if self.l2 else self.head(x)


def make_model(arch: str, input_shape: Sequence[int], *, embed_dim: int = 128,
               dataset: str | None = None, seed: int = 0,
               normalize: bool = False) -> nnx.Module:
  """Builds ``small`` or ``large`` for images of ``input_shape`` (H, W, C).

  ``dataset`` selects the normalisation constants (identity when None);
  ``normalize`` L2-normalises the embedding (``||f(x)|| = 1``, for the margin loss
  and randomized smoothing).
  """
  if arch not in ARCHS:
    raise ValueError(f"arch must be one of {ARCHS}, got arch={arch!r}")
  if len(tuple(input_shape)) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got input_shape={input_shape!r}")
  if embed_dim < 1:
    raise ValueError(f"embed_dim must be >= 1, got embed_dim={embed_dim!r}")
  if arch.startswith("resnet"):
    from jaxcert import resnet  # noqa: PLC0415
    mean, std = DATASET_STATS.get(dataset, (None, None))
    return resnet.make_resnet(int(arch[len("resnet"):]), input_shape, embed_dim=embed_dim,
                              normalize=normalize, mean=mean, std=std, seed=seed)
  c = input_shape[-1]
  mean, std = DATASET_STATS.get(dataset, ((0.0,) * c, (1.0,) * c))
  if len(mean) != c:
    raise ValueError(f"dataset={dataset!r} has {len(mean)} channels, input_shape "
                     f"{tuple(input_shape)} has {c}")
  cls = SmallCNN if arch == "small" else LargeCNN
  return cls(tuple(input_shape), embed_dim, mean=mean, std=std, normalize=normalize,
             rngs=nnx.Rngs(seed))


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, params) with params a nested dict of arrays."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def apply_fn(graphdef: nnx.GraphDef) -> Callable[[dict, jax.Array], jax.Array]:
  """Pure ``f(params, x)``: x [B, H, W, C] in [0, 1] -> features [B, d]."""

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  return apply


def map_batches(fn, images: np.ndarray, batch_size: int, *,
                mesh: jax.sharding.Mesh | None = None):
  """Applies jitted ``fn`` to ``images`` in fixed-size batches (last one padded), so
  one compiled shape serves every batch. Returns numpy arrays (any pytree).

  ``fn`` maps each row on its own (outputs [batch, ...], row i from input row i).
  On a ``mesh`` of several devices (default :func:`jaxcert.parallel.current_mesh`:
  this process's devices) each batch is split over the ``data`` axis (its size
  rounded up to a multiple of the device count) and the jitted ``fn`` runs
  partitioned by rows; arrays ``fn`` takes besides the batch (parameters) must be
  uncommitted or live on the mesh's devices.
  """
  mesh = parallel.current_mesh() if mesh is None else mesh
  devices = mesh.shape[parallel.DATA]
  batch_size = -(-int(batch_size) // devices) * devices
  if devices > 1:
    rows = parallel.process_rows(mesh, batch_size)
    put = lambda x: parallel.shard_batch(x[rows], mesh, global_size=batch_size)
  else:
    put = jnp.asarray
  n = len(images)
  outs = []
  for i in range(0, n, batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    outs.append(parallel.to_host(fn(put(chunk))))
  return jax.tree.map(lambda *a: np.concatenate(a)[:n], *outs)   # drops the padding


def embed(apply, params, images: np.ndarray, *, batch_size: int = 256,
          mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Clean features f(x): images float [N, H, W, C] in [0, 1] -> [N, d].

  Runs matrix products at full float32 precision (no TF32/bf16 passes), the
  precision the certificates are stated for. Batches are split over the devices of
  ``mesh`` (:func:`map_batches`); ``params`` are replicated onto them.
  """
  validate.check_images(images)
  mesh = parallel.current_mesh() if mesh is None else mesh
  if mesh.size > 1:
    params = parallel.replicate(params, mesh)
  with jax.default_matmul_precision("highest"):
    fn = jax.jit(apply)
    return map_batches(lambda x: fn(params, x), images, batch_size, mesh=mesh)
