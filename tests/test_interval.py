"""Interval transform: exact values on single layers, soundness on random CNNs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_cnn
from jaxcert import interval
from jaxcert.interval import Interval, ibp, input_box


class SingleLayerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_exact(self):
    w = jnp.array([[1.0, 3.0], [-2.0, 4.0]])  # y = x @ w + b
    b = jnp.array([0.5, -1.0])
    box = Interval(jnp.array([0.0, -1.0]), jnp.array([1.0, 1.0]))
    out = self.variant(ibp(lambda x: x @ w + b))(box)
    # y1 = x1 - 2 x2 + 0.5 in [-1.5, 3.5]; y2 = 3 x1 + 4 x2 - 1 in [-5, 6]
    np.testing.assert_allclose(out.lower, [-1.5, -5.0])
    np.testing.assert_allclose(out.upper, [3.5, 6.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_relu_and_monotone(self):
    box = Interval(jnp.array([-2.0, -1.0, 0.5]), jnp.array([-1.0, 3.0, 2.0]))
    out = self.variant(ibp(jax.nn.relu))(box)
    np.testing.assert_allclose(out.lower, [0.0, 0.0, 0.5])
    np.testing.assert_allclose(out.upper, [0.0, 3.0, 2.0])
    out = self.variant(ibp(lambda x: -jnp.exp(x)))(box)
    np.testing.assert_allclose(out.lower, -np.exp([-1.0, 3.0, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(out.upper, -np.exp([-2.0, -1.0, 0.5]), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_conv_exact(self):
    # 1-D view: a 3x1 image, kernel [1, -1] (valid): y = x0 - x1, x1 - x2
    x_lo = jnp.array([0.0, 0.2, 0.4]).reshape(1, 3, 1, 1)
    x_hi = jnp.array([0.1, 0.5, 1.0]).reshape(1, 3, 1, 1)
    k = jnp.array([1.0, -1.0]).reshape(2, 1, 1, 1)
    f = lambda x: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = self.variant(ibp(f))(Interval(x_lo, x_hi))
    np.testing.assert_allclose(out.lower.ravel(), [0.0 - 0.5, 0.2 - 1.0], atol=1e-6)
    np.testing.assert_allclose(out.upper.ravel(), [0.1 - 0.2, 0.5 - 0.4], atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pooling_exact(self):
    lo = jnp.array([[0.0, 1.0], [-1.0, 2.0]]).reshape(1, 2, 2, 1)
    hi = jnp.array([[0.5, 1.5], [3.0, 2.5]]).reshape(1, 2, 2, 1)
    mx = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                         (1, 2, 2, 1), "VALID")
    av = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1),
                                         (1, 2, 2, 1), "VALID") / 4
    out = self.variant(ibp(mx))(Interval(lo, hi))
    np.testing.assert_allclose([out.lower.item(), out.upper.item()], [2.0, 3.0])
    out = self.variant(ibp(av))(Interval(lo, hi))
    np.testing.assert_allclose([out.lower.item(), out.upper.item()], [0.5, 1.875])

  @chex.variants(with_jit=True, without_jit=True)
  def test_residual_and_products(self):
    box = Interval(jnp.array([-1.0]), jnp.array([2.0]))
    out = self.variant(ibp(lambda x: x + jax.nn.relu(x)))(box)
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [-1.0, 4.0])
    out = self.variant(ibp(lambda x: x - x))(box)  # dependency is lost: [-3, 3]
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [-3.0, 3.0])
    out = self.variant(ibp(lambda x: x * x))(box)  # c = .5, r = 1.5: .25 -+ 3.75
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [-3.5, 4.0])
    out = self.variant(ibp(lambda x: x ** 2))(box)  # integer_pow: exact [0, 4]
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [0.0, 4.0])
    out = self.variant(ibp(jnp.abs))(box)
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [0.0, 2.0])
    pos = Interval(jnp.array([0.5]), jnp.array([2.0]))
    out = self.variant(ibp(lambda x: 1.0 / x))(pos)
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [0.5, 2.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_batchnorm_eval_mode(self):
    from flax import nnx
    bn = nnx.BatchNorm(2, use_running_average=True, rngs=nnx.Rngs(0))
    bn.mean[...] = jnp.array([1.0, -1.0])
    bn.var[...] = jnp.array([4.0, 0.25])
    bn.scale[...] = jnp.array([2.0, -1.0])
    bn.bias[...] = jnp.array([0.0, 1.0])
    bn.epsilon = 0.0
    g, s = nnx.split(bn)
    f = lambda x: nnx.merge(g, s)(x)
    box = Interval(jnp.array([[0.0, 0.0]]), jnp.array([[2.0, 1.0]]))
    out = self.variant(ibp(f))(box)
    # ch0: 2 (x - 1) / 2 in [-1, 1]; ch1: -(x + 1) / 0.5 + 1 in [-3, -1]
    np.testing.assert_allclose(out.lower, [[-1.0, -3.0]], atol=1e-6)
    np.testing.assert_allclose(out.upper, [[1.0, -1.0]], atol=1e-6)


def _samples_inside(f, box, key, n):
  u = jax.random.uniform(key, (n,) + box.lower.shape)
  x = box.lower + u * (box.upper - box.lower)
  # half of the samples on vertices of the box
  v = jax.random.bernoulli(key, 0.5, (n // 2,) + box.lower.shape)
  x = x.at[: n // 2].set(jnp.where(v, box.upper, box.lower))
  return jax.vmap(f)(x)


def _pgd_extremes(f, box, steps=60):
  """Maximises and minimises every output coordinate of f over the box."""
  out_dim = f(box.lower).shape[-1]
  step = (box.upper - box.lower) / 10

  def run(sign, coord, x0):
    def obj(x):
      return sign * f(x)[..., coord].sum()

    def body(x, _):
      g = jax.grad(obj)(x)
      x = jnp.clip(x + step * jnp.sign(g), box.lower, box.upper)
      return x, None

    x, _ = jax.lax.scan(body, x0, None, length=steps)
    return f(x)[..., coord]

  coords = jnp.arange(out_dim)
  x0 = box.center
  hi = jax.vmap(lambda c: run(1.0, c, x0))(coords)
  lo = jax.vmap(lambda c: run(-1.0, c, x0))(coords)
  return lo.T, hi.T  # [B, out_dim]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cnn_soundness(seed):
  f = random_cnn(jax.random.key(seed))
  x = jax.random.uniform(jax.random.key(100 + seed), (4, 8, 8, 1))
  box = input_box(x, 0.08)
  out = jax.jit(ibp(f))(box)
  ys = _samples_inside(lambda z: f(z), box, jax.random.key(7 + seed), 2000)
  tol = 1e-5
  assert bool(jnp.all(ys >= out.lower - tol)) and bool(jnp.all(ys <= out.upper + tol))
  lo, hi = jax.jit(lambda: _pgd_extremes(f, box))()
  assert bool(jnp.all(hi <= out.upper + tol)), float(jnp.max(hi - out.upper))
  assert bool(jnp.all(lo >= out.lower - tol)), float(jnp.max(out.lower - lo))
  # the attack is real: it spreads the outputs and beats random sampling on average
  assert float(jnp.min(hi - lo)) > 0.0
  assert float(jnp.mean(hi)) >= float(jnp.mean(ys.max(axis=0))) - 1e-4


def test_eps_zero_gives_point(cnn):
  x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 1))
  out = ibp(cnn)(input_box(x, 0.0))
  np.testing.assert_allclose(out.lower, cnn(x), atol=1e-5)
  np.testing.assert_allclose(out.upper, cnn(x), atol=1e-5)


def test_monotone_in_eps(cnn):
  x = jax.random.uniform(jax.random.key(4), (2, 8, 8, 1))
  small = ibp(cnn)(input_box(x, 0.01))
  big = ibp(cnn)(input_box(x, 0.05))
  assert bool(jnp.all(big.lower <= small.lower + 1e-6))
  assert bool(jnp.all(big.upper >= small.upper - 1e-6))


def test_jit_vmap_grad_agree(cnn):
  x = jax.random.uniform(jax.random.key(5), (3, 8, 8, 1))
  plain = ibp(cnn)(input_box(x, 0.05))
  jitted = jax.jit(lambda z: ibp(cnn)(input_box(z, 0.05)))(x)
  vmapped = jax.vmap(lambda z: ibp(lambda y: cnn(y[None])[0])(input_box(z, 0.05)))(x)
  chex.assert_trees_all_close(plain, jitted, atol=1e-5)
  chex.assert_trees_all_close(plain, vmapped, atol=1e-5)
  g = jax.grad(lambda z: ibp(cnn)(input_box(z, 0.05)).upper.sum())(x)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))


def test_nested_jit_and_custom_jvp():
  @jax.jit
  def inner(x):
    return jax.nn.softplus(x) + jax.nn.relu(x)

  out = ibp(lambda x: inner(x) * 2.0)(Interval(jnp.array([-1.0]), jnp.array([1.0])))
  lo = 2 * np.log1p(np.exp(-1.0))
  hi = 2 * (np.log1p(np.exp(1.0)) + 1.0)
  np.testing.assert_allclose([out.lower[0], out.upper[0]], [lo, hi], rtol=1e-5)


def test_constants_and_pytrees():
  def f(x, w):
    return {"a": x @ w, "const": w.sum()}

  w = jnp.array([[1.0], [-1.0]])
  out = ibp(f)(Interval(jnp.zeros(2), jnp.ones(2)), w)
  np.testing.assert_allclose([out["a"].lower[0], out["a"].upper[0]], [-1.0, 1.0])
  assert float(out["const"].lower) == float(out["const"].upper) == 0.0


def test_unknown_primitive_is_named():
  with pytest.raises(NotImplementedError, match="'cos'"):
    ibp(jnp.cos)(Interval(jnp.zeros(2), jnp.ones(2)))
  with pytest.raises(NotImplementedError, match="'sort'"):
    ibp(jnp.sort)(Interval(jnp.zeros(2), jnp.ones(2)))
  with pytest.raises(NotImplementedError, match="select_n"):
    ibp(lambda x: jnp.where(x > 0.5, x, -x))(Interval(jnp.zeros(2), jnp.ones(2)))


def test_input_box_clips_and_validates():
  x = jnp.array([0.05, 0.5, 0.97])
  b = input_box(x, 0.1)
  np.testing.assert_allclose(b.lower, [0.0, 0.4, 0.87], atol=1e-6)
  np.testing.assert_allclose(b.upper, [0.15, 0.6, 1.0], atol=1e-6)
  with pytest.raises(ValueError, match=r"eps=-0.1"):
    input_box(x, -0.1)
  with pytest.raises(ValueError, match="eps"):
    input_box(x, float("nan"))
  with pytest.raises(ValueError, match="same shape"):
    ibp(jnp.sin)(Interval(jnp.zeros(2), jnp.ones(3)))


def test_supported_primitives_listed():
  names = interval.supported_primitives()
  for p in ("dot_general", "conv_general_dilated", "reduce_window_max", "custom_jvp_call"):
    assert p in names


def test_bounds_use_full_precision_products(cnn):
  x = jax.random.uniform(jax.random.key(6), (2, 8, 8, 1))
  jaxpr = jax.make_jaxpr(lambda z: ibp(cnn)(input_box(z, 0.1)))(x)
  ops = [e for e in jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert ops
  for e in ops:
    assert e.params["precision"] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
