"""DML vs GDML summary of scripts/fmnist_smoothing.sh: one table and one PNG.

  python scripts/smoothing_summary.py [ROOT]      (default runs/smoothing)

Reads ROOT/dml/certify_sigma{S}/results.json and ROOT/gdml_{S}/certify_sigma{S}/results.json
for S in 0.1, 0.25, 0.5 and writes ROOT/summary.md and ROOT/summary.png (one panel per
sigma: certified Recall@1 over the radius, paper certificate dashed, half-space solid,
half-space with per-direction bounds dotted).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxcert import report  # noqa: E402

SIGMAS = ("0.1", "0.25", "0.5")


def main():
  root = sys.argv[1] if len(sys.argv) > 1 else "runs/smoothing"
  runs = {}
  for s in SIGMAS:
    for name, wd in (("DML", "dml"), ("GDML", f"gdml_{s}")):
      path = os.path.join(root, wd, f"certify_sigma{s}", "results.json")
      if os.path.isfile(path):
        with open(path) as f:
          runs[(s, name)] = json.load(f)
  if not runs:
    raise SystemExit(f"error: no results under {root} (run scripts/fmnist_smoothing.sh)")
  any_run = next(iter(runs.values()))
  mults = list(any_run["metrics"]["certified_recall_at_sigma_multiples"])
  lines = [f"n = {any_run['num_samples']}, rho = {any_run['rho']}, {any_run['gallery']} "
           f"gallery, |Q| = {any_run['num_queries']}, |C| = {any_run['num_candidates']}, "
           f"t = {any_run['t_query']:.4f}", "",
           "| sigma | model | Recall@1 f | Recall@1 g_hat | rejected | certificate | "
           + " | ".join(f"r = {m} sigma" for m in mults) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(mults)]
  for (s, name), r in runs.items():
    m = r["metrics"]
    at = m["certified_recall_at_sigma_multiples"]
    for cert in at[mults[0]]:
      k = cert.split("top")[-1]
      label = ("paper" if cert == "paper" else
               f"half-space + per-direction top-{k}" if "_eb_" in cert else
               f"half-space top-{k}")
      lines.append(f"| {s} | {name} | {m['base_recall_at_1']:.3f} | "
                   f"{m['smoothed_recall_at_1']:.3f} | {m['rejected_ratio']:.3f} | {label} | "
                   + " | ".join(f"{at[k][cert]:.3f}" for k in mults) + " |")
  text = "\n".join(lines)
  report.atomic_write_text(os.path.join(root, "summary.md"), text + "\n")

  plt = report.plt
  fig, axes = plt.subplots(1, len(SIGMAS), figsize=(4.2 * len(SIGMAS), 3.5), sharey=True)
  for ax, s in zip(axes, SIGMAS, strict=True):
    for color, name in (("C0", "DML"), ("C3", "GDML")):
      r = runs.get((s, name))
      if r is None:
        continue
      c = r["curve"]
      ax.plot(c["radius"], c["paper"], color=color, linestyle="--", label=f"{name} paper")
      ax.plot(c["radius"], c["halfspace_top1"], color=color, label=f"{name} half-space")
      if "halfspace_eb_top1" in c:
        ax.plot(c["radius"], c["halfspace_eb_top1"], color=color, linestyle=":",
                label=f"{name} half-space + per-direction")
    ax.set_title(f"sigma = {s}", fontsize=9)
    ax.set_xlabel("l_2 radius r")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("certified Recall@1")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(root, "summary.png"), dpi=120)
  plt.close(fig)
  print(text)
  print(f"wrote {root}/summary.md, {root}/summary.png")


if __name__ == "__main__":
  main()
