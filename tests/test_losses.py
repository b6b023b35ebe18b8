"""Training losses (Eq. 20, 21, ACT, C-IBP): exact values on hand-built cases, and every
method's train step lowers its loss on a tiny problem."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcert import attacks, losses, models, training
from jaxcert.config import base_config
from jaxcert.interval import Interval


def test_cibp_elision_hand_value():
  # d = 1, two classes, z = f w + b with w = [[1, -1]]: z_0 - z_1 = 2 f.
  w, b = jnp.array([[1.0, -1.0]]), jnp.zeros(2)
  box = Interval(jnp.array([[0.25]]), jnp.array([[0.75]]))
  worst = losses.elided_worst_logits(box, w, b, jnp.array([0]))
  np.testing.assert_allclose(worst, [[0.0, -0.5]], atol=1e-7)   # min of 2f over the box
  feats = jnp.array([[0.5]])
  loss, aux = losses.cibp_loss(feats, box, w, b, jnp.array([0]), 0.3)
  clean = np.log1p(np.exp(-1.0))          # CE with logits (0.5, -0.5), label 0
  robust = np.log1p(np.exp(-0.5))
  np.testing.assert_allclose(aux["ce_clean"], clean, rtol=1e-6)
  np.testing.assert_allclose(aux["ce_robust"], robust, rtol=1e-6)
  np.testing.assert_allclose(loss, [0.3 * clean + 0.7 * robust], rtol=1e-6)


class ElisionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_elision_is_the_exact_minimum_over_the_box(self):
    # the margin is linear in f, so its minimum over a box is at a vertex: brute force.
    rng = np.random.default_rng(0)
    d, ncls = 3, 4
    w = jnp.asarray(rng.normal(size=(d, ncls)), jnp.float32)
    b = jnp.asarray(rng.normal(size=ncls), jnp.float32)
    lo = rng.normal(size=(2, d)).astype(np.float32)
    hi = lo + rng.uniform(0, 1, (2, d)).astype(np.float32)
    labels = jnp.array([1, 3])
    fn = self.variant(losses.elided_worst_logits)
    worst = np.asarray(fn(Interval(jnp.asarray(lo), jnp.asarray(hi)), w, b, labels))
    for i in range(2):
      verts = np.array([[lo[i, k] if s[k] else hi[i, k] for k in range(d)]
                        for s in itertools.product([0, 1], repeat=d)])
      z = verts @ np.asarray(w) + np.asarray(b)
      want = -(z[:, int(labels[i])][:, None] - z).min(axis=0)
      np.testing.assert_allclose(worst[i], want, rtol=1e-5, atol=1e-5)
    # a point box: the worst-case CE is the clean CE (softmax is shift invariant)
    f = jnp.asarray(lo)
    _, aux = self.variant(losses.cibp_loss)(f, Interval(f, f), w, b, labels, 0.5)
    np.testing.assert_allclose(aux["ce_robust"], aux["ce_clean"], rtol=1e-5)


def test_cibp_without_elision_hand_value_and_order():
  # d = 1, w = [[1, 0.5]], f in [0.25, 0.75]: z0 - z1 = 0.5 f has exact minimum 0.125
  # (worst logit -0.125); without elision z1's upper bound minus z0's lower bound is
  # 0.375 - 0.25 = 0.125, as if f could be 0.25 and 0.75 at once.
  w, b = jnp.array([[1.0, 0.5]]), jnp.zeros(2)
  box = Interval(jnp.array([[0.25]]), jnp.array([[0.75]]))
  lab = jnp.array([0])
  np.testing.assert_allclose(losses.elided_worst_logits(box, w, b, lab), [[0.0, -0.125]],
                             atol=1e-7)
  np.testing.assert_allclose(losses.naive_worst_logits(box, w, b, lab), [[0.0, 0.125]],
                             atol=1e-7)
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=4), jnp.float32)
  lo = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  box = Interval(lo, lo + jnp.asarray(rng.uniform(0, 1, (6, 5)), jnp.float32))
  lab = jnp.asarray(rng.integers(0, 4, 6))
  naive = losses.naive_worst_logits(box, w, b, lab)
  exact = losses.elided_worst_logits(box, w, b, lab)
  assert bool(jnp.all(naive >= exact - 1e-5)) and bool(jnp.any(naive > exact + 1e-3))
  f = box.center
  _, a1 = losses.cibp_loss(f, box, w, b, lab, 0.5, elision=True)
  _, a2 = losses.cibp_loss(f, box, w, b, lab, 0.5, elision=False)
  assert float(a2["ce_robust"]) > float(a1["ce_robust"])


def test_fctb_loss_hand_value():
  f1 = jnp.array([[3.0, 4.0]])
  ref = jnp.zeros((1, 2))
  f2 = jnp.array([[3.0, 0.0]])
  loss, aux = losses.fctb_loss(f1, ref, f2, Interval(f1, f1), 0.2)
  np.testing.assert_allclose(aux["keep"], 5.0, rtol=1e-6)
  np.testing.assert_allclose(aux["reg"], 0.0, atol=1e-5)
  np.testing.assert_allclose(loss, [1.0], rtol=1e-5)
  # box [2, 4] x [3, 5] around f1; d(f1, f2) = 4; farthest point (2, 5) -> sqrt(26),
  # nearest (3, 3) -> 3: Reg = max(|4 - sqrt 26|, |4 - 3|) = 1.0990...
  box = Interval(jnp.array([[2.0, 3.0]]), jnp.array([[4.0, 5.0]]))
  loss, aux = losses.fctb_loss(f1, f1, f2, box, 0.0)
  np.testing.assert_allclose(aux["reg"], np.sqrt(26) - 4, rtol=1e-5)
  np.testing.assert_allclose(aux["keep"], 0.0, atol=1e-5)


def test_act_pgd_collapses_positive_and_negative_inside_the_ball(cnn):
  x = jax.random.uniform(jax.random.key(0), (6, 2, 8, 8, 1))
  eps = 0.1

  def collapse(z):
    f = cnn(z.reshape((-1, 8, 8, 1))).reshape(6, 2, -1)
    return losses.collapse_distance(f[:, 0], f[:, 1])

  adv = attacks.pgd(collapse, x, eps, steps=10, step_size=0.025, key=jax.random.key(1),
                    random_start=True)
  assert float(jnp.max(jnp.abs(adv - x))) <= eps + 1e-6
  assert float(adv.min()) >= 0 and float(adv.max()) <= 1
  before, after = collapse(x), collapse(adv)
  assert bool(jnp.all(after < before)), (before, after)
  assert float(jnp.mean(after)) < 0.7 * float(jnp.mean(before))


def _tiny(method):
  c = base_config()
  c.data.name = "fashion_mnist"
  c.model.arch = "small"
  c.model.embed_dim = 8
  c.train.method = method
  c.train.learning_rate = 3e-3
  c.train.act_steps = 3
  c.train.kappa = 0.5
  return c


@pytest.mark.parametrize("method", training.METHODS)
def test_every_method_lowers_its_loss_on_a_tiny_problem(method):
  cfg = _tiny(method)
  rng = np.random.default_rng(0)
  margin = method in training.MARGIN_METHODS
  graphdef, params = models.split(models.make_model("small", (12, 12, 1), embed_dim=8,
                                                    dataset="fashion_mnist",
                                                    normalize=margin))
  apply = models.apply_fn(graphdef)
  opt = optax.adam(cfg.train.learning_rate)
  state = training.init_state(cfg, params, opt)
  if method == "cibp":
    assert state["head"]["w"].shape == (8, 10)
  step = training.make_train_step(apply, opt, method, cfg.train)
  b = 16
  # two classes: dark and bright images
  labels = np.arange(b) % 2
  def imgs(lab):
    return np.clip(0.3 + 0.4 * lab[:, None, None, None]
                   + rng.normal(0, 0.1, (len(lab), 12, 12, 1)), 0, 1).astype(np.float32)
  if method == "cibp" or margin:
    batch = {"images": jnp.asarray(imgs(labels)), "labels": jnp.asarray(labels)}
  elif method == "fctb":
    x = imgs(labels)
    batch = {"images": jnp.asarray(np.stack([x, x[::-1]])), "ref": apply(params, x) + 0.5}
  else:
    batch = {"images": jnp.asarray(np.stack([imgs(labels), imgs(labels), imgs(1 - labels)]))}
  eps, kappa = 0.02, 0.5
  losses_seen = []
  for _ in range(40):
    state, m = step(state, batch, eps, kappa)
    losses_seen.append(float(m["loss"]))
  assert np.all(np.isfinite(losses_seen))
  assert np.mean(losses_seen[-5:]) < 0.6 * np.mean(losses_seen[:2]), losses_seen


def test_pair_sampler_is_deterministic_and_never_pairs_an_image_with_itself():
  s = training.PairSampler(5, seed=3)
  a, b = s(7, 200), s(7, 200)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2, 200) and np.all(a[0] != a[1]) and a.max() < 5 and a.min() >= 0
  assert not np.array_equal(s(8, 200), a)
  with pytest.raises(ValueError, match="at least 2 candidates"):
    training.PairSampler(1, 0)


def test_margin_loss_hand_values():
  # [gamma + d_ap - beta]_+ + [gamma - d_an + beta]_+ with gamma 0.2, beta 1.2
  d_ap = jnp.array([0.5, 1.3, 1.1])
  d_an = jnp.array([1.8, 1.3, 1.35])
  got = losses.margin_loss(d_ap, d_an, jnp.float32(1.2), 0.2)
  np.testing.assert_allclose(got, [0.0, 0.3 + 0.1, 0.1 + 0.05], atol=1e-6)


def test_distance_weighted_sampling_weights_and_negatives():
  d = jnp.array([0.2, 0.5, 1.0, 1.39, 1.41])
  logw = losses.distance_weighted_log_weights(d, dim=16)
  # clipped below at 0.5, zero past 1.4, and 1/q(D) = D^-(d-2) (1 - D^2/4)^-(d-3)/2
  want = lambda x: -(14 * np.log(x) + 6.5 * np.log(1 - x * x / 4))
  np.testing.assert_allclose(logw[:4], [want(0.5), want(0.5), want(1.0), want(1.39)],
                             rtol=1e-5)
  assert logw[4] == -jnp.inf
  # 4 classes x 3 unit vectors: the sampled negative is never of the anchor's class,
  # and closer negatives (inside 1.4) are drawn more often than far ones
  rng = np.random.default_rng(0)
  f = rng.normal(size=(12, 16)).astype(np.float32)
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  labels = jnp.repeat(jnp.arange(4), 3)
  loss, aux = losses.margin_loss_batch(jax.random.key(0), jnp.asarray(f), labels,
                                       jnp.float32(1.2))
  assert np.isfinite(float(loss)) and float(aux["d_ap"]) > 0
  dist = np.linalg.norm(f[:, None] - f[None], axis=-1)
  keys = jax.random.split(jax.random.key(1), 200)
  logits = losses.distance_weighted_log_weights(jnp.asarray(dist), 16)
  logits = jnp.where(labels[:, None] == labels[None], -jnp.inf, logits)
  draws = jax.vmap(lambda k: jax.random.categorical(k, logits))(keys)
  assert not np.any(np.asarray(labels)[np.asarray(draws)] == np.asarray(labels)[None])


def test_class_balanced_sampler():
  labels = np.repeat(np.arange(6), [5, 5, 5, 5, 5, 1])
  with pytest.raises(ValueError, match="at least 2 images per class"):
    training.ClassBalancedSampler(labels, 0, 3, 4)
  labels = np.repeat(np.arange(6), [5, 5, 5, 5, 5, 3])
  s = training.ClassBalancedSampler(labels, 0, 3, 4)
  idx = s(11)
  np.testing.assert_array_equal(idx, s(11))
  groups = labels[idx].reshape(3, 4)
  assert len(set(groups[:, 0])) == 3 and np.all(groups == groups[:, :1])
  with pytest.raises(ValueError, match="classes_per_batch=7 exceeds the 6 classes"):
    training.ClassBalancedSampler(labels, 0, 7, 2)
