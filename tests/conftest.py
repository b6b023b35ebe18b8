"""Shared helpers: small random networks for soundness tests."""

import jax
import jax.numpy as jnp
import pytest


def random_cnn(key, in_ch=1, out_dim=6):
  """A random CNN with conv, max-pool, residual add, avg-pool and dense layers.

  Returns ``f(x)``: x [B, 8, 8, in_ch] -> [B, out_dim].
  """
  k = jax.random.split(key, 5)
  w1 = jax.random.normal(k[0], (3, 3, in_ch, 4)) * 0.6
  b1 = jax.random.normal(k[1], (4,)) * 0.1
  w2 = jax.random.normal(k[2], (3, 3, 4, 4)) * 0.4
  w3 = jax.random.normal(k[3], (2 * 2 * 4, out_dim)) * 0.5
  b3 = jax.random.normal(k[4], (out_dim,)) * 0.1
  dn = ("NHWC", "HWIO", "NHWC")

  def f(x):
    h = jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=dn) + b1
    h = jax.nn.relu(h)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    r = jax.nn.relu(jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME", dimension_numbers=dn))
    h = h + r  # residual: both operands depend on the input
    h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    return jnp.tanh(h.reshape(h.shape[0], -1)) @ w3 + b3

  return f


@pytest.fixture
def cnn():
  return random_cnn(jax.random.key(0))
