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


def tiny_train_config(method="tbt"):
  """A train/certify config that runs in seconds on ``mock_fashion_mnist`` data."""
  from jaxcert.config import base_config  # noqa: PLC0415
  c = base_config()
  c.data.name = "fashion_mnist"
  c.data.data_dir = None
  c.data.num_queries = 12
  c.data.num_candidates = 20
  c.model.arch = "small"
  c.model.embed_dim = 16
  c.train.method = method
  c.train.num_steps = 6
  c.train.batch_size = 8
  c.train.lr_decay_steps = (4,)
  c.train.eps = 0.1
  c.train.ramp_start = 1
  c.train.ramp_end = 3
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.max_to_keep = 2
  c.certify.eps = 0.05
  c.certify.ks = (1, 5, 20)
  c.certify.batch_size = 8
  c.certify.attack_steps = 3
  c.certify.ca_sources = 3
  return c


@pytest.fixture
def mock_fashion_mnist(monkeypatch):
  """tfds mock data for fashion_mnist (64 examples), never the offline IDX files."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  from jaxcert import data as data_lib  # noqa: PLC0415
  monkeypatch.setitem(data_lib.DEFAULT_SOURCE_DIRS, "fashion_mnist", None)
  with tfds.testing.mock_data(num_examples=64):
    yield


class Interrupt(Exception):
  """Raised by :func:`stop_at` to interrupt a training run."""


def stop_at(step):
  """A training ``log`` that interrupts the run when it logs ``step``."""
  def log(line):
    if line.startswith(f"step {step}/"):
      raise Interrupt(line)
  return log
