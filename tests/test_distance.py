"""Thm 5 / 6 distance bounds against brute force over boxes in low dimension."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcert import distance
from jaxcert.interval import Interval


def _random_boxes(key, m, d):
  k1, k2 = jax.random.split(key)
  c = jax.random.normal(k1, (m, d))
  r = jax.random.uniform(k2, (m, d)) * 0.8
  return Interval(c - r, c + r)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_bounds_equal_brute_force(d):
  box = _random_boxes(jax.random.key(d), 6, d)
  pts = jax.random.normal(jax.random.key(10 + d), (5, d)) * 1.5
  up, lo = distance.pairwise_distance_bounds(box, pts)
  for m in range(6):
    verts = np.array(list(itertools.product(*zip(box.lower[m], box.upper[m], strict=True))))
    for n in range(5):
      t = np.asarray(pts[n])
      far = np.max(np.linalg.norm(verts - t, axis=1))  # max of a convex fn: a vertex
      near = np.linalg.norm(np.clip(t, box.lower[m], box.upper[m]) - t)  # projection
      np.testing.assert_allclose(up[m, n], far, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(lo[m, n], near, rtol=1e-5, atol=1e-6)


def test_sampled_points_within_bounds():
  box = _random_boxes(jax.random.key(0), 4, 8)
  pts = jax.random.normal(jax.random.key(1), (7, 8))
  up, lo = distance.pairwise_distance_bounds(box, pts)
  u = jax.random.uniform(jax.random.key(2), (5000, 4, 8))
  z = box.lower + u * (box.upper - box.lower)
  dist = jnp.linalg.norm(z[:, :, None, :] - pts[None, None], axis=-1)  # [S, 4, 7]
  assert bool(jnp.all(dist <= up + 1e-5)) and bool(jnp.all(dist >= lo - 1e-5))
  # a point inside its box has lower bound 0
  _, lo_in = distance.box_distance_bounds(box, box.center)
  np.testing.assert_allclose(lo_in, 0.0)


def test_chunk_size_and_elementwise_agree():
  box = _random_boxes(jax.random.key(3), 37, 16)
  pts = jax.random.normal(jax.random.key(4), (11, 16))
  a = distance.pairwise_distance_bounds(box, pts, chunk_size=1)
  b = distance.pairwise_distance_bounds(box, pts, chunk_size=64)
  e = distance.box_distance_bounds(
      Interval(box.lower[:, None], box.upper[:, None]), pts[None])
  for x, y, z in zip(a, b, e, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6)
    np.testing.assert_allclose(x, z, rtol=1e-6)


def test_point_box_is_exact_distance():
  pts = jax.random.normal(jax.random.key(5), (9, 5))
  q = jax.random.normal(jax.random.key(6), (3, 5))
  up, lo = distance.pairwise_distance_bounds(Interval(q, q), pts)
  exact = distance.pairwise_distances(q, pts)
  np.testing.assert_allclose(up, exact, rtol=1e-6)
  np.testing.assert_allclose(lo, exact, rtol=1e-6)
  np.testing.assert_allclose(exact, np.linalg.norm(q[:, None] - pts[None], axis=-1), rtol=1e-5)
