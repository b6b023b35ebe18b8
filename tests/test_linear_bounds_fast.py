"""The fast paths of jaxcert.linear_bounds: transposed segments, their gradients, chunks."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcert import linear_bounds as lb
from jaxcert.interval import Interval, input_box


def init(key, dtype=jnp.float32):
  k = jax.random.split(key, 4)
  return (jax.random.normal(k[0], (4, 2, 3, 3), dtype) * 0.5,    # OIHW
          jax.random.normal(k[1], (4,), dtype) * 0.1,
          jax.random.normal(k[2], (2, 2, 4, 6), dtype) * 0.4,    # HWIO
          jax.random.normal(k[3], (6 * 4 * 6, 5), dtype) * 0.2)


def convnet(params, x):
  """[B, 10, 8, 2] -> [B, 5]: an NCHW strided conv with uneven padding, an NHWC dilated
  conv, a dense head -- every layout the transposed segments are rebuilt in."""
  w1, b1, w2, w3 = params
  h = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), w1, (2, 2),
                                   ((1, 2), (0, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
  h = jax.nn.relu(jnp.transpose(h, (0, 2, 3, 1)) + b1)                  # [B, 6, 4, 4]
  h = jax.nn.relu(jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME", rhs_dilation=(2, 1),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return h.reshape(h.shape[0], -1) @ w3


def test_transposed_segments_equal_jax_vjp():
  params = init(jax.random.key(0))
  f = lambda x: convnet(params, x)
  net = lb._Network(f, jax.ShapeDtypeStruct((1, 10, 8, 2), jnp.float32))
  assert len(net.segments) == 3
  shape = (1, 10, 8, 2)
  for k in range(3):
    zero = jnp.zeros(shape, jnp.float32)
    bias, vjp = lb._affine(net, k, shape, jnp.float32)
    ref_bias, ref_vjp = jax.vjp(net.segment_fn(k), zero)
    np.testing.assert_allclose(bias, ref_bias, rtol=1e-6, atol=1e-6)
    for b in (1, 3):
      lam = jax.random.normal(jax.random.key(k + b), (b, 7) + bias.shape[1:])   # [B, R, ...]
      got = jax.jit(vjp)(lam)
      one = lambda c, ref_vjp=ref_vjp: ref_vjp(c[None])[0][0]
      want = jax.jit(jax.vmap(jax.vmap(one)))(lam)
      assert got.shape == (b, 7) + shape[1:]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    shape = bias.shape


def test_gradient_matches_finite_differences():
  # The transposed segments have a hand-written VJP (adjoint identity); check d bound /
  # d params along a random direction against central differences, in float64.
  with jax.enable_x64(True):
    params = init(jax.random.key(1), jnp.float64)
    x = jax.random.uniform(jax.random.key(2), (3, 10, 8, 2), jnp.float64)
    box = input_box(x, 0.05)
    w = jax.random.normal(jax.random.key(3), (3, 5), jnp.float64)

    def loss(p, depth):
      b = lb.linear_bounds(lambda z: convnet(p, z), "crown_ibp", depth=depth,
                           intersect_ibp=False, image_chunk=2)(box)
      return jnp.sum(w * b.upper) - jnp.sum(jnp.sin(b.lower))

    v = jax.tree.map(lambda a, k: jax.random.normal(k, a.shape, a.dtype), params,
                     tuple(jax.random.split(jax.random.key(4), 4)))
    h = 1e-6
    shift = lambda s: jax.tree.map(lambda a, d: a + s * h * d, params, v)
    for depth in (None, 2):
      g = jax.jit(jax.grad(loss), static_argnums=1)(params, depth)
      along = sum(float(jnp.vdot(a, b)) for a, b in zip(g, v, strict=True))
      both = jax.jit(jax.vmap(loss, (0, None)), static_argnums=1)(
          jax.tree.map(lambda a, b: jnp.stack([a, b]), shift(1.0), shift(-1.0)), depth)
      fd = float(both[0] - both[1]) / (2 * h)
      assert abs(along - fd) <= 1e-6 * max(1.0, abs(fd)), (depth, along, fd)


def test_image_and_row_chunks_give_the_same_bounds():
  params = init(jax.random.key(5))
  f = lambda z: convnet(params, z)
  x = jax.random.uniform(jax.random.key(6), (5, 10, 8, 2))
  box = input_box(x, 0.03)
  ref = jax.jit(lb.linear_bounds(f, "crown", image_chunk=8, row_chunk=4096))(box)
  for image_chunk, row_chunk in ((2, 37), (1, 120)):
    b = jax.jit(lb.linear_bounds(f, "crown", image_chunk=image_chunk,
                                 row_chunk=row_chunk))(box)
    np.testing.assert_allclose(b.lower, ref.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.upper, ref.upper, rtol=1e-5, atol=1e-5)
  # ... and each example's box is the one it gets when bounded alone.
  one = jax.jit(lb.linear_bounds(f, "crown"))(Interval(box.lower[4:], box.upper[4:]))
  np.testing.assert_allclose(one.lower[0], ref.lower[4], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(one.upper[0], ref.upper[4], rtol=1e-5, atol=1e-5)
