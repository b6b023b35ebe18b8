"""Training feature extractors: Triplet and TBT (CBIR paper Sec. 4.1, Eq. 20).

``train(config, workdir)`` is what ``train.py`` runs. It is resumable: the state
``{"params", "opt_state", "step"}`` is checkpointed with orbax every
``train.checkpoint_every`` steps, and a restarted run continues from the latest
checkpoint. Triplets of step ``s`` are drawn from ``numpy.random.default_rng((seed, s))``,
so a resumed run sees the same batches and ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxcert import checkpoint as ckpt_lib
from jaxcert import data as data_lib
from jaxcert import losses, models, validate
from jaxcert.interval import ibp, input_box

METHODS = ("triplet", "tbt")


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


# ---------------------------------------------------------------- train step


def make_train_step(apply, optimizer: optax.GradientTransformation, method: str,
                    margin: float):
  """Jitted ``step(state, images, eps, kappa) -> (state, metrics)``.

  images: float32 [3, B, H, W, C] (anchor, positive, negative) in [0, 1].
  TBT: Eq. 20 with the anchor's IBP box at ``eps``; Triplet: margin loss only.
  """

  def loss_fn(params, images, eps, kappa):
    b = images.shape[1]
    feats = apply(params, images.reshape((-1,) + images.shape[2:]))
    fa, fp, fn = feats[:b], feats[b:2 * b], feats[2 * b:]
    if method == "triplet":
      t = losses.triplet_loss(fa, fp, fn, margin)
      return jnp.mean(t), {"triplet": jnp.mean(t)}
    box = ibp(lambda x: apply(params, x))(input_box(images[0], eps))
    loss, aux = losses.tbt_loss(fa, fp, fn, box, kappa, margin)
    return jnp.mean(loss), aux

  def step(state, images, eps, kappa):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], images, eps, kappa)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, **aux}

  return jax.jit(step, donate_argnums=(0,))


# ---------------------------------------------------------------- config checks


def check_config(config: ml_collections.ConfigDict) -> None:
  t = config.train
  if t.method not in METHODS:
    raise ValueError(f"config.train.method must be one of {METHODS}, got {t.method!r} "
                     "(act, cibp and fctb are not implemented yet)")
  validate.check_eps(t.eps, "config.train.eps")
  if not 0.0 <= t.kappa <= 1.0:
    raise ValueError(f"config.train.kappa must lie in [0, 1], got {t.kappa!r}")
  for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "max_to_keep"):
    if int(t[name]) < 1:
      raise ValueError(f"config.train.{name} must be >= 1, got {t[name]!r}")
  if t.ramp_start < 0 or t.ramp_end < t.ramp_start:
    raise ValueError("config.train.ramp_start/ramp_end must satisfy 0 <= start <= end, "
                     f"got {t.ramp_start!r}, {t.ramp_end!r}")
  if not t.learning_rate > 0:
    raise ValueError(f"config.train.learning_rate must be > 0, got {t.learning_rate!r}")


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


def build_model(config: ml_collections.ConfigDict, input_shape):
  model = models.make_model(config.model.arch, input_shape,
                            embed_dim=config.model.embed_dim,
                            dataset=config.data.name, seed=config.seed)
  graphdef, params = models.split(model)
  return graphdef, params


def train(config: ml_collections.ConfigDict, workdir: str, *,
          log: Callable[[str], None] = print) -> TrainResult:
  """Trains (or resumes) the feature extractor described by ``config`` in ``workdir``.

  Writes ``workdir/config.json`` and orbax checkpoints under ``workdir/checkpoints``.
  Raises ``FloatingPointError`` naming the step if the loss becomes non-finite
  (the last good checkpoint is kept).
  """
  check_config(config)
  t = config.train
  split = data_lib.load(config.data.name, "train", data_dir=config.data.data_dir,
                        source_dir=config.data.source_dir)
  images = split.images
  sampler = TripletSampler(split.labels, config.seed)
  graphdef, params = build_model(config, images.shape[1:])
  apply = models.apply_fn(graphdef)

  lr = lr_schedule(t)
  optimizer = optax.adam(lr)
  state = {"params": params, "opt_state": optimizer.init(params),
           "step": jnp.zeros((), jnp.int32)}

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))

  eps_fn, kappa_fn = eps_schedule(t), kappa_schedule(t)
  step_fn = make_train_step(apply, optimizer, t.method, t.margin)
  metrics: dict = {}
  with ckpt_lib.Checkpointer(workdir, max_to_keep=t.max_to_keep) as ckpt:
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(state, latest)
      log(f"resumed from checkpoint at step {latest} in {workdir}")
    start = int(state["step"])
    if start >= t.num_steps:
      log(f"already trained: step {start} >= num_steps {t.num_steps}")
    log(f"training {config.model.arch} with {t.method} on {config.data.name} "
        f"({len(images)} images), steps {start}..{t.num_steps}, batch {t.batch_size}")
    t0, s0 = time.perf_counter(), start
    for step in range(start, t.num_steps):
      idx = sampler(step, t.batch_size)
      batch = jnp.asarray(images[idx], jnp.float32) / 255.0
      eps, kappa = eps_fn(step), kappa_fn(step)
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
        metrics = {k: float(v) for k, v in m.items()}
        rate = (done - s0) / max(time.perf_counter() - t0, 1e-9)
        terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "loss")
        sched = (f"eps {float(eps):.4f} kappa {float(kappa):.3f} "
                 if t.method == "tbt" else "")
        log(f"step {done}/{t.num_steps} | loss {loss:.4f} ({terms}) | "
            f"{sched}lr {float(lr(step)):.1e} | "
            f"{rate:.1f} steps/s | ETA {_fmt_time((t.num_steps - done) / rate)}")
  return TrainResult(params=state["params"], graphdef=graphdef,
                     step=int(state["step"]), metrics=metrics)


def load_trained(config: ml_collections.ConfigDict, workdir: str, input_shape):
  """(graphdef, params, step) from the latest checkpoint in ``workdir``."""
  graphdef, params = build_model(config, input_shape)
  optimizer = optax.adam(lr_schedule(config.train))
  target = {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32)}
  step, state = ckpt_lib.restore_latest(workdir, target)
  return graphdef, state["params"], step
