"""Soundness and tightness of the CROWN / CROWN-IBP bound transform."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcert import config as config_lib
from jaxcert import models, training
from jaxcert.interval import Interval, ibp, input_box
from jaxcert.linear_bounds import linear_bounds

DN = ("NHWC", "HWIO", "NHWC")


def random_mlp(key, sizes=(6, 20, 20, 5), scale=1.0):
  ks = jax.random.split(key, 2 * len(sizes))
  ws = [jax.random.normal(ks[2 * i], (a, b)) * scale / np.sqrt(a)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
  bs = [jax.random.normal(ks[2 * i + 1], (b,)) * 0.1 for i, b in enumerate(sizes[1:])]

  def f(x):
    h = (x - 0.4) / 0.3
    for w, b in zip(ws[:-1], bs[:-1], strict=True):
      h = jax.nn.relu(h @ w + b)
    return h @ ws[-1] + bs[-1]

  return f


def random_convnet(key):
  k = jax.random.split(key, 6)
  w1 = jax.random.normal(k[0], (3, 3, 1, 4)) * 0.5
  b1 = jax.random.normal(k[1], (4,)) * 0.1
  w2 = jax.random.normal(k[2], (3, 3, 4, 6)) * 0.3
  w3 = jax.random.normal(k[3], (4 * 4 * 6, 12)) * 0.2
  w4 = jax.random.normal(k[4], (12, 7)) * 0.3

  def f(x):  # [B, 8, 8, 1] -> [B, 7]
    h = jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=DN) + b1
    h = jnp.maximum(h, 0.0)  # a ReLU written as max(x, 0)
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, w2, (2, 2), "SAME",
                                                 dimension_numbers=DN))
    h = jax.nn.relu(h.reshape(h.shape[0], -1) @ w3)
    return h @ w4

  return f


def pgd_extremes(f, box: Interval, steps=60, starts=4, seed=0):
  """Per output coordinate, PGD minimum and maximum of f over the box: ([B, d], [B, d]).

  Every (start, sign, coordinate) is its own sign-gradient ascent, all run at once.
  """
  d = f(box.lower).shape[-1]
  step = (box.upper - box.lower) / 10

  @jax.jit
  def run(x0, sign, j):
    obj = lambda x: sign * jnp.sum(f(x)[:, j])
    body = lambda _, x: jnp.clip(x + step * jnp.sign(jax.grad(obj)(x)), box.lower,
                                 box.upper)
    return f(jax.lax.fori_loop(0, steps, body, x0))[:, j]

  keys = jax.random.split(jax.random.key(seed), starts)
  x0 = jax.vmap(lambda k: jax.random.uniform(k, box.lower.shape, minval=box.lower,
                                             maxval=box.upper))(keys)
  js = jnp.arange(d)
  over = jax.vmap(jax.vmap(run, (None, None, 0)), (0, None, None))  # [starts, d, B]
  hi = jnp.max(over(x0, 1.0, js), axis=0).T
  lo = jnp.min(over(x0, -1.0, js), axis=0).T
  return lo, hi


def assert_contains(box: Interval, y, atol=1e-5):
  chex.assert_trees_all_equal(bool(jnp.all(y >= box.lower - atol)), True)
  chex.assert_trees_all_equal(bool(jnp.all(y <= box.upper + atol)), True)


def test_single_relu_layer_exact_values():
  # |x| = relu(x) + relu(-x) on [-1, 1]: IBP gives [0, 2]; the chord relaxation gives
  # relu(x) <= (x + 1) / 2 and relu(-x) <= (1 - x) / 2, whose sum is exactly 1.
  f = lambda x: jnp.sum(jax.nn.relu(jnp.concatenate([x, -x], -1)), -1, keepdims=True)
  box = Interval(jnp.array([[-1.0]]), jnp.array([[1.0]]))
  i = ibp(f)(box)
  chex.assert_trees_all_close((i.lower, i.upper), (jnp.array([[0.0]]), jnp.array([[2.0]])))
  for method in ("crown_ibp", "crown"):
    b = linear_bounds(f, method, intersect_ibp=False)(box)
    chex.assert_trees_all_close((b.lower, b.upper),
                                (jnp.array([[0.0]]), jnp.array([[1.0]])))
  # Asymmetric box [-1, 3]: chord slopes 3/4 and 1/4; upper 3/4*3+3/4 = 3 at x = 3
  # (exact), lower: adaptive slope 1 for relu(x) (u > -l), 0 for relu(-x): x >= -1.
  box = Interval(jnp.array([[-1.0]]), jnp.array([[3.0]]))
  b = linear_bounds(f, "crown_ibp", intersect_ibp=False)(box)
  chex.assert_trees_all_close((b.lower, b.upper), (jnp.array([[-1.0]]), jnp.array([[3.0]])))
  b = linear_bounds(f, "crown_ibp")(box)  # intersected with IBP's [0, 4]
  chex.assert_trees_all_close((b.lower, b.upper), (jnp.array([[0.0]]), jnp.array([[3.0]])))


def test_affine_network_is_exact():
  w = jax.random.normal(jax.random.key(3), (4, 3))
  f = lambda x: (x - 0.5) @ w * 2.0 + 1.0
  x = jax.random.uniform(jax.random.key(4), (2, 4))
  box = input_box(x, 0.1)
  b = linear_bounds(f, "crown_ibp")(box)
  c = f(x * 0 + box.center)
  r = (box.radius @ jnp.abs(w)) * 2.0
  chex.assert_trees_all_close((b.lower, b.upper), (c - r, c + r), atol=1e-5)


@pytest.mark.parametrize("method", ["crown_ibp", "crown"])
@pytest.mark.parametrize("intersect", [True, False])
def test_mlp_sound_against_sampling_vertices_and_pgd(method, intersect):
  f = random_mlp(jax.random.key(0), scale=1.5)
  x = jax.random.uniform(jax.random.key(1), (3, 6))
  box = input_box(x, 0.08)
  b = jax.jit(linear_bounds(f, method, intersect_ibp=intersect))(box)
  pts = jax.random.uniform(jax.random.key(2), (3000,) + x.shape, minval=box.lower,
                           maxval=box.upper)
  assert_contains(b, jax.vmap(f)(pts))
  corners = jnp.array(np.unpackbits(np.arange(64, dtype=np.uint8)[:, None], axis=1)[:, 2:],
                      dtype=jnp.float32)  # all 2^6 vertices
  verts = box.lower[None] + corners[:, None, :] * (box.upper - box.lower)[None]
  assert_contains(b, jax.vmap(f)(verts))
  lo, hi = pgd_extremes(f, box)
  assert_contains(b, lo)
  assert_contains(b, hi)


def test_tighter_than_ibp_on_random_networks():
  ratios = {}
  for name, f, shape in (("mlp", random_mlp(jax.random.key(5), scale=1.5), (4, 6)),
                         ("cnn", random_convnet(jax.random.key(6)), (2, 8, 8, 1))):
    x = jax.random.uniform(jax.random.key(7), shape)
    box = input_box(x, 0.05)
    i = ibp(f)(box)
    for method in ("crown_ibp", "crown"):
      b = linear_bounds(f, method)(box)
      # Intersected with IBP: inside IBP's box, coordinate by coordinate.
      assert bool(jnp.all(b.lower >= i.lower)) and bool(jnp.all(b.upper <= i.upper))
      raw = linear_bounds(f, method, intersect_ibp=False)(box)
      ratios[name, method] = float(jnp.mean(raw.width) / jnp.mean(i.width))
  # The raw back-substituted boxes alone are much tighter than IBP on these nets.
  assert ratios["mlp", "crown_ibp"] < 0.8, ratios
  assert ratios["cnn", "crown_ibp"] < 0.8, ratios
  assert ratios["mlp", "crown"] <= ratios["mlp", "crown_ibp"] + 1e-6, ratios
  assert ratios["cnn", "crown"] < 0.5, ratios


def test_convnet_sound_against_sampling_and_pgd():
  f = random_convnet(jax.random.key(8))
  x = jax.random.uniform(jax.random.key(9), (2, 8, 8, 1))
  box = input_box(x, 0.03)
  for method in ("crown_ibp", "crown"):
    b = jax.jit(linear_bounds(f, method, intersect_ibp=False))(box)
    pts = jax.random.uniform(jax.random.key(10), (1000,) + x.shape, minval=box.lower,
                             maxval=box.upper)
    assert_contains(b, jax.vmap(f)(pts))
    lo, hi = pgd_extremes(f, box, steps=40, starts=2)
    assert_contains(b, lo)
    assert_contains(b, hi)


def test_brute_force_on_a_two_input_network():
  f = random_mlp(jax.random.key(11), sizes=(2, 12, 12, 3), scale=2.0)
  box = Interval(jnp.array([[0.2, 0.5]]), jnp.array([[0.6, 0.7]]))
  g = jnp.stack(jnp.meshgrid(jnp.linspace(0.2, 0.6, 401), jnp.linspace(0.5, 0.7, 401)),
                -1).reshape(-1, 2)
  y = f(g)
  true_lo, true_hi = jnp.min(y, 0), jnp.max(y, 0)
  for method in ("crown_ibp", "crown"):
    b = linear_bounds(f, method, intersect_ibp=False)(box)
    assert bool(jnp.all(b.lower[0] <= true_lo + 1e-5)), (method, b.lower, true_lo)
    assert bool(jnp.all(b.upper[0] >= true_hi - 1e-5)), (method, b.upper, true_hi)
  # Over-approximation factor (box width / true range), worst coordinate: full CROWN is
  # within 4x on this net, CROWN-IBP and IBP are looser.
  factor = {m: float(jnp.max(linear_bounds(f, m)(box).width[0] / (true_hi - true_lo)))
            for m in ("ibp", "crown_ibp", "crown")}
  assert factor["crown"] < 4.0 and factor["crown"] < factor["crown_ibp"] < factor["ibp"], factor


def test_depth_one_equals_ibp_and_depth_bounds_are_sound():
  f = random_mlp(jax.random.key(12), sizes=(6, 16, 16, 16, 4), scale=1.5)
  x = jax.random.uniform(jax.random.key(13), (3, 6))
  box = input_box(x, 0.1)
  i = ibp(f)(box)
  # Depth 1: the last (affine) layer over IBP's box of its input -- IBP's own output box.
  b1 = linear_bounds(f, "crown_ibp", depth=1, intersect_ibp=False)(box)
  chex.assert_trees_all_close((b1.lower, b1.upper), (i.lower, i.upper), rtol=1e-5,
                              atol=1e-5)
  pts = jax.vmap(f)(jax.random.uniform(jax.random.key(14), (2000,) + x.shape,
                                       minval=box.lower, maxval=box.upper))
  widths = []
  for depth in (2, 3, None):
    b = linear_bounds(f, "crown_ibp", depth=depth, intersect_ibp=False)(box)
    assert_contains(b, pts)
    widths.append(float(jnp.mean(b.width)))
  assert widths[0] < float(jnp.mean(i.width)), widths


def small_model():
  c = config_lib.base_config()
  c.model.arch = "small"
  graphdef, params = training.build_model(c, (28, 28, 1))
  return models.apply_fn(graphdef), params


def test_small_cnn_model_chunking_and_gradients():
  apply, params = small_model()
  x = jax.random.uniform(jax.random.key(15), (3, 28, 28, 1))
  box = input_box(x, 0.004)
  f = lambda z: apply(params, z)
  b = jax.jit(linear_bounds(f, "crown_ibp", image_chunk=2, row_chunk=256))(box)
  b2 = jax.jit(linear_bounds(f, "crown_ibp", image_chunk=1, row_chunk=100))(box)
  chex.assert_trees_all_close((b.lower, b.upper), (b2.lower, b2.upper), rtol=1e-5,
                              atol=1e-5)
  pts = jax.random.uniform(jax.random.key(16), (50,) + x.shape, minval=box.lower,
                           maxval=box.upper)
  assert_contains(b, jax.vmap(f)(pts), atol=1e-4)
  i = ibp(f)(box)
  assert float(jnp.mean(b.width)) < 0.9 * float(jnp.mean(i.width))

  def width(p):
    bb = linear_bounds(lambda z: apply(p, z), "crown_ibp", depth=2)(box)
    return jnp.mean(bb.width)

  grads = jax.grad(width)(params)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0


def test_unsupported_networks_and_bad_arguments():
  w = jnp.ones((3, 3))
  box = input_box(jnp.zeros((1, 3)) + 0.5, 0.1)
  residual = lambda x: jax.nn.relu(x @ w) @ w + x
  with pytest.raises(NotImplementedError, match="residual"):
    linear_bounds(residual)(box)
  with pytest.raises(NotImplementedError, match="tanh"):
    linear_bounds(lambda x: jnp.tanh(x @ w) @ w)(box)
  with pytest.raises(NotImplementedError, match="'mul'"):
    linear_bounds(lambda x: (x * x) @ w)(box)
  with pytest.raises(NotImplementedError, match="convert_element_type"):  # rounds to ints
    linear_bounds(lambda x: jax.nn.relu(x @ w).astype(jnp.int32).astype(jnp.float32))(box)
  with pytest.raises(NotImplementedError, match="reduce_window_max"):  # max pooling
    linear_bounds(lambda x: jax.lax.reduce_window(
        jax.nn.relu(x @ w), -jnp.inf, jax.lax.max, (1, 3), (1, 1), "VALID"))(box)
  with pytest.raises(ValueError, match="method must be one of"):
    linear_bounds(lambda x: x, "deeppoly")
  with pytest.raises(ValueError, match="image_chunk"):
    linear_bounds(lambda x: x, image_chunk=0)
  with pytest.raises(ValueError, match="depth"):
    linear_bounds(lambda x: x, depth=0)
  with pytest.raises(TypeError, match="Interval"):
    linear_bounds(lambda x: x)(jnp.zeros((1, 3)))


def test_tbt_training_with_crown_ibp_bounds():
  import optax  # noqa: PLC0415

  def run(bound_method, beta, steps):
    c = config_lib.base_config()
    c.model.arch = "small"
    c.model.embed_dim = 8
    c.train.method = "tbt"
    c.train.bound_method = bound_method
    c.train.crown_beta = beta
    c.train.crown_beta_end = beta
    c.train.ramp_start = c.train.ramp_end = 0
    training.check_config(c)
    graphdef, params = models.split(models.make_model("small", (12, 12, 1), embed_dim=8,
                                                      dataset="fashion_mnist"))
    apply = models.apply_fn(graphdef)
    opt = optax.adam(3e-3)
    state = training.init_state(c, params, opt)
    step = training.make_train_step(apply, opt, "tbt", c.train)
    rng = np.random.default_rng(0)
    lab = np.arange(8) % 2
    imgs = lambda y: np.clip(0.3 + 0.4 * y[:, None, None, None]
                             + rng.normal(0, 0.1, (len(y), 12, 12, 1)), 0, 1).astype(np.float32)
    batch = {"images": jnp.asarray(np.stack([imgs(lab), imgs(lab), imgs(1 - lab)]))}
    seen = []
    for _ in range(steps):
      state, m = step(state, batch, 0.05, 0.5)
      seen.append({k: float(v) for k, v in m.items()})
    return seen

  ibp_run = run("ibp", 1.0, 2)
  # beta = 0: the mixture is exactly the IBP box.
  zero = run("crown_ibp", 0.0, 2)
  for a, b in zip(ibp_run, zero, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
    np.testing.assert_allclose(b["box_width"], a["box_width"], rtol=1e-6)
  crown = run("crown_ibp", 1.0, 25)
  # Untrained Small net: CROWN-IBP's box is much narrower than IBP's ...
  assert crown[0]["box_width"] < 0.8 * ibp_run[0]["box_width"], (crown[0], ibp_run[0])
  # ... and training with it lowers the loss.
  assert np.mean([s["loss"] for s in crown[-3:]]) < 0.7 * crown[0]["loss"]
  c = config_lib.base_config()
  c.train.bound_method = "crown"
  with pytest.raises(ValueError, match="bound_method"):
    training.check_config(c)
  c.train.bound_method = "crown_ibp"
  c.train.method = "triplet"
  with pytest.raises(ValueError, match="only affects"):
    training.check_config(c)


def test_review_findings_stay_fixed():
  """Cases an adversarial review found; each gave a box that missed the true value."""
  k = jax.random.split(jax.random.key(20), 3)
  w, v = jax.random.normal(k[0], (3, 4)), jax.random.normal(k[1], (4, 2))
  box = input_box(jnp.full((2, 3), 0.5), 0.1)
  pts = jax.random.uniform(k[2], (500, 2, 3), minval=box.lower, maxval=box.upper)

  # A user function that is merely *named* relu (with a bias argument) is not a ReLU.
  @jax.jit
  def relu(x, bias):
    return jnp.maximum(x + bias, 0)
  f = lambda z: relu(z @ w, 5.0) @ v
  for method in ("crown_ibp", "crown"):
    assert_contains(linear_bounds(f, method)(box), jax.vmap(f)(pts))

  # ... and IBP does not trust the name of a non-monotone function either.
  @jax.jit
  def relu(x):  # noqa: F811 -- deliberately shadows: the name is the point
    return jnp.where(x > 0, x, -x)
  g = lambda z: relu(z @ w) @ v
  with pytest.raises(NotImplementedError):   # interpreted rule by rule: data-dependent select
    ibp(g)(box)

  # Batch-mixing functions are rejected, not silently bounded per example.
  mix = lambda z: jax.nn.relu(z @ w - jnp.mean(z @ w, 0, keepdims=True)) @ v
  with pytest.raises(ValueError, match="mixes the examples"):
    linear_bounds(mix)(box)

  # Tiny pre-activations: the chord's offset must not underflow to 0.
  f2 = lambda z: jax.nn.relu(z @ (1e-22 * jnp.eye(2))) @ jnp.full((2, 1), 1e22)
  b2 = linear_bounds(f2, "crown_ibp", intersect_ibp=False)(
      Interval(-jnp.ones((1, 2)), jnp.ones((1, 2))))
  assert float(b2.upper[0, 0]) >= 2.0 * (1 - 1e-5)

  # Narrowing float casts round: not affine.
  with pytest.raises(NotImplementedError, match="convert_element_type"):
    linear_bounds(lambda z: jax.nn.relu((z @ w).astype(jnp.float16).astype(jnp.float32)) @ v)(
        box)

  # Overflow gives the trivial bound, never NaN.
  big = lambda z: jax.nn.relu(z @ (1e19 * w)) @ (1e19 * v)
  b3 = linear_bounds(big, "crown_ibp", intersect_ibp=False)(box)
  assert not bool(jnp.any(jnp.isnan(b3.lower))) and not bool(jnp.any(jnp.isnan(b3.upper)))
