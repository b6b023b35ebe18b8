"""Randomized smoothing of embeddings and l_2 certificates for retrieval.

RetrievalGuard (MATH.md B) and our extensions (MATH.md C). The smoothed embedding
of a base extractor ``f`` with ``||f(x)|| <= F`` is

    g(x) = E_{delta ~ N(0, sigma^2 I)} f(x + delta),

estimated by ``g_hat(x)``, the mean of ``n`` Monte-Carlo samples
(:func:`smoothed_embed`). Every certificate here is a statement about the exact
``g`` that holds with probability ``>= 1 - rho`` over the Monte-Carlo noise:

- :func:`mc_error_bound` (Lemma 3.6, matrix Bernstein): ``||g_hat - g|| < t``
  except with probability ``rho'``.
- :func:`paper_radius` (Thm 3.5 + Prop. 3.9): the 1-NN of ``g(x + delta)`` keeps
  the query's class for every ``||delta|| < R``, ``R <= 1.349 sigma`` always.
- :func:`halfspace_radii` (ours): the same statement through the half-space
  form of each (same-class, other-class) gallery pair, with no ceiling; and the
  top-K version (a same-class item stays in the top K); optionally with
  per-direction empirical-Bernstein bounds from the samples' covariance in place
  of the all-directions ``t``.

Assumptions shared by all of them (stated once, checked where possible):

1. ``f`` is a fixed function bounded by ``F``: :func:`smoothed_embed` projects
   every sample onto the ball of radius ``F`` (a no-op for L2-normalised
   embeddings with ``F = 1``), so the bound holds by construction.
2. Noise is not clipped to [0, 1]: the certified set is the whole l_2 ball
   around the query, a superset of the valid images in it.
3. Gallery vectors are either *fixed* (the base embeddings ``f(b)`` or a stored
   index; only the query is estimated) or *smoothed* (``g(b)`` estimated with
   the same ``n``, then a union bound covers the query and all ``|B|`` gallery
   estimates, ``rho' = rho / (|B| + 1)``).
4. Floating point: ``f`` is evaluated in float32; each sample's norm may exceed
   ``F`` by a few ulps and the float32 chunk sums round. The certificates use
   ``F (1 + 1e-5)`` and add ``(chunk + 2) 2^-24 F`` to ``t`` to cover both;
   the radius formulas themselves run in float64, and the half-space geometry
   (``u.z``, ``c``) is widened by ``1e-7 F``; different-class gallery pairs closer
   than ``1e-3`` of their norms are recomputed from the difference vector, where
   the expanded ``||a||^2 + ||b||^2 - 2 a.b`` would cancel. Not covered (the
   general floating-point caveat of randomized smoothing, Voracek & Hein 2023):
   float32 Gaussian samples are discretised with truncated tails and ``x + sigma
   z`` rounds, so ``g`` is the smoothing under that sampler, not the exact Gaussian.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import special

from jaxcert import parallel, validate

__all__ = [
    "CERTIFICATES", "certified_recall_curve", "certify_smoothed", "halfspace_radii",
    "lipschitz_bound", "mc_error_bound", "minimum_margin", "paper_radius",
    "project_to_ball", "smoothed_embed",
]

CERTIFICATES = ("paper", "halfspace")
_F_SLACK = 1e-5
_U32 = 2.0 ** -24
_GEOM_SLACK = 1e-7      # |error| of u.z and c from float64 rounding, in units of F
_NEAR = 1e-6            # ||b - a||^2 < _NEAR (||a||^2 + ||b||^2): recompute from b - a
GALLERY_CHUNK = 4096    # gallery items compared with a batch of queries at a time
_TRIPLES = 2 ** 18       # (query, positive, gallery item) triples per halfspace_radii step


# ---------------------------------------------------------------- Monte Carlo


def project_to_ball(f: jax.Array, bound: float) -> jax.Array:
  """f [..., d] -> f * min(1, bound / ||f||): every row has norm <= bound."""
  norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
  return f * jnp.minimum(1.0, bound / jnp.maximum(norm, 1e-30))


def _check_positive(value, name: str, *, integer: bool = False) -> float:
  bad = isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                          np.floating))
  if not bad:
    bad = not math.isfinite(float(value)) or value <= 0
    bad = bad or (integer and float(value) != int(value))
  if bad:
    kind = "a positive integer" if integer else "a finite number > 0"
    raise ValueError(f"{name} must be {kind}, got {name}={value!r}")
  return int(value) if integer else float(value)


def _check_rho(rho, name: str = "rho") -> float:
  if isinstance(rho, bool) or not isinstance(rho, (int, float, np.floating)) or not (
      0.0 < float(rho) < 1.0):
    raise ValueError(f"{name} must lie in (0, 1) (the failure probability), got "
                     f"{name}={rho!r}")
  return float(rho)


@functools.lru_cache(maxsize=16)
def _sample_mesh(devices: tuple, image_shards: int) -> jax.sharding.Mesh:
  """The (images, samples) mesh of ``devices``, ``image_shards`` x the rest."""
  return jax.make_mesh((image_shards, len(devices) // image_shards), ("images", "samples"),
                       axis_types=(AxisType.Auto,) * 2, devices=devices)


@functools.lru_cache(maxsize=16)   # one compiled function per (model, sigma, F, mode, mesh)
def _sum_fn(apply, sigma: float, bound: float, covariance: bool,
            mesh: jax.sharding.Mesh):
  """Jitted sum of projected f(x + sigma * noise) over one chunk of samples (with
  ``covariance``: also the sums of ``f - f(x)`` and of its outer products).

  Sample ``s`` of an image keyed ``k`` uses ``normal(fold_in(k, s))``: the noise
  of a sample depends only on (image key, sample index), not on the chunking or on
  the devices. On the (images, samples) ``mesh`` (:func:`_sample_mesh`) each device
  takes its share of the q images and an equal slice of the chunk's sample indices,
  and ``psum`` adds the partial sums over ``samples`` (a different summation order of
  the same float32 terms, so the chunk-size rounding slack of the module doc still
  covers it).
  """
  sample_shards = mesh.shape["samples"]

  def device_sum(params, x, keys, start, stop, *, per):
    idx = start + jax.lax.axis_index("samples") * per + jnp.arange(per)

    def noise(k):
      return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:],
                                                  x.dtype))(idx)

    z = x[:, None] + sigma * jax.vmap(noise)(keys)            # [q, per, H, W, C]
    f = apply(params, z.reshape((-1,) + x.shape[1:]))
    f = project_to_ball(f, bound).reshape(x.shape[0], per, -1)
    keep = (idx < stop)[None, :, None]
    add = lambda v: jax.lax.psum(v, "samples")
    total = add(jnp.sum(jnp.where(keep, f, 0.0), axis=1))
    if not covariance:
      return total
    ref = project_to_ball(apply(params, x), bound)                     # [q, d]
    fc = jnp.where(keep, f - ref[:, None], 0.0)
    return total, add(jnp.sum(fc, axis=1)), add(jnp.einsum("qcd,qce->qde", fc, fc))

  def chunk_sum(params, x, keys, start, stop, chunk):
    """Sums over samples ``start .. min(start + chunk, stop) - 1`` of each image."""
    spec = P("images")
    return jax.shard_map(
        functools.partial(device_sum, per=-(-chunk // sample_shards)), mesh=mesh,
        in_specs=(P(), spec, spec, P(), P()),
        out_specs=(spec, spec, spec) if covariance else spec)(
            params, x, keys, start, jnp.minimum(stop, start + chunk))

  return jax.jit(chunk_sum, static_argnames=("chunk",))


def smoothed_embed(apply: Callable, params, images: np.ndarray, *, sigma: float,
                   num_samples: int, key: jax.Array, norm_bound: float = 1.0,
                   chunk_size: int = 1000, batch_images: int = 1,
                   log: Callable[[str], None] | None = None,
                   log_every: float = 30.0, covariance: bool = False,
                   mesh: jax.sharding.Mesh | None = None):
  """Monte-Carlo smoothed embeddings g_hat(x) = (1/n) sum_i f(x + delta_i).

  images: float [N, H, W, C] in [0, 1]. Image ``i`` uses the key
  ``fold_in(key, i)`` and its sample ``s`` the noise ``normal(fold_in(.., s))``,
  so the result does not depend on ``chunk_size`` or ``batch_images`` (up to
  float summation order). Samples are projected onto the ball of radius
  ``norm_bound`` (assumption 1 of the module doc). Memory is bounded by
  ``batch_images * chunk_size`` images at a time. Returns float64 [N, d]; with
  ``covariance=True`` also the unbiased sample covariance of the samples, float64
  [N, d, d] (accumulated around the clean f(x) to limit cancellation), which
  :func:`halfspace_radii` turns into per-direction empirical-Bernstein bounds.

  Several devices (``mesh``, default :func:`jaxcert.parallel.current_mesh`): the
  ``batch_images`` images of a step and each chunk's samples are split over the
  devices (images over the largest count that divides ``batch_images``, samples over
  the rest) in ``jax.shard_map``; partial sums meet in a ``psum``. The noise of every
  sample is the same on any number of devices.
  """
  validate.check_images(images)
  sigma = _check_positive(sigma, "sigma")
  n = _check_positive(num_samples, "num_samples", integer=True)
  bound = _check_positive(norm_bound, "norm_bound")
  chunk = min(_check_positive(chunk_size, "chunk_size", integer=True), n)
  q = _check_positive(batch_images, "batch_images", integer=True)
  if n < 2 and covariance:
    raise ValueError(f"covariance needs num_samples >= 2, got num_samples={n}")
  mesh = parallel.current_mesh() if mesh is None else mesh
  devices = tuple(mesh.devices.flat)
  mesh = _sample_mesh(devices, math.gcd(q, len(devices)))
  fn = _sum_fn(apply, sigma, bound, bool(covariance), mesh)
  params = jax.device_put(params, NamedSharding(mesh, P()))   # replicated
  num = len(images)
  out = cov = None
  t0 = last = time.perf_counter()
  with jax.default_matmul_precision("highest"):
    for i in range(0, num, q):
      x = images[i:i + q]
      pad = q - len(x)
      if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
      keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(i, i + q))
      x = jnp.asarray(x, jnp.float32)
      # dispatch every chunk before reading any back (keeps the device busy), then
      # add the float32 chunk sums in float64
      sums = [fn(params, x, keys, start, n, chunk) for start in range(0, n, chunk)]
      if covariance:
        total, s1, s2 = (np.sum([np.asarray(v[j], np.float64) for v in sums], axis=0)
                         for j in range(3))
        m1 = s1 / n
        c = (s2 - n * m1[:, :, None] * m1[:, None, :]) / (n - 1)
        if cov is None:
          cov = np.zeros((num,) + c.shape[1:], np.float64)
        cov[i:i + q - pad] = c[:q - pad]
      else:
        total = np.sum([np.asarray(v, np.float64) for v in sums], axis=0)
      if out is None:
        out = np.zeros((num, total.shape[-1]), np.float64)
      out[i:i + q - pad] = total[:q - pad] / n
      now = time.perf_counter()
      done = min(i + q, num)
      if log is not None and (now - last >= log_every or done == num):
        rate = done * n / (now - t0)
        log(f"smoothing: {done}/{num} images, {n} samples each | {rate:,.0f} samples/s "
            f"| ETA {(num - done) * n / rate:.0f}s")
        last = now
  return (out, cov) if covariance else out


def mc_error_bound(num_samples: int, dim: int, norm_bound: float, rho: float) -> float:
  """Lemma 3.6: t with P(||g_hat(x) - g(x)|| >= t) <= rho for one image.

  Rectangular matrix Bernstein on the d x 1 summands (f(x + delta_i) - g(x)) / n:
  norm <= 2F/n, variance <= F^2/n, so P(.. >= t) <= (d + 1) exp(-3 n t^2 /
  (6F^2 + 4F t)); solved for t with L = ln((d + 1) / rho):
  t = 2FL/(3n) + sqrt(4F^2 L^2 / (9 n^2) + 2 F^2 L / n).
  """
  n = _check_positive(num_samples, "num_samples", integer=True)
  d = _check_positive(dim, "dim", integer=True)
  f = _check_positive(norm_bound, "norm_bound")
  rho = _check_rho(rho)
  lg = math.log((d + 1) / rho)
  return 2 * f * lg / (3 * n) + math.sqrt(4 * f * f * lg * lg / (9 * n * n)
                                          + 2 * f * f * lg / n)


def certified_t(num_samples: int, dim: int, norm_bound: float, rho: float, *,
                gallery_size: int | None = None, chunk_size: int = 1000) -> float:
  """The ``t`` every certificate uses: Lemma 3.6 at ``rho`` (fixed gallery) or at
  ``rho / (|B| + 1)`` (smoothed gallery of ``gallery_size`` items), with the
  float slack of the module doc."""
  rho_eff = rho if gallery_size is None else _check_rho(rho) / (gallery_size + 1)
  f = norm_bound * (1 + _F_SLACK)
  return (mc_error_bound(num_samples, dim, f, rho_eff)
          + (min(chunk_size, num_samples) + 2) * _U32 * f)


# ---------------------------------------------------------------- the paper


def lipschitz_bound(r, sigma: float, norm_bound: float):
  """Lemma 3.3: ||g(x1) - g(x2)|| <= 2F (2 Phi(r / (2 sigma)) - 1) for ||x1 - x2|| <= r.

  Attained by f = F sign(x) in 1-D at x1 = -x2 = r/2.
  """
  r = np.asarray(r, np.float64)
  return 2.0 * norm_bound * (2.0 * special.ndtr(r / (2.0 * sigma)) - 1.0)


def minimum_margin(z: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                   gallery_labels: np.ndarray, *, query_chunk: int = 256,
                   gallery_chunk: int = GALLERY_CHUNK) -> np.ndarray:
  """Def. 3.1: M = min_{b in B-} ||z - b|| - min_{a in B+} ||z - a|| per query, [Q].

  +inf when the gallery has no other-class item, -inf when it has no same-class item.
  Memory: ``query_chunk x gallery_chunk`` distances at a time.
  """
  qc = _check_positive(query_chunk, "query_chunk", integer=True)
  gc = _check_positive(gallery_chunk, "gallery_chunk", integer=True)
  z, gallery = np.asarray(z), np.asarray(gallery)
  ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
  pos = np.full(len(z), np.inf)
  neg = np.full(len(z), np.inf)
  for lo in range(0, len(z), qc):
    rows = slice(lo, lo + qc)
    for g0 in range(0, len(gallery), gc):
      dist = _distances(z[rows], gallery[g0:g0 + gc])
      same = ql[rows, None] == gl[None, g0:g0 + gc]
      pos[rows] = np.minimum(pos[rows], np.where(same, dist, np.inf).min(axis=1))
      neg[rows] = np.minimum(neg[rows], np.where(same, np.inf, dist).min(axis=1))
  with np.errstate(invalid="ignore"):
    return np.where(np.isinf(pos), -np.inf, neg - pos)


def paper_radius(margin_lower, sigma: float, norm_bound: float) -> np.ndarray:
  """Thm 3.5: R = 2 sigma Phi^{-1}(1/2 + M / (8F)) where M > 0, else 0 (abstain).

  ``margin_lower`` must be a lower bound on M(g, x) (Prop. 3.9: M(g_hat, x) - 2 t_q
  - 2 t_b). Since M <= 2F, R <= 2 sigma Phi^{-1}(3/4) ~ 1.349 sigma.
  """
  m = np.asarray(margin_lower, np.float64)
  f = norm_bound * (1 + _F_SLACK)
  arg = np.clip(0.5 + m / (8.0 * f), 0.5, 1.0)
  return np.where(m > 0, 2.0 * sigma * special.ndtri(arg), 0.0)


# ---------------------------------------------------------------- ours (MATH.md C)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  sq = (np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T)
  return np.sqrt(np.maximum(sq, 0.0))


def halfspace_radii(z: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                    gallery_labels: np.ndarray, ks: Sequence[int], *, sigma: float,
                    norm_bound: float, t: float, max_positives: int = 32,
                    batch: int = 64, cov: np.ndarray | None = None,
                    num_samples: int | None = None, rho_eb: float | None = None,
                    chunk_size: int = 1000,
                    gallery_chunk: int = GALLERY_CHUNK) -> np.ndarray:
  """Certified top-K radii from half-spaces, fixed gallery only. [Q, len(ks)].

  Claim (MATH.md C): for a same-class gallery vector ``a`` and another-class ``b``,
  ``||z - a|| < ||z - b||`` iff ``u.z < c`` with ``u = (b - a)/||b - a||``, ``c =
  (||b||^2 - ||a||^2)/(2||b - a||)``. ``h = (F - u.f)/(2F)`` lies in [0, 1], so
  ``x -> Phi^{-1}(E h(x + delta))`` is 1/sigma-Lipschitz (Salman et al. 2019) and
  ``E h = (F - u.g)/(2F) >= (F - u.g_hat - t)/(2F)`` when ``||g_hat - g|| < t``.
  Hence ``a`` beats ``b`` for all ``||delta|| < R_ab = sigma (Phi^{-1}((F - u.g_hat -
  t)/(2F)) - Phi^{-1}((F - c)/(2F)))``. ``a`` stays ahead of all but K - 1 other-class
  items while ``||delta||`` is below the K-th smallest ``R_ab``, so some same-class
  item is in the top K; the query's radius is the max over ``a``. Only the
  ``max_positives`` nearest same-class items are tried (a max over a subset is still
  a valid lower bound). Non-positive entries mean "not certified". Requires exact
  (fixed) gallery vectors: with estimated ones the set is not a half-space.

  K = 1 gives the 1-NN certificate; it is never below :func:`paper_radius` of the
  fixed-gallery margin bound ``M(g_hat) - 2t`` (tested).

  Per-direction bounds (ours): with ``cov`` (the sample covariance from
  ``smoothed_embed(..., covariance=True)``), ``num_samples`` n and ``rho_eb``, the
  deviation of each pair is ``min(t, e_ab)`` with the empirical Bernstein bound
  (Maurer & Pontil 2009, Thm 4, on ``u.f`` in [-F, F]):
  ``u.g <= u.g_hat + sqrt(2 V_ab L / n) + 14 F L / (3 (n - 1))``, ``V_ab = u' cov u``,
  ``L = ln(2 P / rho_eb)`` with P = |B+| |B-| of the query (a union bound over every
  pair, whichever are tried). It holds for all pairs with probability
  ``>= 1 - rho_eb``; combined with ``t`` (valid with probability ``1 - rho_t``) the
  query's certificate holds with probability ``>= 1 - rho_t - rho_eb``. When the
  samples vary little along ``u`` (most directions: ``E||f - g||^2 <= F^2`` is
  spread over d dimensions) ``e_ab`` is several times smaller than ``t``.

  Memory: the gallery is streamed ``gallery_chunk`` items at a time for ``batch``
  queries (fewer when ``batch x max_positives x gallery_chunk`` exceeds 2^18), keeping
  per (query, positive) only the ``max(ks)`` smallest ``R_ab`` seen: no array grows
  with the gallery size. The result does not depend on ``gallery_chunk`` or ``batch``
  beyond float64 rounding of the dot products (covered by the geometry slack).
  """
  z = np.asarray(z, np.float64)
  gal = np.asarray(gallery, np.float64)
  ql, gl = _check_labels(query_labels, gallery_labels)
  ks = validate.check_ks(tuple(ks), len(gal), "ks")
  f = norm_bound * (1 + _F_SLACK)
  _check_in_ball(z, f, "z (smoothed query embeddings)")
  _check_in_ball(gal, f, "gallery")
  slack = _GEOM_SLACK * f
  if cov is not None:
    cov = np.asarray(cov, np.float64)
    validate.check_shape(cov, (len(z), z.shape[1], z.shape[1]), "cov")
    n_s = _check_positive(num_samples, "num_samples", integer=True)
    if n_s < 2:
      raise ValueError(f"num_samples must be >= 2 with cov, got {n_s}")
    rho_eb = _check_rho(rho_eb, "rho_eb")
    var_slack = 4.0 * (min(chunk_size, n_s) + 2) * _U32 * f * f * n_s / (n_s - 1)
    mean_slack = (min(chunk_size, n_s) + 2) * _U32 * f
  gc = min(_check_positive(gallery_chunk, "gallery_chunk", integer=True), len(gal))
  batch = _check_positive(batch, "batch", integer=True)
  geometry = _PairGeometry(gal, gl, np.einsum("nd,nd->n", gal, gal), f, slack, sigma)
  out = np.empty((len(z), len(ks)))
  m = min(max_positives, len(gal))
  kmax = max(ks)
  batch = max(1, min(batch, _TRIPLES // (m * gc)))
  for lo in range(0, len(z), batch):
    zb, lb = z[lo:lo + batch], ql[lo:lo + batch]
    pos, pos_ok, npos = _nearest_positives(zb, lb, gal, gl, m, gc)
    a = gal[pos]                                                       # [q, m, d]
    eb = None
    if cov is not None:
      cb = cov[lo:lo + batch]
      pairs = np.maximum(npos * (len(gal) - npos), 1)[:, None, None]
      eb = (cb, np.log(2.0 * pairs / rho_eb), n_s, var_slack, mean_slack)
    smallest = np.full((len(zb), m, kmax), np.inf)   # the kmax smallest R_ab so far
    for g0 in range(0, len(gal), gc):
      r = geometry.radii(zb, lb, a, pos, slice(g0, g0 + gc), t, eb)   # [q, m, gc]
      smallest = np.partition(np.concatenate([smallest, r], axis=2), kmax - 1,
                              axis=2)[:, :, :kmax]
    smallest = np.sort(smallest, axis=2)
    for j, k in enumerate(ks):
      kth = smallest[:, :, k - 1]                                        # [q, m]
      out[lo:lo + batch, j] = np.where(pos_ok, kth, -np.inf).max(axis=1)
  return out


def _nearest_positives(zb, lb, gal, gl, m: int, gc: int):
  """The m nearest same-class gallery items of each query (ties to the lower index),
  streamed over gallery chunks. Returns (index [q, m], is a same-class item [q, m],
  number of same-class items [q])."""
  best_d = np.full((len(zb), m), np.inf)
  best_i = np.zeros((len(zb), m), np.int64)
  npos = np.zeros(len(zb), np.int64)
  for g0 in range(0, len(gal), gc):
    same = lb[:, None] == gl[None, g0:g0 + gc]
    npos += same.sum(axis=1)
    dist = np.where(same, _distances(zb, gal[g0:g0 + gc]), np.inf)
    cat_d = np.concatenate([best_d, dist], axis=1)
    cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(g0, g0 + dist.shape[1]),
                                                     dist.shape)], axis=1)
    order = np.argsort(cat_d, axis=1, kind="stable")[:, :m]   # kept ones come first
    best_d = np.take_along_axis(cat_d, order, axis=1)
    best_i = np.take_along_axis(cat_i, order, axis=1)
  return best_i, np.isfinite(best_d), npos


@dataclasses.dataclass(frozen=True)
class _PairGeometry:
  """R_ab of :func:`halfspace_radii` for (query, positive a, gallery chunk b) triples."""

  gal: np.ndarray        # [N, d] float64
  labels: np.ndarray     # [N]
  sq: np.ndarray         # [N] ||b||^2
  f: float               # F with its float slack
  slack: float           # geometry slack, units of F
  sigma: float

  def radii(self, zb, lb, a, pos, cols: slice, t: float, eb) -> np.ndarray:
    """[q, m, gc]: R_ab (MATH.md C); -inf where not certified, +inf for same-class b."""
    gal, f, slack = self.gal[cols], self.f, self.slack
    q, m, d = a.shape
    same = lb[:, None] == self.labels[None, cols]                     # [q, gc]
    ab = (a.reshape(q * m, d) @ gal.T).reshape(q, m, -1)               # a.b
    sa = self.sq[pos][..., None]                                       # ||a||^2
    sb = self.sq[None, None, cols]
    nrm = np.sqrt(np.maximum(sa + sb - 2.0 * ab, 0.0))                 # ||b - a||
    za = np.einsum("qd,qmd->qm", zb, a)[..., None]
    zg = (zb @ gal.T)[:, None, :]
    if eb is not None:
      cb, lg, n_s, var_slack, mean_slack = eb
      s_a = np.einsum("qde,qme->qmd", cb, a)                           # Sigma a
      b_s_b = np.stack([np.sum((gal @ c) * gal, axis=1) for c in cb])[:, None, :]
      vq = (b_s_b - 2.0 * (s_a @ gal.T)                                  # (b-a)' S (b-a)
            + np.einsum("qmd,qmd->qm", a, s_a)[..., None])
    with np.errstate(divide="ignore", invalid="ignore"):
      s = (zg - za) / nrm                                              # u.z_hat
      c = (sb - sa) / (2.0 * nrm)
      near = np.argwhere((nrm * nrm < _NEAR * (sa + sb)) & ~same[:, None, :])
      for qi, mi, ni in near:            # cancellation: recompute from v = b - a
        av, bv = a[qi, mi], gal[ni]
        v = bv - av
        nv = np.sqrt(v @ v)
        nrm[qi, mi, ni] = nv
        s[qi, mi, ni] = (v @ zb[qi]) / nv
        c[qi, mi, ni] = (v @ (0.5 * (av + bv))) / nv
        if eb is not None:
          vq[qi, mi, ni] = v @ cb[qi] @ v
      dev = t
      if eb is not None:
        var = np.maximum(vq / (nrm * nrm), 0.0) + var_slack             # u' S u
        e = (np.sqrt(2.0 * var * lg / n_s) + 14.0 * f * lg / (3.0 * (n_s - 1))
             + mean_slack)
        dev = np.minimum(t, np.where(np.isfinite(e), e, t))
      p_lo = np.clip((f - (s + slack) - dev) / (2.0 * f), 0.0, 1.0)
      p_th = np.clip((f - (c - slack)) / (2.0 * f), 0.0, 1.0)
      r = self.sigma * (special.ndtri(p_lo) - special.ndtri(p_th))
    r = np.where((p_lo <= 0.0) | (p_th >= 1.0) | (nrm <= 0.0), -np.inf, r)
    r = np.where(np.isnan(r), -np.inf, r)
    return np.where(same[:, None, :], np.inf, r)       # same-class items never hurt


# ---------------------------------------------------------------- per query


def certify_smoothed(z: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                     gallery_labels: np.ndarray, *, sigma: float, norm_bound: float,
                     t_query: float, t_gallery: float = 0.0,
                     ks: Sequence[int] = (1,), max_positives: int = 32,
                     cov: np.ndarray | None = None, num_samples: int | None = None,
                     rho: float | None = None, chunk_size: int = 1000) -> dict:
  """Per-query certificates for smoothed 1-NN / top-K retrieval.

  z: g_hat of the queries [Q, d]; gallery [N, d]: fixed vectors (``t_gallery = 0``)
  or smoothed estimates (``t_gallery`` their error bound). Returns numpy arrays:
  ``score`` (1-NN of z has the query's class), ``margin`` M(g_hat, x),
  ``paper_radius`` (Thm 3.5 on ``M - 2 t_query - 2 t_gallery``, 0 = abstain),
  ``rejected`` (score 1 but the paper's bound is not positive) and, with a fixed
  gallery, ``halfspace_radius`` [Q, len(ks)] (:func:`halfspace_radii`; K = 1 is the
  1-NN certificate; ``-inf`` = not certified). With a smoothed gallery the
  half-space radii are NaN (not available). With ``cov`` (fixed gallery), also
  ``halfspace_eb_radius``: the half-space radii with per-direction empirical
  Bernstein bounds, ``rho`` split evenly between Lemma 3.6 (``t`` recomputed at
  ``rho / 2``) and the per-direction bounds, so it holds with probability ``1 - rho``.
  """
  _check_labels(query_labels, gallery_labels)
  f = norm_bound * (1 + _F_SLACK)
  _check_in_ball(np.asarray(z, np.float64), f, "z (smoothed query embeddings)")
  _check_in_ball(np.asarray(gallery, np.float64), f, "gallery")
  margin = minimum_margin(z, query_labels, gallery, gallery_labels)
  lower = margin - 2.0 * t_query - 2.0 * t_gallery
  out = {
      "score": margin > 0,
      "margin": margin,
      "paper_radius": paper_radius(lower, sigma, norm_bound),
      "rejected": (margin > 0) & ~(lower > 0),
  }
  if t_gallery == 0.0:
    out["halfspace_radius"] = halfspace_radii(
        z, query_labels, gallery, gallery_labels, ks, sigma=sigma,
        norm_bound=norm_bound, t=t_query, max_positives=max_positives)
  else:
    out["halfspace_radius"] = np.full((len(z), len(tuple(ks))), np.nan)
  if cov is not None and t_gallery == 0.0:
    n_s = _check_positive(num_samples, "num_samples", integer=True)
    rho = _check_rho(rho)
    t_half = certified_t(n_s, np.shape(z)[1], norm_bound, rho / 2, chunk_size=chunk_size)
    out["halfspace_eb_radius"] = halfspace_radii(
        z, query_labels, gallery, gallery_labels, ks, sigma=sigma, norm_bound=norm_bound,
        t=t_half, max_positives=max_positives, cov=cov, num_samples=n_s,
        rho_eb=rho / 2, chunk_size=chunk_size)
  return out


def certified_recall_curve(radii: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """Certified Recall at each radius r of ``grid``: mean of 1[R(x) > r] (r >= 0).

  Strict: a radius R covers every ``||delta|| < R``, so it certifies all
  perturbations of norm ``<= r`` only when ``R > r``.
  """
  radii = np.asarray(radii, np.float64)
  return np.array([float(np.mean(radii > max(float(r), 0.0))) for r in np.asarray(grid)])


def _check_labels(query_labels, gallery_labels):
  ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
  if ql.dtype.kind not in "iu" or gl.dtype.kind not in "iu":
    raise ValueError(f"query_labels and gallery_labels must be integer arrays, got "
                     f"dtypes {ql.dtype} and {gl.dtype}")
  return ql, gl


def _check_in_ball(v: np.ndarray, bound: float, name: str) -> None:
  norms = np.sqrt(np.einsum("...d,...d->...", v, v))   # no [N, d] temporary
  if np.any(~np.isfinite(norms)):
    raise ValueError(f"{name} holds non-finite values")
  if norms.size and norms.max() > bound:
    raise ValueError(f"{name} has a vector of norm {norms.max():.6g} > norm_bound "
                     f"{bound:.6g}: the certificates need ||f|| <= F (use the same "
                     "norm_bound as smoothed_embed, or project the vectors)")
