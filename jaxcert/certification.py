"""Certifying retrieval rankings of a trained extractor (CBIR paper Sec. 3, 5.1.2).

``certify_features`` turns clean features and IBP feature boxes into Recall@K and
CR-Recall@K under query attacks (Thm 1, 3) and candidate attacks (Thm 2, 4).
``certify`` is what ``certify.py`` runs: checkpoint + data -> results dict -> report.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from jaxcert import (
  attacks,
  distance,
  gallery,
  linear_bounds,
  metrics,
  models,
  ranks,
  report,
  training,
  validate,
)
from jaxcert import data as data_lib
from jaxcert.interval import Interval, ibp, input_box
from jaxcert.models import embed  # noqa: F401  (part of this module's API)

# Above this many (query, candidate) pairs _certify streams (jaxcert.gallery) instead of
# building dense [Q, N] arrays (each 4 bytes a pair; the dense path holds about ten).
DENSE_MAX_PAIRS = 2 ** 22


def feature_boxes(apply, params, images: np.ndarray, eps: float, *,
                  batch_size: int = 256, fp_sound: bool = False,
                  method: str = "ibp") -> Interval:
  """Boxes containing f(x + delta) for all ||delta||_inf <= eps, x + delta in [0, 1].

  ``method``: ``"ibp"`` (interval bound propagation), or ``"crown_ibp"`` / ``"crown"``
  (back-substituted linear bounds, :mod:`jaxcert.linear_bounds`: tighter, costlier,
  feed-forward ReLU networks only).

  images: float [N, H, W, C] in [0, 1]. Returns Interval [N, d]. ``fp_sound``: the
  boxes also hold despite float32 rounding and contain the float forward pass of
  every such input (:mod:`jaxcert.interval`); with ``eps = 0`` they are boxes around
  the clean features that contain the exact and every IEEE float32 evaluation.
  """
  eps = validate.check_eps(eps)
  validate.check_images(images)
  if method not in linear_bounds.METHODS:
    raise ValueError(f"method must be one of {linear_bounds.METHODS}, got method={method!r}")
  if method == "ibp":
    fn = jax.jit(lambda p, x: ibp(lambda z: apply(p, z), fp_sound=fp_sound)(
        input_box(x, eps, fp_sound=fp_sound)))
  else:
    linear_bounds.check_batch_independent(lambda z: apply(params, z), images[:2])
    fn = jax.jit(lambda p, x: linear_bounds.linear_bounds(
        lambda z: apply(p, z), method, fp_sound=fp_sound)(input_box(x, eps, fp_sound=fp_sound)))
  return models.map_batches(lambda x: fn(params, x), images, batch_size)


def certify_features(query_features, query_boxes: Interval, query_labels,
                     cand_features, cand_boxes: Interval, cand_labels,
                     ks: Sequence[int] = (1, 10, 20, 40), *, fp_sound: bool = False,
                     clean_boxes: tuple[Interval, Interval] | None = None) -> dict:
  """Recall@K (Eq. 22) and CR-Recall@K (Eq. 25) for QA and CA.

  query_features [Q, d], query_boxes Interval [Q, d] (boxes of f(q + delta)),
  cand_features [N, d], cand_boxes Interval [N, d] (boxes of f(c + delta)),
  labels [Q] and [N]. Returns a dict of {K: value} per metric. CR-Recall is the
  paper's two-sided test; ``*_one_sided`` only demands that the same-class image
  stays in the top K. ``fp_sound``: float-sound distance bounds; ``clean_boxes``
  (query [Q, d], candidate [N, d]): boxes around the clean features used in the
  distance bounds instead of the points (e.g. ``feature_boxes(..., 0.0, fp_sound=True)``,
  which contain the exact clean features); the clean ranking still uses the points.
  Above ``DENSE_MAX_PAIRS`` query-candidate pairs the work is streamed in chunks
  (:func:`jaxcert.gallery.certify_gallery`, same numbers, memory independent of Q N).
  """
  return _certify(query_features, query_boxes, query_labels, cand_features, cand_boxes,
                  cand_labels, ks, fp_sound=fp_sound, clean_boxes=clean_boxes)[0]


def _certify(query_features, query_boxes, query_labels, cand_features, cand_boxes,
             cand_labels, ks, *, fp_sound=False, clean_boxes=None, dense=None):
  """certify_features, plus (QA bounds, CA bounds, clean ranks) for the audits.

  ``dense``: build the [Q, N] RankBounds and clean ranks (True), or stream
  (False: returns ``(metrics, certs, certs, None)`` with ``certs`` the per-query
  :class:`jaxcert.gallery.GalleryCertificates`); None: stream above DENSE_MAX_PAIRS.
  """
  q, n = len(query_features), len(cand_features)
  if dense is False or (dense is None and q * n > DENSE_MAX_PAIRS):
    certs = gallery.certify_gallery(query_features, query_boxes, query_labels, cand_features,
                                    cand_boxes, cand_labels, ks, fp_sound=fp_sound,
                                    clean_boxes=clean_boxes)
    return certs.metrics(), certs, certs, None
  validate.check_gallery(n)
  validate.check_same_dim(query_features, cand_features, "query_features", "cand_features")
  validate.check_shape(query_boxes.lower, (q, np.shape(query_features)[1]), "query_boxes")
  validate.check_shape(cand_boxes.lower, (n, np.shape(cand_features)[1]), "cand_boxes")
  ks = validate.check_ks(ks, n)

  _, clean_rank = ranks.clean_ranks(distance.pairwise_distances(query_features,
                                                                cand_features))
  if clean_boxes is not None:
    validate.check_shape(clean_boxes[0].lower, np.shape(query_features), "clean_boxes[0]")
    validate.check_shape(clean_boxes[1].lower, np.shape(cand_features), "clean_boxes[1]")
  q_pts, c_pts = clean_boxes if clean_boxes is not None else (query_features, cand_features)
  qa = ranks.qa_rank_bounds(query_boxes, c_pts, fp_sound=fp_sound)
  ca = ranks.ca_rank_bounds(cand_boxes, q_pts, fp_sound=fp_sound)
  out = {"recall": metrics.recall_at_k(clean_rank, query_labels, cand_labels, ks)}
  for name, b in (("qa", qa), ("ca", ca)):
    out[f"cr_recall_{name}"] = metrics.cr_recall_at_k(b, clean_rank, query_labels,
                                                      cand_labels, ks)
    out[f"cr_recall_{name}_one_sided"] = metrics.cr_recall_at_k(
        b, clean_rank, query_labels, cand_labels, ks, one_sided=True)
  return out, qa, ca, clean_rank


def fp_sound_cost(sound: dict, plain: dict, clean_rank, query_labels, cand_labels,
                  ks: Sequence[int]) -> dict:
  """Certified (query, K) claims (Eq. 25, two-sided) that the fp-sound widening costs.

  sound, plain: ``{"qa": RankBounds, "ca": RankBounds}`` from fp-sound and from
  unwidened boxes (or the streamed ``GalleryCertificates`` of ``_certify``). Returns
  ``{"qa": {"K": {"plain": n, "sound": n, "lost": n}}, "ca": ...}`` with counts of
  queries: certified by the plain bounds, by the sound ones, and certified by the plain
  bounds but not by the sound ones.
  """
  out = {}
  for kind in ("qa", "ca"):
    out[kind] = {}
    for k in ks:
      s, p = (b.queries(kind, k) if isinstance(b, gallery.GalleryCertificates) else
              metrics.certified_queries(b, clean_rank, query_labels, cand_labels, k)
              for b in (sound[kind], plain[kind]))
      out[kind][str(k)] = {"plain": int(p.sum()), "sound": int(s.sum()),
                           "lost": int((p & ~s).sum())}
  return out


def _attack(apply, params, qx, ql, qf, cx, cl, cf, eps, ks, c, log, seconds) -> dict:
  """ER-Recall@K (Eq. 23, 24) from PGD query and candidate attacks."""
  kw = dict(steps=c.attack_steps, step_size=c.attack_step_size, seed=c.attack_seed,
            restarts=c.attack_restarts)
  t0 = time.perf_counter()
  adv, _ = attacks.query_attack(apply, params, qx, ql, cf, cl, eps, **kw)
  er_qa = attacks.er_recall_qa(embed(apply, params, adv), cf, ql, cl, ks)
  t1 = time.perf_counter()
  log(f"QA attack ({len(qx)} queries, {c.attack_steps} steps): {t1 - t0:.1f}s")
  src, feats = attacks.candidate_attack(apply, params, qf, ql, cx, cf, cl, eps,
                                        num_sources=c.ca_sources, **kw)
  er_ca = attacks.er_recall_ca(qf, cf, src, feats, ql, cl, ks)
  t2 = time.perf_counter()
  log(f"CA attack ({len(qx)} x {c.ca_sources} sources, {c.attack_steps} steps): "
      f"{t2 - t1:.1f}s")
  seconds.update(qa_attack=t1 - t0, ca_attack=t2 - t1)
  return {"er_recall_qa": er_qa, "er_recall_ca": er_ca}


def load_model_and_split(config: ml_collections.ConfigDict, workdir: str):
  """The latest checkpoint in ``workdir`` and the Q / C draw from the test split.

  Returns ``(apply, params, step, (q_idx, qx, ql), (c_idx, cx, cl))`` with images
  float in [0, 1]; Q and C do not overlap (``data.num_queries``,
  ``data.num_candidates``, ``data.split_seed``).
  """
  shape = data_lib.config_image_shape(config.data)
  graphdef, params, step = training.load_trained(config, workdir, shape)
  split = data_lib.load_config_split(config.data, "test")
  q_idx, c_idx = data_lib.query_candidate_split(
      split.labels, config.data.num_queries, config.data.num_candidates,
      config.data.split_seed)
  images = data_lib.to_float(split.images)
  return (models.apply_fn(graphdef), params, step,
          (q_idx, images[q_idx], split.labels[q_idx]),
          (c_idx, images[c_idx], split.labels[c_idx]))


def certify(config: ml_collections.ConfigDict, workdir: str, *,
            output_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
  """Loads the latest checkpoint in ``workdir``, certifies Q against C, writes a report.

  Q and C are drawn without overlap from the test split (``data.num_queries``,
  ``data.num_candidates``, ``data.split_seed``). Writes results.json, results.md and
  cr_recall.png to ``output_dir`` (default ``workdir/certify``) atomically.
  With ``certify.method = "smoothing"`` it runs :func:`jaxcert.smoothed_certify.certify`
  instead (l_2 randomized-smoothing certificates, default ``workdir/certify_smoothing``).
  """
  c = config.certify
  if c.method == "smoothing":
    from jaxcert import smoothed_certify
    return smoothed_certify.certify(config, workdir, output_dir=output_dir, log=log)
  if c.method != "ibp":
    raise ValueError(f"config.certify.method must be 'ibp' or 'smoothing', got "
                     f"{c.method!r}")
  eps = validate.check_eps(c.eps, "config.certify.eps")
  ks = validate.check_ks(tuple(c.ks), config.data.num_candidates, "config.certify.ks")
  for key in ("attack_steps", "ca_sources", "batch_size", "attack_restarts", "audit_pool"):
    if int(c[key]) < 1:
      raise ValueError(f"config.certify.{key} must be >= 1, got {c[key]!r}")
  if c.bound_method not in linear_bounds.METHODS:
    raise ValueError(f"config.certify.bound_method must be one of {linear_bounds.METHODS}, "
                     f"got {c.bound_method!r}")
  fp = bool(c.fp_sound)
  apply, params, step, (q_idx, qx, ql), (c_idx, cx, cl) = load_model_and_split(
      config, workdir)

  boxes = functools.partial(feature_boxes, apply, params, batch_size=c.batch_size)
  t0 = time.perf_counter()
  qf = embed(apply, params, qx, batch_size=c.batch_size)
  cf = embed(apply, params, cx, batch_size=c.batch_size)
  qb = boxes(qx, eps, fp_sound=fp, method=c.bound_method)
  cb = boxes(cx, eps, fp_sound=fp, method=c.bound_method)
  # fp-sound: the clean features enter the distance bounds as eps = 0 boxes, which
  # contain the exact f(x) and every IEEE float32 evaluation of it.
  clean = (boxes(qx, 0.0, fp_sound=True), boxes(cx, 0.0, fp_sound=True)) if fp else None
  t1 = time.perf_counter()
  dense = True if c.attack and c.audit else None   # the audits read dense rank bounds
  res, qa_bounds, ca_bounds, clean_rank = _certify(qf, qb, ql, cf, cb, cl, ks, fp_sound=fp,
                                                   clean_boxes=clean, dense=dense)
  t2 = time.perf_counter()
  log(f"features and {c.bound_method} boxes: {t1 - t0:.1f}s; rank bounds and metrics: "
      f"{t2 - t1:.1f}s")
  seconds = {"features_and_boxes": t1 - t0, "certify": t2 - t1}
  fp_cost = None
  if fp:
    # The same bound method without the widening (the cost of fp_sound alone).
    plain = [boxes(x, eps, method=c.bound_method) for x in (qx, cx)]
    _, plain_qa, plain_ca, _ = _certify(qf, plain[0], ql, cf, plain[1], cl, ks, dense=dense)
    fp_cost = fp_sound_cost({"qa": qa_bounds, "ca": ca_bounds},
                            {"qa": plain_qa, "ca": plain_ca}, clean_rank, ql, cl, ks)
    seconds["fp_sound_cost"] = time.perf_counter() - t2
    log(report.fp_sound_line(fp_cost, ks))
  attack_info = None
  if c.attack:
    attack_info = {"steps": c.attack_steps, "ca_sources": c.ca_sources,
                   "step_size": c.attack_step_size or eps / 10, "seed": c.attack_seed,
                   "restarts": c.attack_restarts}
    res.update(_attack(apply, params, qx, ql, qf, cx, cl, cf, eps, ks, c, log, seconds))
    if c.audit:
      kw = dict(steps=c.attack_steps, step_size=c.attack_step_size,
                restarts=c.attack_restarts, seed=c.attack_seed)
      t3 = time.perf_counter()
      attack_info["qa_audit"] = attacks.audit_qa(apply, params, qx, cf, qa_bounds,
                                                 clean_rank, ql, cl, ks, eps, **kw)
      t4 = time.perf_counter()
      attack_info["ca_audit"] = attacks.audit_ca(apply, params, qf, cx, cf, ca_bounds,
                                                 clean_rank, ql, cl, ks, eps,
                                                 pool=c.audit_pool, **kw)
      t5 = time.perf_counter()
      seconds.update(qa_audit=t4 - t3, ca_audit=t5 - t4)
      for kind in ("qa", "ca"):
        au = attack_info[f"{kind}_audit"]
        log(f"{kind.upper()} certificate audit: {au['broken']} of {au['claims']} certified "
            f"claims broken ({seconds[kind + '_audit']:.1f}s)")
        if au["broken"]:
          log(f"WARNING: an attack broke a certified {kind.upper()} claim: this is a "
              "soundness bug, please report it with results.json")

  results = {
      "method": config.train.method,
      "arch": config.model.arch,
      "dataset": config.data.name,
      "eps": eps,
      "ks": list(ks),
      "checkpoint_step": step,
      "num_queries": len(q_idx),
      "num_candidates": len(c_idx),
      "split_seed": config.data.split_seed,
      "seed": config.seed,
      "query_indices": q_idx.tolist(),
      "candidate_indices": c_idx.tolist(),
      "mean_box_width": {"query": float(np.mean(qb.upper - qb.lower)),
                         "candidate": float(np.mean(cb.upper - cb.lower))},
      "seconds": seconds,
      "fp_sound": fp,
      "bound_method": c.bound_method,
      "fp_sound_cost": fp_cost,
      "attack": attack_info,
      "metrics": {k: {str(kk): v for kk, v in d.items()} for k, d in res.items()},
      "config": config.to_dict(),
      **report.results_metadata(config),   # "run_info" and "versions"
  }
  out = output_dir or f"{workdir}/certify"
  report.write_report(out, results)
  log(report.markdown_table(results))
  log(f"wrote {out}/results.json, results.md, cr_recall.png")
  return results
