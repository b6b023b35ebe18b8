"""Certifying retrieval rankings of a trained extractor (CBIR paper Sec. 3, 5.1.2).

``certify_features`` turns clean features and IBP feature boxes into Recall@K and
CR-Recall@K under query attacks (Thm 1, 3) and candidate attacks (Thm 2, 4).
``certify`` is what ``certify.py`` runs: checkpoint + data -> results dict -> report.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from jaxcert import data as data_lib
from jaxcert import attacks, distance, metrics, models, ranks, report, training, validate
from jaxcert.interval import Interval, ibp, input_box
from jaxcert.models import embed  # noqa: F401  (part of this module's API)


def feature_boxes(apply, params, images: np.ndarray, eps: float, *,
                  batch_size: int = 256) -> Interval:
  """IBP boxes containing f(x + delta) for all ||delta||_inf <= eps, x + delta in [0, 1].

  images: float [N, H, W, C] in [0, 1]. Returns Interval [N, d].
  """
  eps = validate.check_eps(eps)
  validate.check_images(images)
  fn = jax.jit(lambda p, x: ibp(lambda z: apply(p, z))(input_box(x, eps)))
  return models.map_batches(lambda x: fn(params, x), images, batch_size)


def certify_features(query_features, query_boxes: Interval, query_labels,
                     cand_features, cand_boxes: Interval, cand_labels,
                     ks: Sequence[int] = (1, 10, 20, 40)) -> dict:
  """Recall@K (Eq. 22) and CR-Recall@K (Eq. 25) for QA and CA.

  query_features [Q, d], query_boxes Interval [Q, d] (boxes of f(q + delta)),
  cand_features [N, d], cand_boxes Interval [N, d] (boxes of f(c + delta)),
  labels [Q] and [N]. Returns a dict of {K: value} per metric. CR-Recall is the
  paper's two-sided test; ``*_one_sided`` only demands that the same-class image
  stays in the top K.
  """
  return _certify(query_features, query_boxes, query_labels, cand_features, cand_boxes,
                  cand_labels, ks)[0]


def _certify(query_features, query_boxes, query_labels, cand_features, cand_boxes,
             cand_labels, ks):
  """certify_features, plus (QA bounds, CA bounds, clean ranks) for the audits."""
  q, n = len(query_features), len(cand_features)
  validate.check_gallery(n)
  validate.check_same_dim(query_features, cand_features, "query_features", "cand_features")
  validate.check_shape(query_boxes.lower, (q, np.shape(query_features)[1]), "query_boxes")
  validate.check_shape(cand_boxes.lower, (n, np.shape(cand_features)[1]), "cand_boxes")
  ks = validate.check_ks(ks, n)

  _, clean_rank = ranks.clean_ranks(distance.pairwise_distances(query_features,
                                                                cand_features))
  qa = ranks.qa_rank_bounds(query_boxes, cand_features)
  ca = ranks.ca_rank_bounds(cand_boxes, query_features)
  out = {"recall": metrics.recall_at_k(clean_rank, query_labels, cand_labels, ks)}
  for name, b in (("qa", qa), ("ca", ca)):
    out[f"cr_recall_{name}"] = metrics.cr_recall_at_k(b, clean_rank, query_labels,
                                                      cand_labels, ks)
    out[f"cr_recall_{name}_one_sided"] = metrics.cr_recall_at_k(
        b, clean_rank, query_labels, cand_labels, ks, one_sided=True)
  return out, qa, ca, clean_rank


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
  apply, params, step, (q_idx, qx, ql), (c_idx, cx, cl) = load_model_and_split(
      config, workdir)

  t0 = time.perf_counter()
  qf = embed(apply, params, qx, batch_size=c.batch_size)
  cf = embed(apply, params, cx, batch_size=c.batch_size)
  qb = feature_boxes(apply, params, qx, eps, batch_size=c.batch_size)
  cb = feature_boxes(apply, params, cx, eps, batch_size=c.batch_size)
  t1 = time.perf_counter()
  res, qa_bounds, ca_bounds, clean_rank = _certify(qf, qb, ql, cf, cb, cl, ks)
  t2 = time.perf_counter()
  log(f"features and IBP boxes: {t1 - t0:.1f}s; rank bounds and metrics: {t2 - t1:.1f}s")
  seconds = {"features_and_boxes": t1 - t0, "certify": t2 - t1}
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
      "attack": attack_info,
      "metrics": {k: {str(kk): v for kk, v in d.items()} for k, d in res.items()},
      "config": config.to_dict(),
      "versions": {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]},
  }
  out = output_dir or f"{workdir}/certify"
  report.write_report(out, results)
  log(report.markdown_table(results))
  log(f"wrote {out}/results.json, results.md, cr_recall.png")
  return results
