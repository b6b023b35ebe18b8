"""``certify.py`` with ``certify.method = "smoothing"``: RetrievalGuard's l_2
certificates for a trained extractor, and ours beside them (MATH.md B, C).

Queries and gallery are the same Q / C draw from the test split as the IBP path.
The gallery is ``fixed`` (base embeddings f(c), projected to ``||f|| <= F``;
only queries are smoothed, ``rho' = rho``) or ``smoothed`` (g_hat(c) with the same
n, union bound ``rho' = rho / (|C| + 1)``; the half-space certificates need a fixed
gallery and are skipped). Writes ``results.json`` (metrics, per-query radii),
``results.md`` and ``certified_recall.png`` atomically.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from jaxcert import certification, models, report, smoothing, validate

GALLERY_MODES = ("fixed", "smoothed")
SIGMA_MULTIPLES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def check_config(config: ml_collections.ConfigDict) -> None:
  s = config.smoothing
  if s.gallery not in GALLERY_MODES:
    raise ValueError(f"config.smoothing.gallery must be one of {GALLERY_MODES}, got "
                     f"{s.gallery!r}")
  smoothing._check_positive(s.sigma, "config.smoothing.sigma")
  smoothing._check_rho(s.rho, "config.smoothing.rho")
  smoothing._check_positive(s.norm_bound, "config.smoothing.norm_bound")
  for key in ("num_samples", "chunk_size", "batch_images", "max_positives", "num_radii"):
    smoothing._check_positive(s[key], f"config.smoothing.{key}", integer=True)
  validate.check_ks(tuple(s.ks), config.data.num_candidates, "config.smoothing.ks")


def certify(config: ml_collections.ConfigDict, workdir: str, *,
            output_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
  """Smoothed retrieval and its certificates for the latest checkpoint in ``workdir``."""
  check_config(config)
  s = config.smoothing
  apply, params, step, (q_idx, qx, ql), (c_idx, cx, cl) = (
      certification.load_model_and_split(config, workdir))
  fbound = float(s.norm_bound)
  key = jax.random.key(s.seed)
  kw = dict(sigma=s.sigma, num_samples=s.num_samples, norm_bound=fbound,
            chunk_size=s.chunk_size, batch_images=s.batch_images, log=log)

  seconds = {}
  t0 = time.perf_counter()
  base_q = np.asarray(smoothing.project_to_ball(models.embed(apply, params, qx), fbound),
                      np.float64)
  base_c = np.asarray(smoothing.project_to_ball(models.embed(apply, params, cx), fbound),
                      np.float64)
  dim = base_q.shape[1]
  log(f"smoothing {len(qx)} queries (sigma {s.sigma}, n {s.num_samples})")
  eb = bool(s.empirical_bernstein) and s.gallery == "fixed"
  zq = smoothing.smoothed_embed(apply, params, qx, key=jax.random.fold_in(key, 0),
                                covariance=eb, **kw)
  zq, cov = zq if eb else (zq, None)
  seconds["smooth_queries"] = time.perf_counter() - t0
  if s.gallery == "smoothed":
    t1 = time.perf_counter()
    log(f"smoothing the gallery: {len(cx)} candidates")
    gallery = smoothing.smoothed_embed(apply, params, cx, key=jax.random.fold_in(key, 1),
                                       **kw)
    seconds["smooth_gallery"] = time.perf_counter() - t1
    t_q = smoothing.certified_t(s.num_samples, dim, fbound, s.rho,
                                gallery_size=len(cx), chunk_size=s.chunk_size)
    t_g = t_q
  else:
    gallery = base_c
    t_q = smoothing.certified_t(s.num_samples, dim, fbound, s.rho, chunk_size=s.chunk_size)
    t_g = 0.0
  base_recall = float(np.mean(smoothing.minimum_margin(base_q, ql, base_c, cl) > 0))
  rate = ((len(qx) + (len(cx) if s.gallery == "smoothed" else 0)) * s.num_samples
          / (seconds["smooth_queries"] + seconds.get("smooth_gallery", 0.0)))
  arrays = {"query_indices": q_idx, "query_labels": ql, "smoothed_queries": zq,
            "candidate_indices": c_idx, "candidate_labels": cl, "gallery": gallery}
  if cov is not None:
    arrays["query_covariance"] = cov
  meta = {"checkpoint_step": step, "embed_dim": int(dim), "base_recall_at_1": base_recall,
          "samples_per_second": rate, "seconds": seconds}
  return _certify_and_report(config, arrays, meta, t_q, t_g,
                             output_dir or f"{workdir}/certify_smoothing", log)


def recertify(results_dir: str, *, rho: float | None = None, ks=None,
              output_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
  """Recomputes the certificates of an earlier smoothing run from its saved
  ``embeddings.npz`` (no sampling), optionally at another ``rho`` or other ``ks``;
  rewrites the report in ``output_dir`` (default: ``results_dir`` itself)."""
  with open(os.path.join(results_dir, "results.json")) as f:
    old = json.load(f)
  config = ml_collections.ConfigDict(old["config"])
  if rho is not None:
    config.smoothing.rho = rho
  if ks is not None:
    config.smoothing.ks = tuple(ks)
  check_config(config)
  s = config.smoothing
  with np.load(os.path.join(results_dir, "embeddings.npz")) as z:
    arrays = {k: z[k] for k in z.files}
  n_c = len(arrays["candidate_labels"])
  dim = arrays["smoothed_queries"].shape[1]
  gal = n_c if s.gallery == "smoothed" else None
  t_q = smoothing.certified_t(s.num_samples, dim, s.norm_bound, s.rho, gallery_size=gal,
                              chunk_size=s.chunk_size)
  t_g = t_q if s.gallery == "smoothed" else 0.0
  meta = {k: old[k] for k in ("checkpoint_step", "embed_dim", "samples_per_second",
                              "seconds")}
  meta["base_recall_at_1"] = old["metrics"]["base_recall_at_1"]
  return _certify_and_report(config, arrays, meta, t_q, t_g, output_dir or results_dir, log)


def _certify_and_report(config, arrays: dict, meta: dict, t_q: float, t_g: float,
                        out: str, log) -> dict:
  s = config.smoothing
  fbound = float(s.norm_bound)
  q_idx, ql = arrays["query_indices"], arrays["query_labels"]
  c_idx, cl = arrays["candidate_indices"], arrays["candidate_labels"]
  zq, gallery = arrays["smoothed_queries"], arrays["gallery"]
  ks = validate.check_ks(tuple(s.ks), len(c_idx), "config.smoothing.ks")
  seconds = dict(meta["seconds"])
  t2 = time.perf_counter()
  cert = smoothing.certify_smoothed(zq, ql, gallery, cl, sigma=s.sigma, norm_bound=fbound,
                                    t_query=t_q, t_gallery=t_g, ks=ks,
                                    max_positives=s.max_positives,
                                    cov=arrays.get("query_covariance"),
                                    num_samples=s.num_samples, rho=s.rho,
                                    chunk_size=s.chunk_size)
  seconds["certify"] = time.perf_counter() - t2

  hs = cert["halfspace_radius"]
  finite = hs[np.isfinite(hs) & (hs > 0)]
  top = max(1.5 * s.sigma, float(np.max(finite)) if finite.size else 0.0)
  grid = np.linspace(0.0, min(top * 1.05, 4.0 * s.sigma), int(s.num_radii))
  curves = {"paper": smoothing.certified_recall_curve(cert["paper_radius"], grid)}
  for name, rad in _radius_columns(cert, ks, s.gallery).items():
    if name != "paper":
      curves[name] = smoothing.certified_recall_curve(rad, grid)
  at = {}
  for mult in SIGMA_MULTIPLES:
    r = np.array([mult * s.sigma])
    at[f"{mult:g}"] = {name: float(smoothing.certified_recall_curve(rad, r)[0])
                       for name, rad in _radius_columns(cert, ks, s.gallery).items()}

  results = {
      "certificate": "randomized smoothing (l_2)",
      "method": config.train.method,
      "arch": config.model.arch,
      "dataset": config.data.name,
      "checkpoint_step": meta["checkpoint_step"],
      "sigma": float(s.sigma),
      "num_samples": int(s.num_samples),
      "rho": float(s.rho),
      "norm_bound": fbound,
      "embed_dim": meta["embed_dim"],
      "gallery": s.gallery,
      "t_query": t_q,
      "t_gallery": t_g,
      "ks": list(ks),
      "num_queries": len(q_idx),
      "num_candidates": len(c_idx),
      "split_seed": config.data.split_seed,
      "metrics": {
          "base_recall_at_1": meta["base_recall_at_1"],
          "smoothed_recall_at_1": float(np.mean(cert["score"])),
          "rejected_ratio": float(np.mean(cert["rejected"])),
          "certified_recall_at_sigma_multiples": at,
          "median_certified_radius": {
              name: float(np.median(np.where(rad > 0, rad, 0.0)))
              for name, rad in _radius_columns(cert, ks, s.gallery).items()},
      },
      "curve": {"radius": grid.tolist(), **{k: v.tolist() for k, v in curves.items()}},
      "per_query": [
          {"index": int(qi), "label": int(lb), "score": int(sc), "margin": _num(mg),
           "paper_radius": _num(pr),
           "halfspace_radius": {str(k): _num(h) for k, h in zip(ks, hrow, strict=True)},
           **({"halfspace_eb_radius": {str(k): _num(h) for k, h in zip(ks, erow, strict=True)}}
              if erow is not None else {})}
          for qi, lb, sc, mg, pr, hrow, erow in zip(
              q_idx, ql, cert["score"], cert["margin"], cert["paper_radius"], hs,
              cert.get("halfspace_eb_radius", [None] * len(q_idx)), strict=True)],
      "seconds": seconds,
      "samples_per_second": meta["samples_per_second"],
      "config": config.to_dict(),
      **report.results_metadata(config),   # "run_info" and "versions"
  }
  write_report(out, results, arrays)
  log(markdown_table(results))
  log(f"wrote {out}/results.json, results.md, certified_recall.png")
  return results


def _num(x) -> float | str:
  x = float(x)
  if np.isnan(x):
    return "nan"
  if np.isinf(x):
    return "inf" if x > 0 else "-inf"
  return x


def _radius_columns(cert: dict, ks, gallery: str) -> dict:
  cols = {"paper": cert["paper_radius"]}
  if gallery == "fixed":
    for j, k in enumerate(ks):
      cols[f"halfspace_top{k}"] = cert["halfspace_radius"][:, j]
    if "halfspace_eb_radius" in cert:
      for j, k in enumerate(ks):
        cols[f"halfspace_eb_top{k}"] = cert["halfspace_eb_radius"][:, j]
  return cols


_LABELS = {"paper": "paper (Thm 3.5), top-1"}


def _label(name: str) -> str:
  if name in _LABELS:
    return _LABELS[name]
  if name.startswith("halfspace_eb_top"):
    k = name.removeprefix("halfspace_eb_top")
    return f"half-space + per-direction bound (ours), top-{k}"
  return f"half-space (ours), top-{name.removeprefix('halfspace_top')}"


def markdown_table(results: dict) -> str:
  m = results["metrics"]
  at = m["certified_recall_at_sigma_multiples"]
  mults = list(at)
  names = list(next(iter(at.values())))
  sig = results["sigma"]
  head = " | ".join(f"r = {float(k) * sig:.3g}" for k in mults)
  lines = [
      f"{results['dataset']} {results['arch']} {results['method']}: sigma = {sig:g}, "
      f"n = {results['num_samples']}, rho = {results['rho']:g}, {results['gallery']} "
      f"gallery, |Q| = {results['num_queries']}, |C| = {results['num_candidates']}, "
      f"t = {results['t_query']:.4f}",
      "",
      f"Recall@1: base f {m['base_recall_at_1']:.3f}, smoothed g_hat "
      f"{m['smoothed_recall_at_1']:.3f}; rejected ratio (paper certificate) "
      f"{m['rejected_ratio']:.3f}",
      "",
      f"| certified Recall@K | {head} | median radius |",
      "|---|" + "|".join(["---"] * (len(mults) + 1)) + "|",
  ]
  for name in names:
    lines.append(f"| {_label(name)} | " + " | ".join(f"{at[k][name]:.3f}" for k in mults)
                 + f" | {m['median_certified_radius'][name]:.3f} |")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  plt = report.plt
  curve = results["curve"]
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, (name, ys) in enumerate((k, v) for k, v in curve.items() if k != "radius"):
    ax.plot(curve["radius"], ys, color=f"C{i}", linestyle="--" if name == "paper" else "-",
            label=_label(name))
  ax.axvline(1.349 * results["sigma"], color="grey", linestyle=":", linewidth=1,
             label="paper ceiling 1.349 sigma")
  ax.set_xlabel("l_2 radius r")
  ax.set_ylabel("certified Recall@K")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{results['dataset']} {results['method']}, sigma={results['sigma']:g}, "
               f"n={results['num_samples']}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(out_dir: str, results: dict, arrays: dict | None = None) -> None:
  """results.json, results.md, certified_recall.png (and ``embeddings.npz``: g_hat of
  the queries and the gallery vectors, so certificates can be recomputed with other
  rho or K without re-sampling) into ``out_dir``, atomically."""
  extra = {"embeddings.npz": lambda p: np.savez(p, **arrays)} if arrays else {}
  report.write_dir_atomic(out_dir, {**extra,
      "results.json": lambda p: report._dump_json(p, results),
      "results.md": lambda p: report._dump_text(p, markdown_table(results) + "\n"),
      "certified_recall.png": lambda p: plot(results, p),
  })
