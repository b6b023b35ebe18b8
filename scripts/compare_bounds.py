"""IBP vs CROWN-IBP vs CROWN on one trained model, side by side in one run.

  python scripts/compare_bounds.py --config=cbir:fashion_mnist,small,tbt,0.2,cpu \
      --workdir=runs/cbir_cpu/fashion_mnist_small_tbt_cpu [--methods=ibp,crown_ibp,crown] \
      [--fp_sound=false,true] [--output_dir=DIR] [--audit] [--config.data.num_queries=500 ...]

For each bound method (and each ``--fp_sound`` setting: rows ``METHOD`` and
``METHOD+fp``, the float-sound boxes and distance bounds of ``certify.fp_sound``), on
the same checkpoint and the same Q / C draw: mean feature-box width (and its ratio to
IBP's), CR-Recall@K for query and candidate attacks (paper's two-sided and one-sided),
and the seconds per image of the boxes. ``--audit`` also
attacks every certified QA and CA claim of every method (jaxcert.attacks.audit_qa /
audit_ca) and records how many were broken (must be 0). Writes compare_bounds.json,
compare_bounds.md and compare_bounds.png atomically to ``--output_dir`` (default
``<workdir>/compare_bounds_eps<eps>``).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxcert import attacks, certification, report, validate  # noqa: E402
from jaxcert import configs as configs_lib  # noqa: E402
from jaxcert.linear_bounds import METHODS  # noqa: E402
from jaxcert.models import embed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config FILE[:ARG]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory with the checkpoint",
                               required=True)
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"subset of {METHODS}")
_OUT = flags.DEFINE_string("output_dir", None, "where the comparison goes")
_AUDIT = flags.DEFINE_bool("audit", False, "attack every certified claim of every method")
_FP = flags.DEFINE_list("fp_sound", ["false"], "float-sound bounds: false, true or both")


def compare(config, workdir: str, methods, *, audit: bool = False, fp_sound=(False,),
            log=print) -> dict:
  """The comparison as a results dict (see the module docstring)."""
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"--methods: {m!r} is not one of {METHODS}")
  fp_sound = tuple(fp_sound)
  if not fp_sound or any(not isinstance(f, bool) for f in fp_sound):
    raise ValueError(f"--fp_sound must be a non-empty list of booleans, got {fp_sound!r}")
  c = config.certify
  eps = validate.check_eps(c.eps, "config.certify.eps")
  ks = validate.check_ks(tuple(c.ks), config.data.num_candidates, "config.certify.ks")
  apply, params, step, (_, qx, ql), (_, cx, cl) = certification.load_model_and_split(
      config, workdir)
  qf = embed(apply, params, qx, batch_size=c.batch_size)
  cf = embed(apply, params, cx, batch_size=c.batch_size)
  rows = {}
  clean = None
  if True in fp_sound:   # clean features as eps = 0 float-sound boxes, as certify() does
    clean = tuple(certification.feature_boxes(apply, params, x, 0.0, fp_sound=True,
                                              batch_size=c.batch_size) for x in (qx, cx))
  for m, fp in ((m, fp) for m in methods for fp in fp_sound):
    name = f"{m}+fp" if fp else m
    t0 = time.perf_counter()
    qb = certification.feature_boxes(apply, params, qx, eps, batch_size=c.batch_size,
                                     method=m, fp_sound=fp)
    cb = certification.feature_boxes(apply, params, cx, eps, batch_size=c.batch_size,
                                     method=m, fp_sound=fp)
    sec = time.perf_counter() - t0
    res, qa, ca, clean_rank = certification._certify(  # noqa: SLF001
        qf, qb, ql, cf, cb, cl, ks, fp_sound=fp, clean_boxes=clean if fp else None,
        dense=True if audit else None)   # audits read dense bounds
    row = {
        "fp_sound": fp,
        "mean_box_width": float((np.mean(qb.width) + np.mean(cb.width)) / 2),
        "seconds_boxes": sec,
        "ms_per_image": 1000 * sec / (len(qx) + len(cx)),
        "metrics": {k: {str(kk): v for kk, v in d.items()} for k, d in res.items()},
    }
    if audit:
      kw = dict(steps=c.attack_steps, step_size=c.attack_step_size,
                restarts=c.attack_restarts, seed=c.attack_seed)
      row["qa_audit"] = attacks.audit_qa(apply, params, qx, cf, qa, clean_rank, ql, cl, ks,
                                         eps, **kw)
      row["ca_audit"] = attacks.audit_ca(apply, params, qf, cx, cf, ca, clean_rank, ql, cl,
                                         ks, eps, pool=c.audit_pool, **kw)
    rows[name] = row
    qa_s = " ".join(f"{row['metrics']['cr_recall_qa'][str(k)]:.3f}" for k in ks)
    ca_s = " ".join(f"{row['metrics']['cr_recall_ca'][str(k)]:.3f}" for k in ks)
    log(f"{name:>12}: width {row['mean_box_width']:.4g}, {row['ms_per_image']:.2f} ms/image, "
        f"CR QA {qa_s}, CR CA {ca_s}"
        + (f", audits broken {row['qa_audit']['broken']}/{row['qa_audit']['claims']} QA "
           f"{row['ca_audit']['broken']}/{row['ca_audit']['claims']} CA" if audit else ""))
  for row in rows.values():   # against IBP with the same fp_sound setting
    base = rows.get("ibp+fp" if row["fp_sound"] else "ibp")
    if base is not None:
      row["width_vs_ibp"] = row["mean_box_width"] / base["mean_box_width"]
  return {
      "workdir": workdir, "checkpoint_step": step, "eps": eps, "ks": list(ks),
      "method": config.train.method, "arch": config.model.arch,
      "dataset": config.data.name, "num_queries": len(qx), "num_candidates": len(cx),
      "bounds": rows, **report.results_metadata(config),
  }


def markdown(res: dict) -> str:
  ks = res["ks"]
  head = (f"{res['dataset']} {res['arch']} {res['method']}, eps {res['eps']:g}, "
          f"|Q| {res['num_queries']}, |C| {res['num_candidates']}, checkpoint "
          f"{res['checkpoint_step']}\n\n")
  cols = " | ".join(f"CR QA@{k}" for k in ks) + " | " + " | ".join(f"CR CA@{k}" for k in ks)
  lines = [f"| bounds | box width | vs IBP | ms/image | {cols} |",
           "|---" * (4 + 2 * len(ks)) + "|"]
  for m, r in res["bounds"].items():
    qa = " | ".join(f"{r['metrics']['cr_recall_qa'][str(k)]:.3f}" for k in ks)
    ca = " | ".join(f"{r['metrics']['cr_recall_ca'][str(k)]:.3f}" for k in ks)
    ratio = f"{r['width_vs_ibp']:.3f}" if "width_vs_ibp" in r else "-"
    lines.append(f"| {m} | {r['mean_box_width']:.4g} | {ratio} | {r['ms_per_image']:.2f} "
                 f"| {qa} | {ca} |")
  return head + "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  ks = res["ks"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
  for ax, kind in zip(axes, ("qa", "ca"), strict=True):
    for m, r in res["bounds"].items():
      ax.plot(ks, [r["metrics"][f"cr_recall_{kind}"][str(k)] for k in ks], "o-", label=m)
    ax.set_title(f"CR-Recall@K, {kind.upper()}, eps {res['eps']:g}")
    ax.set_xlabel("K")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  config = _CONFIG.value
  fp = [{"true": True, "false": False}.get(v.lower()) for v in _FP.value]
  if None in fp:
    raise app.UsageError(f"--fp_sound: each value must be true or false, got {_FP.value}")
  res = compare(config, _WORKDIR.value, _METHODS.value, audit=_AUDIT.value, fp_sound=fp)
  out = _OUT.value or os.path.join(_WORKDIR.value, f"compare_bounds_eps{res['eps']:g}")
  report.write_dir_atomic(out, {
      "compare_bounds.json": lambda p: report._dump_json(p, res),  # noqa: SLF001
      "compare_bounds.md": lambda p: report._dump_text(p, markdown(res)),  # noqa: SLF001
      "compare_bounds.png": lambda p: plot(res, p),
  })
  print(markdown(res))
  print(f"wrote {out}/compare_bounds.json, .md, .png")


if __name__ == "__main__":
  # --config=NAME[:ARG] names a bundled config, like the entry points.
  sys.argv = [f"--config={configs_lib.resolve(a.split('=', 1)[1])}"
              if a.startswith("--config=") else a for a in sys.argv]
  app.run(main)
