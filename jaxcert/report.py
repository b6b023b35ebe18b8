"""Results files: JSON, a Markdown table in the paper's layout, and a PNG plot.

``write_report`` is atomic at the directory level: everything is written into a
temporary sibling directory that replaces ``out_dir`` only once all files exist,
so a failed run leaves either the previous results or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_ROWS = (("cr_recall_qa", "CR-Recall@K (QA)"), ("cr_recall_ca", "CR-Recall@K (CA)"))


def _row(values: dict, ks) -> str:
  return " | ".join(f"{values[str(k)]:.2f}" for k in ks)


def markdown_table(results: dict) -> str:
  """Table 1 (Recall@K) and Table 2 (CR-Recall@K for QA and CA) for one model."""
  ks = results["ks"]
  m = results["metrics"]
  name = f"{results['method']} ({results['arch']})"
  head = " | ".join(str(k) for k in ks)
  sep = "|".join(["---"] * len(ks))
  lines = [
      f"{results['dataset']}, eps = {results['eps']:.4g}, |Q| = {results['num_queries']}, "
      f"|C| = {results['num_candidates']}, checkpoint step {results['checkpoint_step']}",
      "",
      f"| Recall@K | {head} |",
      f"|---|{sep}|",
      f"| {name} | {_row(m['recall'], ks)} |",
      "",
      f"| K | {' | '.join(f'QA {k}' for k in ks)} | {' | '.join(f'CA {k}' for k in ks)} |",
      f"|---|{sep}|{sep}|",
      f"| {name} CR-Recall | {_row(m['cr_recall_qa'], ks)} | {_row(m['cr_recall_ca'], ks)} |",
      f"| {name} CR-Recall, one-sided | {_row(m['cr_recall_qa_one_sided'], ks)} | "
      f"{_row(m['cr_recall_ca_one_sided'], ks)} |",
  ]
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  ks = results["ks"]
  m = results["metrics"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(ks, [m["recall"][str(k)] for k in ks], "k--o", label="Recall@K (clean)")
  for key, label in _ROWS:
    ax.plot(ks, [m[key][str(k)] for k in ks], "-o", label=label)
  ax.set_xlabel("K")
  ax.set_ylabel("fraction of queries")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{results['dataset']} {results['arch']} {results['method']}, "
               f"eps={results['eps']:.3g}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(out_dir: str, results: dict) -> None:
  """Writes results.json, results.md and cr_recall.png into ``out_dir`` atomically."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(tmp, "results.md"), "w") as f:
      f.write(markdown_table(results) + "\n")
    plot(results, os.path.join(tmp, "cr_recall.png"))
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
      os.rmdir(old)
      os.replace(out_dir, old)
      os.replace(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
