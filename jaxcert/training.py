"""Training feature extractors (CBIR paper Sec. 4, 5.1.4).

Methods (``config.train.method``):

- ``triplet``: the triplet loss with margin ``train.margin``.
- ``act``: anti-collapse triplet adversarial training (Zhou et al.): PGD moves
  each triplet's positive and negative toward each other in feature space
  (``train.act_steps`` steps of ``train.act_step_size``, default ``2.5 eps /
  steps``, random start) inside the l_inf ball; the triplet loss is trained on
  them with the clean anchor.
- ``cibp``: a linear classification head on the embedding trained with
  ``kappa CE(clean) + (1 - kappa) CE(worst-case logits)`` from IBP, the
  specification folded into the head (elision, Gowal et al.; ``train.cibp_elision
  = False`` bounds the logits by plain IBP instead); the retrieval model is the
  embedding before the head.
- ``tbt``: Eq. 20, the triplet loss plus the bound-gap regulariser on the
  anchor's IBP box.
- ``fctb``: Eq. 21, fine-tuning a trained extractor f0 (``train.init_from``,
  its workdir) on pairs from the candidate set C (the same C that
  ``certify.py`` uses), with fixed eps and kappa.
- ``dml``: RetrievalGuard's metric learning (MATH.md B): the margin loss (Wu et
  al. 2017, ``train.gamma``) with a learnable boundary ``beta`` (init
  ``train.beta_init``, its own Adam learning rate ``train.beta_lr``) over every
  positive pair of a class-balanced batch (``train.classes_per_batch`` classes x
  ``batch_size / classes_per_batch`` images), negatives by distance-weighted
  sampling. Needs an L2-normalised embedding (``model.normalize``).
- ``gdml``: ``dml`` on Gaussian-noised images (independent noise of std
  ``train.noise_sigma`` per image), the model the smoothing certificates need.

eps ramps 0 -> ``train.eps`` and kappa 1 -> ``train.kappa`` between
``train.ramp_start`` and ``train.ramp_end`` (a step ramp when they are equal).

``train(config, workdir)`` is what ``train.py`` runs. It is resumable: the state
``{"params", "opt_state", "step"}`` is checkpointed with orbax every
``train.checkpoint_every`` steps, and a restarted run continues from the latest
checkpoint. Triplets of step ``s`` are drawn from ``numpy.random.default_rng((seed, s))``,
so a resumed run sees the same batches and ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcert import (
  attacks,
  linear_bounds,
  losses,
  metric_writer,
  models,
  parallel,
  report,
  validate,
)
from jaxcert import checkpoint as ckpt_lib
from jaxcert import data as data_lib
from jaxcert.interval import Interval, ibp, input_box

METHODS = ("triplet", "act", "cibp", "tbt", "fctb", "dml", "gdml")
MARGIN_METHODS = ("dml", "gdml")


# ---------------------------------------------------------------- schedules


def ramp(step, start: int, end: int, begin_value: float, end_value: float):
  """Linear ramp from begin_value (at/before ``start``) to end_value (at/after ``end``)."""
  step = jnp.asarray(step, jnp.float32)
  if end <= start:
    return jnp.where(step >= start, end_value, begin_value)
  frac = jnp.clip((step - start) / (end - start), 0.0, 1.0)
  return begin_value + frac * (end_value - begin_value)


def eps_schedule(cfg: ml_collections.ConfigDict) -> Callable[[Any], jax.Array]:
  """eps: 0 -> train.eps linearly between train.ramp_start and train.ramp_end."""
  return lambda s: ramp(s, cfg.ramp_start, cfg.ramp_end, 0.0, cfg.eps)


def kappa_schedule(cfg: ml_collections.ConfigDict) -> Callable[[Any], jax.Array]:
  """kappa: 1 -> train.kappa linearly between train.ramp_start and train.ramp_end."""
  return lambda s: ramp(s, cfg.ramp_start, cfg.ramp_end, 1.0, cfg.kappa)


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Adam learning rate times ``lr_decay`` at each step in ``lr_decay_steps``."""
  return optax.piecewise_constant_schedule(
      cfg.learning_rate, {int(s): float(cfg.lr_decay) for s in cfg.lr_decay_steps})


# ---------------------------------------------------------------- triplets


class TripletSampler:
  """Random (anchor, positive, negative) index triplets, deterministic per step.

  Positive: same class as the anchor, different image. Negative: another class.
  """

  def __init__(self, labels: np.ndarray, seed: int):
    labels = np.asarray(labels).astype(np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
      raise ValueError(f"triplet sampling needs at least 2 classes, got {len(classes)}")
    if counts.min() < 2:
      raise ValueError("triplet sampling needs at least 2 images per class, class "
                       f"{int(classes[counts.argmin()])} has {int(counts.min())}")
    self.seed = seed
    self.labels = labels
    self.classes = classes
    self.counts = counts
    self.class_pos = np.searchsorted(classes, labels)
    table = np.zeros((len(classes), counts.max()), np.int64)
    for i, c in enumerate(classes):
      table[i, :counts[i]] = np.flatnonzero(labels == c)
    self.table = table

  def __call__(self, step: int, batch_size: int) -> np.ndarray:
    """[3, batch_size] indices (anchor, positive, negative) for ``step``."""
    rng = np.random.default_rng((self.seed, int(step)))
    a = rng.integers(0, len(self.labels), batch_size)
    ca = self.class_pos[a]
    # positive: another image of the same class (uniform over the others)
    slot_a = np.argmax(self.table[ca] == a[:, None], axis=1)
    r = rng.integers(0, self.counts[ca] - 1)
    p = self.table[ca, r + (r >= slot_a)]
    cn = (ca + rng.integers(1, len(self.classes), batch_size)) % len(self.classes)
    n = self.table[cn, rng.integers(0, self.counts[cn])]
    return np.stack([a, p, n])


class PairSampler:
  """Random (c1, c2) index pairs from C x C with c1 != c2, deterministic per step (FCTB)."""

  def __init__(self, n: int, seed: int):
    if n < 2:
      raise ValueError(f"FCTB needs at least 2 candidates, got {n}")
    self.n, self.seed = n, seed

  def __call__(self, step: int, batch_size: int) -> np.ndarray:
    rng = np.random.default_rng((self.seed, 1, int(step)))
    i = rng.integers(0, self.n, batch_size)
    j = (i + rng.integers(1, self.n, batch_size)) % self.n
    return np.stack([i, j])


class ClassBalancedSampler:
  """Batches of ``classes`` random classes x ``per_class`` random images each
  (without replacement when the class has enough images), deterministic per step."""

  def __init__(self, labels: np.ndarray, seed: int, classes: int, per_class: int):
    labels = np.asarray(labels).astype(np.int64)
    self.classes, counts = np.unique(labels, return_counts=True)
    if classes > len(self.classes):
      raise ValueError(f"config.train.classes_per_batch={classes} exceeds the "
                       f"{len(self.classes)} classes of the training split")
    if per_class < 2:
      raise ValueError(f"class-balanced batches need >= 2 images per class: "
                       f"batch_size / classes_per_batch = {per_class}")
    if counts.min() < 2:
      raise ValueError("class-balanced sampling needs at least 2 images per class, "
                       f"class {int(self.classes[counts.argmin()])} has {int(counts.min())}")
    self.members = [np.flatnonzero(labels == c) for c in self.classes]
    self.seed, self.num, self.per = seed, classes, per_class

  def __call__(self, step: int, batch_size: int | None = None) -> np.ndarray:
    """[classes * per_class] indices for ``step``, grouped by class."""
    rng = np.random.default_rng((self.seed, 2, int(step)))
    picked = rng.choice(len(self.classes), self.num, replace=False)
    return np.concatenate([rng.choice(self.members[c], self.per,
                                      replace=len(self.members[c]) < self.per)
                           for c in picked])


# ---------------------------------------------------------------- train step


def init_head(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """C-IBP's linear head on the embedding: w [d, C] (LeCun normal), b [C] zeros."""
  d = config.model.embed_dim
  key = jax.random.fold_in(jax.random.key(config.seed), 7)
  w = jax.random.normal(key, (d, num_classes), jnp.float32) / np.sqrt(d)
  return {"w": w, "b": jnp.zeros((num_classes,), jnp.float32)}


def _trainable(state: dict) -> dict:
  return {k: state[k] for k in ("params", "head", "beta") if k in state}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the schedule of ``lr_schedule``; the margin loss's ``beta`` gets its own
  Adam with learning rate ``train.beta_lr``."""
  t = config.train
  main = optax.adam(lr_schedule(t))
  freeze = bool(config.model.freeze_bn) and config.model.arch.startswith("resnet")
  if t.method not in MARGIN_METHODS and not freeze:
    return main

  def labels(tree):
    out = {}
    for k, v in tree.items():
      if k == "beta":
        out[k] = jax.tree.map(lambda _: "beta", v)
      elif k == "params" and freeze:
        from jaxcert import resnet  # noqa: PLC0415
        out[k] = jax.tree.map(lambda m: "main" if m else "freeze",
                              resnet.trainable_mask(v, freeze_bn=True))
      else:
        out[k] = jax.tree.map(lambda _: "main", v)
    return out

  return optax.multi_transform({"main": main, "beta": optax.adam(t.beta_lr),
                                "freeze": optax.set_to_zero()}, labels)


def init_state(config: ml_collections.ConfigDict, params: dict,
               optimizer: optax.GradientTransformation) -> dict:
  """The checkpointed training state of ``config.train.method``.

  ``{"params", "opt_state", "step"}``, plus ``"head"`` (the classification head)
  for C-IBP; the optimizer state covers every trainable part.
  """
  state = {"params": params}
  if config.train.method == "cibp":
    state["head"] = init_head(config, data_lib.NUM_CLASSES[config.data.name])
  if config.train.method in MARGIN_METHODS:
    state["beta"] = jnp.asarray(config.train.beta_init, jnp.float32)
  state["opt_state"] = optimizer.init(_trainable(state))
  state["step"] = jnp.zeros((), jnp.int32)
  return state


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def make_train_step(apply, optimizer: optax.GradientTransformation, method: str,
                    cfg: ml_collections.ConfigDict, seed: int = 0, *,
                    mesh: jax.sharding.Mesh | None = None):
  """Jitted ``step(state, batch, eps, kappa) -> (state, metrics)``, data-parallel.

  ``metrics`` (scalars, not differentiated): ``loss``, the method's loss terms
  (triplet: ``triplet``; act: ``triplet``, ``collapse``; tbt: ``triplet``, ``reg``;
  fctb: ``keep``, ``reg``; cibp: ``ce_clean``, ``ce_robust``; dml/gdml: ``d_ap``,
  ``d_an``, ``beta``), ``box_width`` (tbt, fctb, cibp: mean width of the IBP feature
  box at ``eps``) and ``grad_norm`` (global l_2 norm of the gradient).

  ``batch`` by method (images float32 in [0, 1]):
  triplet/act/tbt: ``{"images": [3, B, H, W, C]}`` (anchor, positive, negative);
  cibp: ``{"images": [B, H, W, C], "labels": [B]}``;
  fctb: ``{"images": [2, B, H, W, C], "ref": [B, d]}`` (c1, c2 and f0(c1));
  dml/gdml: ``{"images": [B, H, W, C], "labels": [B]}`` (class-balanced).
  ``cfg`` is ``config.train``. ACT's random PGD start, the distance-weighted
  negatives and GDML's noise are keyed by (seed, step).

  Several devices (``mesh``, default :func:`jaxcert.parallel.current_mesh`): the B
  examples are split over the mesh axis ``data`` (B must be divisible by the device
  count), ``state`` is replicated; inside ``jax.shard_map`` each device computes the
  gradient of its examples' mean loss and ``pmean`` averages them, so every device
  applies the same update. GDML's noise and ACT's random starts are drawn for the
  whole batch before the split (threefry is partitionable: each device draws its own
  rows, with the values one device would draw), and the margin loss (dml/gdml) sees
  the features of the whole batch (``all_gather``): the step computes the same
  function on any number of devices, up to float summation order.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  margin = cfg.margin
  mesh = parallel.current_mesh() if mesh is None else mesh
  devices = mesh.shape[parallel.DATA]
  image_axis = 1 if method in ("triplet", "act", "tbt", "fctb") else 0

  def act_images(params, images, eps, start):
    steps = int(cfg.act_steps)
    size = cfg.act_step_size if cfg.act_step_size is not None else 2.5 * eps / steps

    def collapse(z):  # z [B, 2, ...]: (positive, negative) moved jointly
      f = apply(params, z.reshape((-1,) + z.shape[2:])).reshape(z.shape[0], 2, -1)
      return losses.collapse_distance(f[:, 0], f[:, 1])

    pn = jnp.stack([images[1], images[2]], axis=1)
    adv = attacks.pgd(collapse, pn, eps, steps=steps, step_size=size, start=start)
    adv = jax.lax.stop_gradient(adv)
    return jnp.stack([images[0], adv[:, 0], adv[:, 1]])

  def loss_fn(trainable, batch, eps, kappa):
    params = trainable["params"]
    images = batch["images"]
    box_of = lambda x: _training_box(lambda z: apply(params, z), x, eps, batch["step"])
    if method == "cibp":
      feats = apply(params, images)
      head = trainable["head"]
      box = box_of(images)
      loss, aux = losses.cibp_loss(feats, box, head["w"], head["b"],
                                   batch["labels"], kappa, elision=cfg.cibp_elision)
      return jnp.mean(loss), {**aux, "box_width": jnp.mean(box.upper - box.lower)}
    if method in MARGIN_METHODS:   # gdml: images arrive noised (see step)
      key = jax.random.fold_in(jax.random.key(seed), batch["step"])
      # the loss pairs examples across the whole batch: every device evaluates it on
      # the gathered features (the gradient reaches each device's own rows)
      gather = lambda v: (v if devices == 1 else
                          jax.lax.all_gather(v, parallel.DATA, axis=0, tiled=True))
      feats = gather(apply(params, images))
      return losses.margin_loss_batch(jax.random.fold_in(key, 2), feats,
                                      gather(batch["labels"]), trainable["beta"],
                                      cfg.gamma)
    if method == "fctb":
      b = images.shape[1]
      feats = apply(params, images.reshape((-1,) + images.shape[2:]))
      box = box_of(images[0])
      loss, aux = losses.fctb_loss(feats[:b], batch["ref"], feats[b:], box, kappa)
      return jnp.mean(loss), {**aux, "box_width": jnp.mean(box.upper - box.lower)}
    b = images.shape[1]
    feats = apply(params, images.reshape((-1,) + images.shape[2:]))
    fa, fp, fn = feats[:b], feats[b:2 * b], feats[2 * b:]
    if method in ("triplet", "act"):
      t = losses.triplet_loss(fa, fp, fn, margin)
      aux = {"triplet": jnp.mean(t)}
      if method == "act":   # d(f(p'), f(n')) after the attack that minimised it
        aux["collapse"] = jnp.mean(losses.collapse_distance(fp, fn))
      return jnp.mean(t), aux
    box = box_of(images[0])
    loss, aux = losses.tbt_loss(fa, fp, fn, box, kappa, margin)
    return jnp.mean(loss), {**aux, "box_width": jnp.mean(box.upper - box.lower)}

  def _training_box(f, x, eps, step):
    """IBP box, or with train.bound_method='crown_ibp' the CROWN-IBP/IBP mixture of
    Zhang et al. (2020): ``beta * crown_ibp + (1 - beta) * ibp`` (both sound, so is any
    convex combination), beta ramped crown_beta -> crown_beta_end with eps."""
    box = input_box(x, eps)
    if cfg.bound_method == "ibp":
      return ibp(f)(box)
    c = linear_bounds.linear_bounds(f, "crown_ibp", depth=cfg.crown_depth,
                                    intersect_ibp=False, image_chunk=x.shape[0])(box)
    if cfg.crown_beta == cfg.crown_beta_end == 1.0:   # pure CROWN-IBP: no IBP box needed
      return c
    b = ibp(f)(box)
    beta = ramp(step, cfg.ramp_start, cfg.ramp_end, cfg.crown_beta, cfg.crown_beta_end)
    return Interval(beta * c.lower + (1 - beta) * b.lower,
                    beta * c.upper + (1 - beta) * b.upper)

  def device_step(state, batch, eps, kappa):
    """One device's share: its rows of ``batch``; ``state`` replicated."""
    trainable = _trainable(state)
    if method == "act":   # the attack is not differentiated through
      batch = dict(batch)
      start = batch.pop("start")
      batch["images"] = act_images(state["params"], batch["images"], eps, start)
    # each device's own gradient (check_vma=False: no implicit psum), averaged here
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, batch, eps, kappa)
    if devices > 1:
      grads, loss, aux = jax.lax.pmean((grads, loss, aux), parallel.DATA)
    updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
    new_state = dict(optax.apply_updates(trainable, updates))
    new_state.update(opt_state=opt_state, step=state["step"] + 1)
    return new_state, {"loss": loss, **aux, "grad_norm": _global_norm(grads)}

  def step(state, batch, eps, kappa):
    size = batch["images"].shape[image_axis]
    if size % devices:
      raise ValueError(f"the batch of {size} examples must be divisible by the "
                       f"{devices} devices of the mesh (config.train.batch_size)")
    by_rows = lambda x: jax.lax.with_sharding_constraint(   # [B, ...] split over devices
        x, NamedSharding(mesh, parallel.batch_spec(x.ndim)))
    images = batch["images"]
    batch = dict(batch, step=state["step"])
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    if method == "gdml":   # noise of the whole batch, drawn row-sharded
      noise = jax.random.normal(jax.random.fold_in(key, 1), images.shape, images.dtype)
      batch["images"] = images + cfg.noise_sigma * by_rows(noise)
    if method == "act":    # pgd's random start (its key split), for the whole batch
      pn = jnp.stack([images[1], images[2]], axis=1)
      lo, hi = jnp.clip(pn - eps, 0.0, 1.0), jnp.clip(pn + eps, 0.0, 1.0)
      batch["start"] = by_rows(jax.random.uniform(jax.random.split(key)[1], pn.shape,
                                                  pn.dtype, lo, hi))
    if devices == 1:   # the same computation without the per-device wrapper
      return device_step(state, batch, eps, kappa)
    specs = {k: (P() if k == "step" else
                 parallel.batch_spec(v.ndim, image_axis if k == "images" else 0))
             for k, v in batch.items()}
    # check_vma=False: the IBP interpreter binds primitives on mixed replicated and
    # per-device operands, which the varying-axes type check rejects
    return jax.shard_map(device_step, mesh=mesh, in_specs=(P(), specs, P(), P()),
                         out_specs=(P(), P()), check_vma=False)(state, batch, eps, kappa)

  return jax.jit(step, donate_argnums=(0,))


# ---------------------------------------------------------------- config checks


def check_config(config: ml_collections.ConfigDict) -> None:
  t = config.train
  if t.method not in METHODS:
    raise ValueError(f"config.train.method must be one of {METHODS}, got {t.method!r}")
  validate.check_eps(t.eps, "config.train.eps")
  if not 0.0 <= t.kappa <= 1.0:
    raise ValueError(f"config.train.kappa must lie in [0, 1], got {t.kappa!r}")
  for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "max_to_keep"):
    if int(t[name]) < 1:
      raise ValueError(f"config.train.{name} must be >= 1, got {t[name]!r}")
  if t.ramp_start < 0 or t.ramp_end < t.ramp_start:
    raise ValueError("config.train.ramp_start/ramp_end must satisfy 0 <= start <= end, "
                     f"got {t.ramp_start!r}, {t.ramp_end!r}")
  if int(t.act_steps) < 1:
    raise ValueError(f"config.train.act_steps must be >= 1, got {t.act_steps!r}")
  if t.act_step_size is not None and not t.act_step_size > 0:
    raise ValueError(f"config.train.act_step_size must be > 0 or None, got "
                     f"{t.act_step_size!r}")
  if t.method == "cibp" and config.data.name not in data_lib.NUM_CLASSES:
    raise ValueError(f"config.train.method='cibp' needs a classification dataset "
                     f"({', '.join(data_lib.NUM_CLASSES)}), got data.name="
                     f"{config.data.name!r}")
  if t.bound_method not in ("ibp", "crown_ibp"):
    raise ValueError(f"config.train.bound_method must be 'ibp' or 'crown_ibp', got "
                     f"{t.bound_method!r}")
  if t.bound_method != "ibp" and t.method not in ("tbt", "fctb", "cibp"):
    raise ValueError(f"config.train.bound_method={t.bound_method!r} only affects the "
                     f"bounded methods tbt, fctb, cibp, got method={t.method!r}")
  for name in ("crown_beta", "crown_beta_end"):
    if not 0.0 <= float(t[name]) <= 1.0:
      raise ValueError(f"config.train.{name} must lie in [0, 1], got {t[name]!r}")
  if t.crown_depth is not None and int(t.crown_depth) < 1:
    raise ValueError(f"config.train.crown_depth must be None or >= 1, got "
                     f"{t.crown_depth!r}")
  if t.method == "fctb" and not t.init_from:
    raise ValueError("config.train.init_from is required for method 'fctb': the workdir "
                     "of the trained extractor f0 to fine-tune (e.g. a TBT run)")
  if not t.learning_rate > 0:
    raise ValueError(f"config.train.learning_rate must be > 0, got {t.learning_rate!r}")
  if t.method in MARGIN_METHODS:
    if not config.model.normalize:
      raise ValueError(f"config.train.method={t.method!r} (margin loss) needs an "
                       "L2-normalised embedding: set config.model.normalize=True")
    if int(t.classes_per_batch) < 2 or t.batch_size % int(t.classes_per_batch):
      raise ValueError(f"config.train.classes_per_batch={t.classes_per_batch!r} must be "
                       f">= 2 and divide config.train.batch_size={t.batch_size}")
    if not t.beta_lr > 0:
      raise ValueError(f"config.train.beta_lr must be > 0, got {t.beta_lr!r}")
    if t.method == "gdml" and not t.noise_sigma > 0:
      raise ValueError(f"config.train.noise_sigma must be > 0 for gdml, got "
                       f"{t.noise_sigma!r}")


# ---------------------------------------------------------------- loop


@dataclasses.dataclass
class TrainResult:
  params: dict
  graphdef: Any
  step: int
  metrics: dict


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


_TAG_GROUPS = {"eps": "schedule", "kappa": "schedule", "lr": "schedule",
               "lr_beta": "schedule", "steps_per_sec": "perf", "images_per_sec": "perf"}


def metric_tag(name: str) -> str:
  """TensorBoard tag of a ``metrics.csv`` column: ``schedule/``, ``perf/`` or ``train/``."""
  return f"{_TAG_GROUPS.get(name, 'train')}/{name}"


def _ordered_metrics(m: dict) -> dict:
  """Floats of ``m``: loss, the loss terms, then box_width and grad_norm (jit returns
  the keys sorted)."""
  tail = [k for k in ("box_width", "grad_norm") if k in m]
  keys = ["loss"] + [k for k in m if k != "loss" and k not in tail] + tail
  return {k: float(m[k]) for k in keys}


def images_per_step(method: str, batch_size: int) -> int:
  """Training images one step feeds the model: 3 per triplet (triplet, act, tbt), 2 per
  candidate pair (fctb), 1 per example (cibp, dml, gdml)."""
  return {"triplet": 3, "act": 3, "tbt": 3, "fctb": 2}.get(method, 1) * int(batch_size)


def build_model(config: ml_collections.ConfigDict, input_shape, *,
                log: Callable[[str], None] | None = None, pretrained: bool = True):
  """(graphdef, params) of ``config.model``; ResNets start from ``model.pretrained``
  (a torchvision-named .npz, see :mod:`jaxcert.resnet`) when it is set."""
  model = models.make_model(config.model.arch, input_shape,
                            embed_dim=config.model.embed_dim,
                            dataset=config.data.name, seed=config.seed,
                            normalize=config.model.normalize)
  if config.model.pretrained and pretrained:
    if not config.model.arch.startswith("resnet"):
      raise ValueError(f"config.model.pretrained={config.model.pretrained!r} needs a ResNet "
                       f"arch (resnet18 | resnet50), got arch={config.model.arch!r}")
    from jaxcert import resnet  # noqa: PLC0415
    left = resnet.load_pretrained(model, config.model.pretrained)
    if log is not None:
      log(f"loaded {config.model.pretrained}; left at init: {', '.join(left) or 'none'}")
  graphdef, params = models.split(model)
  return graphdef, params


def host_batch(method: str, images: np.ndarray, labels: np.ndarray, idx: np.ndarray,
               rows: slice = slice(None), ref: np.ndarray | None = None) -> dict:
  """The ``rows`` of the batch that the sampler drew (``idx``) for ``method``, on the host.

  images uint8 (as in ``images``: the caller divides by 255), labels int32; layouts as in
  :func:`make_train_step`. ``rows``: the examples this process feeds
  (:func:`jaxcert.parallel.process_rows`); ``ref`` [N, d]: FCTB's f0 features.
  """
  if method == "cibp" or method in MARGIN_METHODS:
    pick = idx[0][rows] if method == "cibp" else idx[rows]
    batch = {"images": images[pick], "labels": labels[pick].astype(np.int32)}
  else:
    batch = {"images": images[idx[:, rows]]}
  if ref is not None:
    batch["ref"] = ref[idx[0][rows]]
  return batch


def batch_specs(method: str, with_ref: bool = False) -> dict:
  """PartitionSpecs of :func:`host_batch`'s arrays: the example axis over ``data``."""
  specs = {"images": parallel.batch_spec(5, 1) if method in ("triplet", "act", "tbt", "fctb")
           else parallel.batch_spec(4)}
  if method == "cibp" or method in MARGIN_METHODS:
    specs["labels"] = parallel.batch_spec(1)
  if with_ref:
    specs["ref"] = parallel.batch_spec(2)
  return specs


def load_init(config: ml_collections.ConfigDict, init_dir: str, input_shape) -> dict:
  """Parameters of the extractor f0 that FCTB fine-tunes: the latest checkpoint of
  the run in ``init_dir`` (its ``config.json`` gives the method it was trained with).
  """
  cfg_path = os.path.join(init_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise ckpt_lib.CheckpointError(
        f"config.train.init_from={init_dir!r} has no config.json: it must be the workdir "
        "of a finished train.py run (e.g. the TBT model to fine-tune)")
  with open(cfg_path) as f:
    init_cfg = json.load(f)
  f0 = copy.deepcopy(config)
  for section, key in (("model", "arch"), ("model", "embed_dim"), ("data", "name")):
    theirs = init_cfg.get(section, {}).get(key)
    if theirs != config[section][key]:
      raise ValueError(f"config.train.init_from={init_dir!r} was trained with "
                       f"{section}.{key}={theirs!r}, this run has {config[section][key]!r}")
  f0.train.method = init_cfg.get("train", {}).get("method", "tbt")
  _, params, _ = load_trained(f0, init_dir, input_shape)
  return params


def train(config: ml_collections.ConfigDict, workdir: str, *,
          log: Callable[[str], None] = print) -> TrainResult:
  """Trains (or resumes) the feature extractor described by ``config`` in ``workdir``.

  Writes ``workdir/config.json``, orbax checkpoints under ``workdir/checkpoints``, and
  from process 0 the training scalars every ``train.log_every`` steps to
  ``workdir/metrics.csv`` and ``workdir/tensorboard/`` plus one record per launch to
  ``workdir/run_info.json`` (docs/LOGGING.md).
  Raises ``FloatingPointError`` naming the step if the loss becomes non-finite
  (the last good checkpoint is kept).

  Runs data-parallel on ``config.parallel.num_devices`` devices (None: all of every
  process; :func:`make_train_step`); with ``config.parallel.distributed`` it first
  joins the other processes (:func:`jaxcert.parallel.initialize`), and each process
  then feeds only its devices' rows of every batch.
  """
  parallel.initialize(config.parallel)   # before anything starts JAX
  check_config(config)
  t = config.train
  mesh = parallel.make_mesh(config.parallel.num_devices, name="config.parallel.num_devices")
  parallel.check_divisible(t.batch_size, mesh, "config.train.batch_size")
  rows = parallel.process_rows(mesh, t.batch_size)   # this process's rows of each batch
  if t.method == "fctb":   # Eq. 21 fine-tunes on the candidate set of certify.py
    split = data_lib.load_config_split(config.data, "test")
    _, c_idx = data_lib.query_candidate_split(split.labels, config.data.num_queries,
                                              config.data.num_candidates,
                                              config.data.split_seed)
    images, labels = split.images[c_idx], split.labels[c_idx]
    sampler = PairSampler(len(images), config.seed)
  else:
    split = data_lib.load_config_split(config.data, "train")
    images, labels = split.images, split.labels
    if t.method in MARGIN_METHODS:
      per = t.batch_size // int(t.classes_per_batch)
      sampler = ClassBalancedSampler(labels, config.seed, int(t.classes_per_batch), per)
    else:
      sampler = TripletSampler(labels, config.seed)
  graphdef, params = build_model(config, images.shape[1:], log=log)
  apply = models.apply_fn(graphdef)

  lr = lr_schedule(t)
  optimizer = make_optimizer(config)
  ref = None
  if t.method == "fctb":
    params = load_init(config, t.init_from, images.shape[1:])
    ref = models.embed(apply, params, data_lib.to_float(images), batch_size=250)  # f0(C)
  state = parallel.replicate(init_state(config, params, optimizer), mesh)

  os.makedirs(workdir, exist_ok=True)
  report.atomic_write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))

  eps_fn, kappa_fn = eps_schedule(t), kappa_schedule(t)
  step_fn = make_train_step(apply, optimizer, t.method, t, seed=config.seed, mesh=mesh)
  specs = batch_specs(t.method, ref is not None)
  metrics: dict = {}
  with (ckpt_lib.Checkpointer(workdir, max_to_keep=t.max_to_keep) as ckpt,
        contextlib.ExitStack() as cleanup):
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(state, latest)
      log(f"resumed from checkpoint at step {latest} in {workdir}")
    start = int(state["step"])
    # metrics and run records: process 0 only, and only when there is something to train
    primary = jax.process_index() == 0 and start < t.num_steps
    if primary:
      info = report.append_run_info(workdir, config, start_step=start,
                                    resumed=latest is not None)
    writer = cleanup.enter_context(metric_writer.MetricWriter(
        workdir, start_step=start, tag_of=metric_tag, enabled=primary))
    if primary:
      writer.write_text("run_info", f"```json\n{json.dumps(info, indent=2)}\n```", start)
    per_step = images_per_step(t.method, t.batch_size)
    if start >= t.num_steps:
      log(f"already trained: step {start} >= num_steps {t.num_steps}")
    what = (f"{len(images)} candidates, f0 from {t.init_from}" if t.method == "fctb"
            else f"{len(images)} images")
    log(f"training {config.model.arch} with {t.method} on {config.data.name} "
        f"({what}), steps {start}..{t.num_steps}, batch {t.batch_size}"
        + (f" over {mesh.size} devices" if mesh.size > 1 else ""))
    t0, s0 = time.perf_counter(), start
    t_last, s_last = t0, start
    for step in range(start, t.num_steps):
      batch = host_batch(t.method, images, labels, sampler(step, t.batch_size), rows, ref)
      batch = parallel.shard_batch(batch, mesh, specs, global_size=t.batch_size)
      batch["images"] = batch["images"].astype(jnp.float32) / 255.0   # on the devices
      eps, kappa = np.float32(eps_fn(step)), np.float32(kappa_fn(step))
      state, m = step_fn(state, batch, eps, kappa)
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss} at step {step} (eps={float(eps):.4g}, "
            f"kappa={float(kappa):.4g}); last good checkpoint: {ckpt.latest_step()}")
      done = step + 1
      if done % t.checkpoint_every == 0 or done == t.num_steps:
        ckpt.save(done, state)
      if done % t.log_every == 0 or done == t.num_steps:
        metrics = _ordered_metrics(m)
        now = time.perf_counter()
        rate = (done - s0) / max(now - t0, 1e-9)
        window = (done - s_last) / max(now - t_last, 1e-9)
        t_last, s_last = now, done
        writer.write(done, {    # the update step -> done and the schedule values it used
            **metrics, "eps": float(eps), "kappa": float(kappa), "lr": float(lr(step)),
            **({"lr_beta": float(t.beta_lr)} if t.method in MARGIN_METHODS else {}),
            "steps_per_sec": window, "images_per_sec": window * per_step})
        terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "loss")
        sched = {"triplet": "", "dml": "", "gdml": "",
                 "act": f"eps {float(eps):.4f} "}.get(
            t.method, f"eps {float(eps):.4f} kappa {float(kappa):.3f} ")
        log(f"step {done}/{t.num_steps} | loss {loss:.4f} ({terms}) | "
            f"{sched}lr {float(lr(step)):.1e} | "
            f"{rate:.1f} steps/s | ETA {_fmt_time((t.num_steps - done) / rate)}")
  return TrainResult(params=state["params"], graphdef=graphdef,
                     step=int(state["step"]), metrics=metrics)


def load_trained(config: ml_collections.ConfigDict, workdir: str, input_shape):
  """(graphdef, params, step) from the latest checkpoint in ``workdir``."""
  graphdef, params = build_model(config, input_shape, pretrained=False)
  target = init_state(config, params, make_optimizer(config))
  step, state = ckpt_lib.restore_latest(workdir, target)
  return graphdef, state["params"], step
