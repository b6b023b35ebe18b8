"""Certification against large galleries, streamed over query and candidate chunks.

:func:`certify_gallery` computes what :func:`jaxcert.certification.certify_features`
reports -- Recall@K (Eq. 22) and CR-Recall@K (Eq. 25) under query attacks (Thm 1, 3)
and candidate attacks (Thm 2, 4), two-sided and one-sided -- without any [Q, N]
array: memory is ``O(query_chunk x cand_chunk)`` besides the inputs, so |Q| = 10^4
queries against |C| = 10^5 candidates need tens of MB where the dense path needs
tens of GB.

Per chunk of queries it makes two passes over the candidates, chunk by chunk:

1. Clean distances and the QA / CA distance bounds (Thm 5, 6). The ``K = max(ks)``
   candidates of smallest clean distance (ties to the lower index, the order of
   :func:`jaxcert.ranks.clean_ranks`) are kept with their bounds; their positions
   are their clean ranks. Eq. 25 only makes claims about same-class candidates in
   the clean top K, so these are all the candidates a certificate can rest on, and
   the nearest same-class one among them gives Recall@K.
2. The same bounds again, counted against the kept ones. Thm 1 / 2 read
   ``upper = #{c : L[q, c] <= U[q, s]}`` and ``lower = #{c : U[q, c] < L[q, s]} + 1``
   for a kept candidate ``s``: sums over candidate chunks.

Pass 2 recomputes the bounds rather than storing them. The kept bounds come from
the same compiled computation on the same shapes as the ones they are counted
against, so a candidate compared with itself or with an exact duplicate compares
exactly as in one dense array. The results equal the dense path's number for
number (tests/test_gallery.py), including ties and ``fp_sound``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcert import distance, validate
from jaxcert.interval import Interval

QUERY_CHUNK = 32
CAND_CHUNK = 512
KINDS = ("qa", "qa_one_sided", "ca", "ca_one_sided")
_COUNT_BY_COMPARISON = 64   # K up to this: count by comparison; beyond: search the kept


@dataclasses.dataclass(frozen=True)
class GalleryCertificates:
  """Per-query results of :func:`certify_gallery`.

  ks: the K values as given. best_rank: int32 [Q], the clean rank of the
  nearest same-class candidate when it is ``<= max(ks)``, else ``max(ks) + 1``.
  certified: ``{kind: bool [Q, len(ks)]}`` for kind in :data:`KINDS`: the query has a
  same-class candidate in its clean top K verified with ``alpha = K - Rank`` (Eq. 25;
  ``*_one_sided``: that stays in the top K, :func:`jaxcert.ranks.verify_top_k`).
  """

  ks: tuple[int, ...]
  best_rank: np.ndarray
  certified: dict[str, np.ndarray]

  def queries(self, kind: str, k: int) -> np.ndarray:
    """bool [Q]: the queries certified at ``k`` under ``kind`` (one of :data:`KINDS`),
    the counterpart of :func:`jaxcert.metrics.certified_queries`."""
    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")
    if k not in self.ks:
      raise ValueError(f"k={k!r} was not certified: ks={self.ks}")
    return self.certified[kind][:, self.ks.index(k)]

  def metrics(self) -> dict:
    """The dict of :func:`jaxcert.certification.certify_features`: ``recall`` and
    ``cr_recall_{qa,ca}[_one_sided]``, each ``{K: fraction of queries}``."""
    best = jnp.asarray(self.best_rank)
    out = {"recall": {k: float(jnp.mean(best <= k)) for k in self.ks}}
    for name in ("qa", "ca"):
      for kind in (name, name + "_one_sided"):
        out["cr_recall_" + kind] = {k: float(jnp.mean(jnp.asarray(self.queries(kind, k))))
                                    for k in self.ks}
    return out


def _check_chunk(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer (items per chunk), "
                     f"got {name}={value!r}")
  return int(value)


def _check_finite(x, name: str) -> None:
  x = np.asarray(x)
  # a float64 sum of float32 values cannot overflow: finite iff every value is, without
  # an [N, d] temporary; only a non-finite sum needs the elementwise check
  if not np.isfinite(np.sum(x, dtype=np.float64)) and not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds NaN or infinite values; features and boxes must be "
                     "finite")


def _device(x) -> jax.Array:
  """x as a float32 device array: as is when it already is one; a host array is copied
  (on CPU JAX aliases it instead when it happens to be 64-byte aligned)."""
  if isinstance(x, jax.Array):
    return x.astype(jnp.float32)
  return jax.device_put(np.ascontiguousarray(x, np.float32), may_alias=True)


def _ends(x):
  """(lower, upper) of an Interval, (x, x) of an array."""
  return (x.lower, x.upper) if isinstance(x, Interval) else (x, x)


def _pair_values(q, c, distinct, fp_sound: bool, clean_boxes: bool):
  """Clean distances and QA / CA distance bounds for every (query, candidate) pair.

  q: (features, box lower, box upper, point lower, point upper), each [qc, d];
  c: the same for a chunk of candidates, [nc, d]; distinct: bool [5], all True.
  Returns five [qc, nc] arrays, each computed as :func:`jaxcert.distance.pairwise_distances`
  and :func:`jaxcert.ranks.qa_rank_bounds` / ``ca_rank_bounds`` compute it.
  """
  out = []
  for i in range(5):
    # each output reads its own select (a no-op on the values) of the operands: XLA then
    # fuses each broadcast into its reduction instead of materialising shared
    # [qc, nc, d] operands (about 2.5x faster on CPU)
    qf, qlo, qhi, qplo, qphi = (jnp.where(distinct[i], a, 0)[:, None] for a in q)
    cf, clo, chi, cplo, cphi = (jnp.where(distinct[i], a, 0)[None] for a in c)
    if i == 0:
      out.append(jnp.sqrt(jnp.sum((qf - cf) ** 2, axis=-1)))
    elif i < 3:   # QA: the query's box against the candidate (Thm 1)
      c_pts = Interval(cplo, cphi) if clean_boxes else cf
      out.append(distance.box_distance_bounds(Interval(qlo, qhi), c_pts,
                                              fp_sound=fp_sound)[i - 1])
    else:         # CA: the candidate's box against the query (Thm 2)
      q_pts = Interval(qplo, qphi) if clean_boxes else qf
      out.append(distance.box_distance_bounds(Interval(clo, chi), q_pts,
                                              fp_sound=fp_sound)[i - 3])
  return tuple(out)


def _count(sel_up, sel_lo, up, lo, valid, kmax: int):
  """Per kept candidate s: ``#{valid c : lo[c] <= sel_up[s]}`` and
  ``#{valid c : up[c] < sel_lo[s]}``.

  sel_up, sel_lo [qc, K]: bounds of the kept candidates; up, lo [qc, nc]: bounds of a
  chunk; valid bool [nc]. Exact counts either way.
  """
  if kmax <= _COUNT_BY_COMPARISON:
    n_up = jnp.sum((lo[:, None, :] <= sel_up[:, :, None]) & valid, axis=-1, dtype=jnp.int32)
    n_lo = jnp.sum((up[:, None, :] < sel_lo[:, :, None]) & valid, axis=-1, dtype=jnp.int32)
    return n_up, n_lo

  def per_query(s_up, s_lo, up, lo):
    # with the kept values sorted, c counts for every sorted position t >= p(c);
    # p = K drops invalid c
    o_up, o_lo = jnp.argsort(s_up), jnp.argsort(s_lo)
    p_up = jnp.where(valid, jnp.searchsorted(s_up[o_up], lo, side="left"), kmax)
    p_lo = jnp.where(valid, jnp.searchsorted(s_lo[o_lo], up, side="right"), kmax)
    cum = lambda p: jnp.cumsum(jnp.zeros(kmax + 1, jnp.int32).at[p].add(1))[:kmax]
    unsort = lambda h, o: jnp.zeros(kmax, jnp.int32).at[o].set(h)
    return unsort(cum(p_up), o_up), unsort(cum(p_lo), o_lo)

  return jax.vmap(per_query)(sel_up, sel_lo, up, lo)


@functools.partial(jax.jit, static_argnames=("n", "nc", "ks", "fp_sound", "clean_boxes"))
def _query_chunk(q, ql, c, cl, distinct, *, n: int, nc: int, ks: tuple[int, ...],
                 fp_sound: bool, clean_boxes: bool):
  """Both passes for one chunk of queries (module docstring).

  q: 5 arrays [qc, d]; ql int [qc]; c: 5 arrays [n, d]; cl int [n]; distinct: bool [5],
  all True. Candidate chunk j covers ``[start, start + nc)`` with ``start = min(j nc,
  n - nc)``; entries before ``j nc`` were covered by chunk j - 1 and are masked. Both
  passes run in one loop body, so the kept bounds and the ones counted against them
  come from one compiled computation. Returns (best_rank [qc], certified bool
  [4, qc, len(ks)], all clean distances finite).
  """
  kmax = max(ks)
  qc = ql.shape[0]
  num_chunks = -(-n // nc)

  def select(state, values, idx, valid, labels):
    (best_d, best_i, payload, finite), counts = state
    dist, *bounds = values
    finite = finite & jnp.all(jnp.isfinite(dist) | ~valid)
    dist = jnp.where(valid, dist, jnp.inf)
    # top_k keeps the lower position among equal values: the kept entries (from
    # earlier chunks, lower indices) first, then this chunk in index order
    _, pos = jax.lax.top_k(-jnp.concatenate([best_d, dist], axis=1), kmax)
    take = lambda a, b: jnp.take_along_axis(jnp.concatenate([a, b], axis=1), pos, axis=1)
    rel = ql[:, None] == labels[None]
    payload = tuple(take(a, b) for a, b in zip(payload, (*bounds, rel), strict=True))
    best_i = take(best_i, jnp.broadcast_to(idx, (qc, nc)))
    return (take(best_d, dist), best_i, payload, finite), counts

  def count(state, values, idx, valid, labels):
    del idx, labels
    kept, counts = state
    qa_u, qa_l, ca_u, ca_l, _ = kept[2]
    new = (_count(qa_u, qa_l, values[1], values[2], valid, kmax)
           + _count(ca_u, ca_l, values[3], values[4], valid, kmax))
    return kept, tuple(a + b for a, b in zip(counts, new, strict=True))

  def body(i, state):
    j = i % num_chunks
    start = jnp.minimum(j * nc, n - nc)
    idx = start + jnp.arange(nc, dtype=jnp.int32)
    valid = idx >= j * nc
    cj = tuple(jax.lax.dynamic_slice_in_dim(a, start, nc) for a in c)
    labels = jax.lax.dynamic_slice_in_dim(cl, start, nc)
    values = _pair_values(q, cj, distinct, fp_sound, clean_boxes)
    return jax.lax.cond(i >= num_chunks, count, select, state, values, idx, valid, labels)

  # initial entries: +inf distance, so any finite one replaces them
  kept = (jnp.full((qc, kmax), jnp.inf), jnp.full((qc, kmax), jnp.iinfo(jnp.int32).max),
          tuple(jnp.zeros((qc, kmax), dt) for dt in (jnp.float32,) * 4 + (bool,)),
          jnp.array(True))
  counts = (jnp.zeros((qc, kmax), jnp.int32),) * 4
  kept, counts = jax.lax.fori_loop(0, 2 * num_chunks, body, (kept, counts))
  rel, finite = kept[2][4], kept[3]
  qa_up, qa_lo, ca_up, ca_lo = counts

  j = jnp.arange(1, kmax + 1, dtype=jnp.int32)[None]          # clean rank of each kept
  best = jnp.min(jnp.where(rel, j, kmax + 1), axis=1)
  out = []
  for up, lo in ((qa_up, qa_lo + 1), (ca_up, ca_lo + 1)):
    for one_sided in (False, True):
      per_k = []
      for k in ks:
        ok = rel & (j <= k) & (up <= k)
        if not one_sided:
          ok = ok & (lo >= 2 * j - k)
        per_k.append(jnp.any(ok, axis=1))
      out.append(jnp.stack(per_k, axis=1))
  return best.astype(jnp.int32), jnp.stack(out), finite


def certify_gallery(query_features, query_boxes: Interval, query_labels, cand_features,
                    cand_boxes: Interval, cand_labels, ks: Sequence[int] = (1, 10, 20, 40),
                    *, fp_sound: bool = False,
                    clean_boxes: tuple[Interval, Interval] | None = None,
                    query_chunk: int = QUERY_CHUNK,
                    cand_chunk: int = CAND_CHUNK) -> GalleryCertificates:
  """Recall@K and CR-Recall@K (QA and CA, two- and one-sided) with bounded memory.

  Arguments as :func:`jaxcert.certification.certify_features`: query_features [Q, d],
  query_boxes Interval [Q, d], cand_features [N, d], cand_boxes Interval [N, d],
  integer labels [Q] and [N]; ``fp_sound``: float-sound distance bounds;
  ``clean_boxes`` (query [Q, d], candidate [N, d]): boxes around the clean features
  used in the distance bounds in place of the points (the clean ranking still uses
  the points). ``query_chunk`` queries and ``cand_chunk`` candidates are processed at a
  time: besides the inputs (host arrays are copied to the device once, as float32),
  the working set is a few ``query_chunk x cand_chunk x max(d, K)`` arrays, independent
  of Q and N. ``.metrics()`` of the result equals ``certify_features``' dict and the
  per-query sets equal the dense ones, for any chunk sizes (tested; in float terms each
  distance is the same XLA reduction as in the dense path, whose summation order XLA
  can change for a chunk of fewer than about 32 pairs, moving a distance by an ulp).
  """
  qc, nc = _check_chunk(query_chunk, "query_chunk"), _check_chunk(cand_chunk, "cand_chunk")
  q, n = len(query_features), len(cand_features)
  validate.check_gallery(n)
  validate.check_same_dim(query_features, cand_features, "query_features", "cand_features")
  d = np.shape(query_features)[1]
  validate.check_shape(query_boxes.lower, (q, d), "query_boxes")
  validate.check_shape(cand_boxes.lower, (n, d), "cand_boxes")
  validate.check_shape(query_labels, (q,), "query_labels")
  validate.check_shape(cand_labels, (n,), "cand_labels")
  ks = validate.check_ks(ks, n)
  if clean_boxes is not None:
    validate.check_shape(clean_boxes[0].lower, (q, d), "clean_boxes[0]")
    validate.check_shape(clean_boxes[1].lower, (n, d), "clean_boxes[1]")
  named = {"query_features": query_features, "cand_features": cand_features,
           "query_boxes": query_boxes, "cand_boxes": cand_boxes}
  if clean_boxes is not None:
    named.update({"clean_boxes[0]": clean_boxes[0], "clean_boxes[1]": clean_boxes[1]})
  for name, x in named.items():
    for end in jax.tree.leaves(x):
      _check_finite(end, name)
  if q == 0:
    return GalleryCertificates(ks, np.zeros(0, np.int32),
                               {kind: np.zeros((0, len(ks)), bool) for kind in KINDS})

  memo = {}   # one device array per distinct input (the features double as points)

  def dev(x):
    if id(x) not in memo:
      memo[id(x)] = _device(x)
    return memo[id(x)]

  def arrays(feat, box, pts):
    return (dev(feat), dev(box.lower), dev(box.upper), *(dev(e) for e in _ends(pts)))

  qpts, cpts = clean_boxes if clean_boxes is not None else (query_features, cand_features)
  c = arrays(cand_features, cand_boxes, cpts)
  cl = jnp.asarray(cand_labels)
  qa = arrays(query_features, query_boxes, qpts)
  ql = jnp.asarray(query_labels)
  qc, nc = min(qc, q), min(nc, n)
  run = functools.partial(_query_chunk, n=n, nc=nc, ks=ks, fp_sound=bool(fp_sound),
                          clean_boxes=clean_boxes is not None)
  distinct = jnp.ones(5, bool)
  best = np.empty(q, np.int32)
  cert = np.empty((len(KINDS), q, len(ks)), bool)
  for lo in range(0, q, qc):
    rows = np.minimum(np.arange(lo, lo + qc), q - 1)   # the last chunk repeats its last row
    b, ok, finite = run(tuple(a[rows] for a in qa), ql[rows], c, cl, distinct)
    if not bool(finite):
      raise ValueError("clean distances overflow float32 (features too large, e.g. "
                       f"max |feature| = {float(np.max(np.abs(query_features))):.3g}); "
                       "scale the features down")
    keep = slice(0, min(qc, q - lo))
    best[lo:lo + qc] = np.asarray(b)[keep]
    cert[:, lo:lo + qc] = np.asarray(ok)[:, keep]
  return GalleryCertificates(ks, best, dict(zip(KINDS, cert, strict=True)))
