"""ResNet-18/50 embedding networks with frozen BatchNorm (Flax NNX).

The RetrievalGuard paper trains a ResNet-50, ImageNet-pretrained, with frozen
BatchNorm: the running statistics are never updated and the forward pass never
uses batch statistics. ``ResNet`` implements exactly that regime:

- torchvision layout (``resnet18`` / ``resnet50``, v1.5: the stride of a
  bottleneck sits on its 3x3 conv), 7x7/2 conv stem + 3x3/2 max-pool, 1x1
  projection shortcut + BN where the shape changes, global average pool, then a
  linear embedding head to ``embed_dim`` and (by default) L2 normalisation;
- ``small_input=True`` (28x28 / 32x32 images) swaps the stem for a 3x3/1 conv and
  drops the max-pool;
- BatchNorm is ``FrozenBatchNorm``: ``scale * (x - mean) / sqrt(var + 1e-5) +
  bias`` per channel, with ``mean``/``var`` held in ``BNStat`` variables (an
  ``nnx.Variable`` subclass, not ``nnx.Param``). The output of one image never
  depends on the rest of its batch.

As in ``jaxcert.models``, inputs are float images in [0, 1] of shape
[B, H, W, C] and ``(x - mean) / std`` happens inside the model. Greyscale input
(C = 1) is replicated to three identical channels before the normalisation and
the stem, so ImageNet (RGB) weights load unchanged.

The pure functions of ``jaxcert.models`` work as they are:
``graphdef, params = models.split(model)`` gives a nested dict that holds the
BN statistics next to the parameters (``nnx.to_pure_dict`` drops the variable
types), and ``models.apply_fn(graphdef)(params, x)`` merges it back. The
forward pass applies ``stop_gradient`` to the statistics, so their gradient is
exactly zero and plain ``optax.adam``/``sgd`` leave them unchanged; optimisers
that move parameters without a gradient (weight decay) must be wrapped, e.g.
with ``frozen_bn_optimizer`` (built on ``trainable_mask``). Alternatively,
``nnx.split(model, nnx.Param, BNStat)`` separates the two kinds of state.

Pretrained weights come from a local ``.npz`` file whose keys are torchvision
``state_dict`` names (nothing is downloaded). On a machine with torchvision::

    import torch, torchvision
    sd = torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict()
    torch.save(sd, "resnet50.pth")

then ``python scripts/convert_torchvision_resnet.py resnet50.pth resnet50.npz``
(needs torch and numpy only) and, here::

    model = resnet.make_resnet(50, (224, 224, 3))
    left = resnet.load_pretrained(model, "resnet50.npz")  # ['head.bias', 'head.weight']

``export_torchvision_npz`` writes the same format from a model.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxcert import losses

DEPTHS = (18, 50)
# torchvision's ImageNet pixel statistics (pixels in [0, 1], RGB).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-5  # torch.nn.BatchNorm2d default

_STAGES = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
_WIDTHS = (64, 128, 256, 512)
# Block type and blocks per stage of every torchvision ResNet, for error messages.
_TORCHVISION_LAYOUTS = {
    (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101,
    (True, (3, 8, 36, 3)): 152,
}
_BN_KEYS = frozenset({"scale", "bias", "mean", "var"})
# He (fan-out) normal init of conv kernels, as torchvision.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BNStat(nnx.Variable):
  """A BatchNorm running statistic (mean or variance): state, never trained."""


class FrozenBatchNorm(nnx.Module):
  """Per-channel affine BatchNorm with fixed statistics (inference-mode BN).

  ``y = scale * (x - mean) / sqrt(var + eps) + bias`` over the last axis of x
  (any leading shape). ``scale``/``bias`` are ``nnx.Param``; ``mean``/``var`` are
  ``BNStat`` and receive a zero gradient (``stop_gradient``). Initialised to the
  identity map up to eps (scale 1, bias 0, mean 0, var 1).
  """

  def __init__(self, num_features: int, *, eps: float = BN_EPS):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = BNStat(jnp.zeros((num_features,), jnp.float32))
    self.var = BNStat(jnp.ones((num_features,), jnp.float32))
    self.eps = float(eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = lax.stop_gradient(self.mean[...])
    var = lax.stop_gradient(self.var[...])
    a = self.scale[...] * lax.rsqrt(var + self.eps)
    return x * a + (self.bias[...] - mean * a)


def _conv(in_ch: int, out_ch: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  """torchvision ``Conv2d(k, stride, padding=k // 2, bias=False)`` in NHWC."""
  p = k // 2
  return nnx.Conv(in_ch, out_ch, (k, k), strides=(stride, stride),
                  padding=((p, p), (p, p)), use_bias=False,
                  kernel_init=_CONV_INIT, rngs=rngs)


def _projection(in_ch: int, out_ch: int, stride: int, rngs: nnx.Rngs):
  """``downsample`` = [1x1 conv, BN] where the shortcut changes shape, else None.

  An ``nnx.List`` so that parameter paths read ``downsample/0``,
  ``downsample/1`` like torchvision's ``downsample.0`` / ``downsample.1``.
  """
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List([_conv(in_ch, out_ch, 1, stride, rngs), FrozenBatchNorm(out_ch)])


def _shortcut(downsample, x: jax.Array) -> jax.Array:
  if downsample is None:
    return x
  return downsample[1](downsample[0](x))


class BasicBlock(nnx.Module):
  """ResNet-18/34 block: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(in_ch, width, 3, stride, rngs)
    self.bn1 = FrozenBatchNorm(width)
    self.conv2 = _conv(width, width, 3, 1, rngs)
    self.bn2 = FrozenBatchNorm(width)
    self.downsample = _projection(in_ch, width, stride, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return jax.nn.relu(out + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """ResNet-50 block (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (x4 channels), + shortcut."""

  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int, *, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 1, 1, rngs)
    self.bn1 = FrozenBatchNorm(width)
    self.conv2 = _conv(width, width, 3, stride, rngs)
    self.bn2 = FrozenBatchNorm(width)
    self.conv3 = _conv(width, out_ch, 1, 1, rngs)
    self.bn3 = FrozenBatchNorm(out_ch)
    self.downsample = _projection(in_ch, out_ch, stride, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    out = jax.nn.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return jax.nn.relu(out + _shortcut(self.downsample, x))


def _check_stats(name: str, value) -> tuple[float, ...]:
  try:
    t = tuple(float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a sequence of 1 or 3 numbers (per channel), "
                     f"got {name}={value!r}") from e
  if len(t) not in (1, 3) or not all(math.isfinite(v) for v in t):
    raise ValueError(f"{name} must hold 1 or 3 finite numbers (per channel), "
                     f"got {name}={value!r}")
  if name == "std" and not all(v > 0 for v in t):
    raise ValueError(f"std must be > 0 in every channel, got std={value!r}")
  return t


def _check_args(depth, input_shape, embed_dim) -> tuple[int, int, int]:
  if isinstance(depth, bool) or depth not in DEPTHS:
    raise ValueError(f"depth must be one of {DEPTHS}, got depth={depth!r}")
  shape = tuple(input_shape) if isinstance(input_shape, Sequence) else None
  if (shape is None or len(shape) != 3
      or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape)):
    raise ValueError(f"input_shape must be (H, W, C) with positive integers, "
                     f"got input_shape={input_shape!r}")
  if shape[2] not in (1, 3):
    raise ValueError(f"input_shape must have C in (1, 3) channels (greyscale or RGB), "
                     f"got input_shape={input_shape!r}")
  if isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer)) \
      or embed_dim < 1:
    raise ValueError(f"embed_dim must be an integer >= 1, got embed_dim={embed_dim!r}")
  return tuple(int(s) for s in shape)


class ResNet(nnx.Module):
  """ResNet-18/50 backbone + linear embedding head: [B, H, W, C] -> [B, embed_dim].

  Guarantees: the output of each image depends on that image only (frozen BN);
  with ``normalize=True`` every output row has L2 norm 1 up to float rounding
  (``x / sqrt(|x|^2 + 1e-12)``, finite gradient at x = 0). The network is fully
  convolutional up to the global average pool, so any H, W >= 1 works; C must
  equal ``input_shape[2]``. Greyscale input is replicated to 3 channels first.

  Attributes mirror torchvision names: ``conv1``, ``bn1``, ``layer1`` ...
  ``layer4`` (``nnx.List`` of blocks), plus ``head`` (``nnx.Linear``, instead of
  torchvision's 1000-way ``fc``). ``feature_dim`` is 512 (18) or 2048 (50).
  """

  def __init__(self, depth: int, input_shape: Sequence[int], *, embed_dim: int = 128,
               normalize: bool = True, small_input: bool = False,
               mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD, rngs: nnx.Rngs):
    shape = _check_args(depth, input_shape, embed_dim)
    self.depth = int(depth)
    self.input_shape = shape
    self.in_channels = shape[2]
    self.embed_dim = int(embed_dim)
    self.normalize = bool(normalize)
    self.small_input = bool(small_input)
    self.mean = _check_stats("mean", mean)
    self.std = _check_stats("std", std)

    if self.small_input:
      self.conv1 = _conv(3, 64, 3, 1, rngs)
    else:
      self.conv1 = _conv(3, 64, 7, 2, rngs)
    self.bn1 = FrozenBatchNorm(64)
    kind, counts = _STAGES[self.depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    in_ch = 64
    for i, (width, n) in enumerate(zip(_WIDTHS, counts, strict=True)):
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block_cls(in_ch, width, stride, rngs=rngs))
        in_ch = width * block_cls.expansion
      setattr(self, f"layer{i + 1}", nnx.List(blocks))
    self.feature_dim = in_ch
    self.head = nnx.Linear(in_ch, self.embed_dim, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Backbone only: images [B, H, W, C] in [0, 1] -> pooled features [B, feature_dim]."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must have shape [B, H, W, {self.in_channels}] (the model's "
                       f"input_shape={self.input_shape}), got x.shape={x.shape}")
    if self.in_channels == 1:
      x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    if not self.small_input:
      # torchvision MaxPool2d(3, stride=2, padding=1). The Python -inf init value
      # makes JAX emit the ``reduce_window_max`` primitive (which ``interval.ibp``
      # bounds); an array init value would give a generic ``reduce_window``.
      x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                            ((0, 0), (1, 1), (1, 1), (0, 0)))
    for i in range(4):
      for block in getattr(self, f"layer{i + 1}"):
        x = block(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Images [B, H, W, C] in [0, 1] -> embeddings [B, embed_dim]."""
    e = self.head(self.features(x))
    if self.normalize:
      e = e / losses.safe_norm(e)[..., None]
    return e


def make_resnet(depth: int, input_shape: Sequence[int], *, embed_dim: int = 128,
                normalize: bool = True, small_input: bool | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                seed: int = 0) -> ResNet:
  """Builds a ResNet-``depth`` (18 or 50) for images of ``input_shape`` (H, W, C).

  ``small_input=None`` picks the 3x3/1 stem without max-pool when H <= 64.
  ``mean``/``std`` (1 or 3 per-channel values, pixels in [0, 1]) default to the
  ImageNet statistics, right for pretrained weights. Parameters are initialised
  from ``seed`` (He normal convs, identity BN, LeCun-normal head).
  """
  shape = _check_args(depth, input_shape, embed_dim)
  if small_input is None:
    small_input = shape[0] <= 64
  elif not isinstance(small_input, bool):
    raise ValueError(f"small_input must be True, False or None (auto: H <= 64), "
                     f"got small_input={small_input!r}")
  return ResNet(depth, shape, embed_dim=embed_dim, normalize=normalize,
                small_input=small_input,
                mean=IMAGENET_MEAN if mean is None else mean,
                std=IMAGENET_STD if std is None else std,
                rngs=nnx.Rngs(seed))


# --------------------------------------------------------------- freezing


def trainable_mask(params: Mapping[Any, Any], *, freeze_bn: bool = False) -> dict:
  """Pytree of bools shaped like ``params`` (the nested dict of ``models.split``).

  False for BN statistics (``mean``, ``var`` of every ``FrozenBatchNorm``); with
  ``freeze_bn=True`` also for the BN affine ``scale``/``bias``; True elsewhere.
  A BN layer is recognised as a dict with exactly the keys
  {scale, bias, mean, var}.
  """
  if not isinstance(params, Mapping):
    raise ValueError(f"params must be the nested dict of models.split(model), "
                     f"got {type(params).__name__}")

  def walk(node):
    if isinstance(node, Mapping):
      if set(node.keys()) == _BN_KEYS:
        return {k: (k in ("scale", "bias") and not freeze_bn) for k in node}
      return {k: walk(v) for k, v in node.items()}
    return True

  return walk(params)


def frozen_bn_optimizer(tx, params: Mapping[Any, Any], *, freeze_bn: bool = False):
  """Wraps optax ``tx`` so that BN statistics (and with ``freeze_bn`` the BN
  affine parameters) get a zero update, weight decay included.

  Uses ``optax.multi_transform`` with ``optax.set_to_zero`` on the frozen
  leaves. (``optax.masked`` alone would pass the raw gradient through for
  masked-out leaves instead of freezing them.)
  """
  import optax  # noqa: PLC0415

  labels = jax.tree.map(lambda t: "train" if t else "freeze",
                        trainable_mask(params, freeze_bn=freeze_bn))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# ------------------------------------------------- torchvision weight files


def _torch_names(model: ResNet) -> dict[str, tuple]:
  """torchvision ``state_dict`` name -> path (tuple of keys) in the pure dict."""
  rename = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
            "var": "running_var", "bias": "bias"}
  pure = nnx.to_pure_dict(nnx.state(model))
  names = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(pure)[0]:
    keys = tuple(p.key for p in path)
    names[".".join(str(k) for k in keys[:-1]) + "." + rename[keys[-1]]] = keys
  return names


def _to_torch(name: str, a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:  # HWIO -> OIHW
    return a.transpose(3, 2, 0, 1)
  if name == "head.weight":  # [in, out] -> [out, in]
    return a.T
  return a


def _from_torch(name: str, a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:  # OIHW -> HWIO
    return a.transpose(2, 3, 1, 0)
  if name == "head.weight":
    return a.T
  return a


def _infer_depth(keys) -> int | None:
  """Depth of a torchvision ResNet from its state-dict names (None: unknown)."""
  blocks = [set() for _ in range(4)]
  for k in keys:
    m = re.match(r"layer([1-4])\.(\d+)\.", k)
    if m:
      blocks[int(m.group(1)) - 1].add(int(m.group(2)))
  bottleneck = "layer1.0.conv3.weight" in keys
  return _TORCHVISION_LAYOUTS.get((bottleneck, tuple(len(b) for b in blocks)))


def _read_npz(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pretrained weights file not found: path={path!r}")
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError(f"it holds a single array of shape {np.shape(data)}")
    with data:
      arrays = {k: np.asarray(data[k]) for k in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
    raise ValueError(f"path={path!r} is not a valid .npz archive of named arrays "
                     f"(corrupt or wrong format): {e}") from e
  return arrays


def load_pretrained(model: ResNet, path: str | os.PathLike) -> list[str]:
  """Loads torchvision-named weights from the local ``.npz`` at ``path`` into
  ``model`` (in place) and returns the names of parameters left at init.

  Keys are torchvision ``state_dict`` names (conv weights OIHW, converted to
  HWIO); ``fc.*`` and ``*.num_batches_tracked`` are ignored. ``head.weight``
  [embed_dim, feature_dim] / ``head.bias`` (written by ``export_torchvision_npz``)
  are loaded when present, else left at init. For a ``small_input`` model a 7x7
  ImageNet ``conv1.weight`` does not fit the 3x3 stem and is left at init.
  Everything is checked before anything is written: on error the model is
  unchanged. Returns sorted torchvision-style names, e.g. ``['head.bias',
  'head.weight']``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a valid npz; weights of another depth; a missing or
      unexpected key; a shape mismatch (key, expected and got shapes, OIHW);
      a non-float array.
  """
  if not isinstance(model, ResNet):
    raise ValueError(f"model must be a jaxcert.resnet.ResNet, got {type(model).__name__}")
  path = os.fspath(path)
  arrays = _read_npz(path)
  arrays = {k: v for k, v in arrays.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  file_depth = _infer_depth(arrays)
  if file_depth is not None and file_depth != model.depth:
    raise ValueError(f"path={path!r} holds ResNet-{file_depth} weights, the model is "
                     f"ResNet-{model.depth}: depths must match")

  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  names = _torch_names(model)
  unexpected = sorted(set(arrays) - set(names))
  if unexpected:
    raise ValueError(f"path={path!r} has keys that ResNet-{model.depth} does not have: "
                     f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
  missing = sorted(n for n in names if n not in arrays and not n.startswith("head."))
  if missing:
    raise ValueError(f"path={path!r} lacks {len(missing)} key(s) of ResNet-{model.depth}: "
                     f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")

  updates, left = {}, []
  for name, keys in names.items():
    leaf = pure
    for k in keys:
      leaf = leaf[k]
    expected = tuple(_to_torch(name, np.empty(leaf.shape, np.uint8)).shape)
    if name not in arrays:
      left.append(name)
      continue
    got = arrays[name]
    if got.shape != expected:
      if name == "conv1.weight" and model.small_input:
        left.append(name)  # 7x7 ImageNet stem vs the 3x3 small-input stem
        continue
      raise ValueError(f"shape mismatch for key {name!r} in path={path!r}: expected "
                       f"{expected}, got {tuple(got.shape)}")
    if got.dtype.kind != "f":
      raise ValueError(f"key {name!r} in path={path!r} must hold floats, "
                       f"got dtype {got.dtype}")
    updates[keys] = jnp.asarray(_from_torch(name, got), leaf.dtype)

  for keys, value in updates.items():
    node = pure
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = value
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return sorted(left)


def export_torchvision_npz(model: ResNet, path: str | os.PathLike) -> list[str]:
  """Writes ``model``'s parameters and BN statistics to ``path`` (exactly that
  name, no suffix added) in the format ``load_pretrained`` reads: torchvision
  ``state_dict`` names and layouts (conv OIHW), plus ``head.weight``
  [embed_dim, feature_dim] and ``head.bias``. Returns the sorted key names.
  """
  if not isinstance(model, ResNet):
    raise ValueError(f"model must be a jaxcert.resnet.ResNet, got {type(model).__name__}")
  pure = nnx.to_pure_dict(nnx.state(model))
  arrays = {}
  for name, keys in _torch_names(model).items():
    leaf = pure
    for k in keys:
      leaf = leaf[k]
    arrays[name] = np.ascontiguousarray(_to_torch(name, np.asarray(leaf)))
  with open(os.fspath(path), "wb") as f:
    np.savez(f, **arrays)
  return sorted(arrays)
