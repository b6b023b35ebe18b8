"""RetrievalGuard's ablations (its Figures 2-4) for a smoothing config.

  # Fig. 3 left/middle: rejected ratio and certified Recall@1 vs the number of samples n
  python scripts/smoothing_ablation.py --config=configs/smoothing.py:gdml,0.25 \
      --workdir=runs/smoothing/gdml_0.25 --param=n --values=1000,3000,10000
  # Fig. 3 right: confidence rho (certificates recomputed from the saved g_hat, no resampling)
  python scripts/smoothing_ablation.py ... --param=rho --values=0.1,0.01,0.001,0.0001
  # Fig. 4: embedding dimension d (trains one model per d under --root)
  python scripts/smoothing_ablation.py --config=configs/smoothing.py:gdml,0.25 \
      --root=runs/ablation_d --param=d --values=32,64,128
  # Fig. 2: sigma is scripts/fmnist_smoothing.sh (DML vs GDML at each sigma)

Any --config.x=y override is passed on (e.g. --config.data.num_queries=100). Writes
<root>/ablation_<param>.json and .png (certified Recall@1 curves, paper and
half-space certificates; for n also the rejected ratio).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxcert import config as config_lib  # noqa: E402
from jaxcert import report, smoothed_certify, smoothing, training  # noqa: E402

PARAMS = ("n", "rho", "d")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/smoothing.py", "Smoothing config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained model (n, rho).")
_ROOT = flags.DEFINE_string("root", None, "Output root (default: --workdir).")
_PARAM = flags.DEFINE_enum("param", "n", PARAMS, "What to vary.")
_VALUES = flags.DEFINE_list("values", None, "Values of --param.", required=True)


def run(config, param: str, values, workdir: str | None, root: str, log=print) -> dict:
  """Certifies ``config`` for each value of ``param``; returns {value: summary}."""
  if param not in PARAMS:
    raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
  if param != "d" and not workdir:
    raise ValueError(f"--param={param} needs --workdir (the trained model)")
  out: dict = {}
  if param == "rho":   # one sampling run, certificates recomputed at each rho
    base_dir = os.path.join(root, "rho_base")
    base = smoothed_certify.certify(config.copy_and_resolve_references(), workdir,
                                    output_dir=base_dir, log=log)
    for v in values:
      res = smoothed_certify.recertify(base_dir, rho=float(v),
                                       output_dir=os.path.join(root, f"rho{v}"), log=log)
      out[str(v)] = _summary_of(res, base["curve"]["radius"])
    return out
  for v in values:
    c = config.copy_and_resolve_references()
    c.unlock()
    if param == "n":
      c.smoothing.num_samples = int(v)
      wd = workdir
    else:
      c.model.embed_dim = int(v)
      wd = os.path.join(root, f"d{int(v)}")
      training.train(c, wd, log=log)
    res = smoothed_certify.certify(c, wd, output_dir=os.path.join(root, f"{param}{v}"),
                                   log=log)
    out[str(v)] = _summary_of(res, res["curve"]["radius"])
  return out


def _summary_of(res: dict, grid) -> dict:
  """t, rejected ratio and the top-1 paper / half-space curves of a certify result."""
  pq = res["per_query"]
  grid = np.asarray(grid)
  paper = np.array([r["paper_radius"] for r in pq], float)
  halfspace = np.array([float(r["halfspace_radius"]["1"]) for r in pq])
  return {
      "t": float(res["t_query"]),
      "rejected_ratio": res["metrics"]["rejected_ratio"],
      "radius": grid.tolist(),
      "paper": smoothing.certified_recall_curve(paper, grid).tolist(),
      "halfspace": smoothing.certified_recall_curve(halfspace, grid).tolist(),
  }


def plot(summary: dict, param: str, path: str) -> None:
  plt = report.plt
  panels = 2 if param == "n" else 1
  fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6))
  axes = np.atleast_1d(axes)
  for i, (v, s) in enumerate(summary.items()):
    axes[0].plot(s["radius"], s["paper"], color=f"C{i}", linestyle="--")
    axes[0].plot(s["radius"], s["halfspace"], color=f"C{i}", label=f"{param} = {v}")
  axes[0].set_xlabel("l_2 radius r")
  axes[0].set_ylabel("certified Recall@1 (dashed: paper, solid: half-space)")
  axes[0].grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if param == "n":
    vals = list(summary)
    axes[1].plot([float(v) for v in vals], [summary[v]["rejected_ratio"] for v in vals], "o-")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("n (Monte-Carlo samples)")
    axes[1].set_ylabel("rejected ratio")
    axes[1].grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  root = _ROOT.value or _WORKDIR.value
  if not root:
    raise SystemExit("error: give --root (or --workdir)")
  summary = run(_CONFIG.value, _PARAM.value, _VALUES.value, _WORKDIR.value, root)
  base = os.path.join(root, f"ablation_{_PARAM.value}")
  report.atomic_write_text(base + ".json", json.dumps(summary, indent=1))
  plot(summary, _PARAM.value, base + ".png")
  for v, s in summary.items():
    print(f"{_PARAM.value} = {v}: t {s['t']:.4f}, rejected {s['rejected_ratio']:.3f}, "
          f"certified Recall@1 at r=0: paper {s['paper'][0]:.3f}, "
          f"half-space {s['halfspace'][0]:.3f}")
  print(f"wrote {base}.json, {base}.png")


if __name__ == "__main__":
  config_lib.exit_on_unknown_keys(sys.argv)
  app.run(main)
