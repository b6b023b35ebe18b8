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

_TABLE2 = (("er_recall_qa", "ER QA"), ("cr_recall_qa", "CR QA"),
           ("er_recall_ca", "ER CA"), ("cr_recall_ca", "CR CA"))
_STYLE = {"er_recall_qa": ("C0", "--", "ER-Recall@K (QA)"),
          "cr_recall_qa": ("C0", "-", "CR-Recall@K (QA)"),
          "er_recall_ca": ("C1", "--", "ER-Recall@K (CA)"),
          "cr_recall_ca": ("C1", "-", "CR-Recall@K (CA)")}


def _row(values: dict, ks) -> str:
  return " | ".join(f"{values[str(k)]:.2f}" for k in ks)


def markdown_table(results: dict) -> str:
  """Table 1 (Recall@K) and Table 2 (ER-/CR-Recall@K for QA and CA) for one model."""
  ks = results["ks"]
  m = results["metrics"]
  name = f"{results['method']} ({results['arch']})"
  head = " | ".join(str(k) for k in ks)
  sep = "|".join(["---"] * len(ks))
  groups = [(key, label) for key, label in _TABLE2 if key in m]
  cols = " | ".join(f"{label} {k}" for _, label in groups for k in ks)
  lines = [
      f"{results['dataset']}, eps = {results['eps']:.4g}, |Q| = {results['num_queries']}, "
      f"|C| = {results['num_candidates']}, checkpoint step {results['checkpoint_step']}",
      "",
      f"| Recall@K | {head} |",
      f"|---|{sep}|",
      f"| {name} | {_row(m['recall'], ks)} |",
      "",
      f"| K | {cols} |",
      "|---|" + "|".join([sep] * len(groups)) + "|",
      f"| {name} | " + " | ".join(_row(m[key], ks) for key, _ in groups) + " |",
  ]
  one_sided = [f"{key}_one_sided" for key, _ in groups if key.startswith("cr_")]
  lines += ["", "One-sided CR-Recall@K (the same-class image stays in the top K; "
            "the paper's Eq. 25 also bounds its rank from below): "
            + ", ".join(f"{k.split('_')[2].upper()} " + " / ".join(
                f"{m[k][str(kk)]:.2f}" for kk in ks) for k in one_sided)]
  attack = results.get("attack")
  if attack:
    lines += ["", f"ER: PGD, {attack['steps']} steps of {attack['step_size']:.4g}, "
              f"QA one target per query, CA {attack['ca_sources']} sources per query."]
    for kind in ("qa", "ca"):
      audit = attack.get(f"{kind}_audit")
      if audit:
        lines += [f"{kind.upper()} certificate audit: {audit['broken']} of "
                  f"{audit['claims']} certified claims broken by PGD (must be 0)."]
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  ks = results["ks"]
  m = results["metrics"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(ks, [m["recall"][str(k)] for k in ks], "k:o", label="Recall@K (clean)")
  for key, (color, style, label) in _STYLE.items():
    if key in m:
      ax.plot(ks, [m[key][str(k)] for k in ks], marker="o", color=color, linestyle=style,
              label=label)
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
  write_dir_atomic(out_dir, {
      "results.json": lambda p: _dump_json(p, results),
      "results.md": lambda p: _dump_text(p, markdown_table(results) + "\n"),
      "cr_recall.png": lambda p: plot(results, p),
  })


def _dump_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def _dump_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def write_dir_atomic(out_dir: str, writers: dict) -> None:
  """Calls ``writers[name](path)`` for each file inside a temporary sibling directory
  that replaces ``out_dir`` only once every file is written."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    for name, write in writers.items():
      write(os.path.join(tmp, name))
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


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` via a temporary file in the same directory + rename."""
  parent = os.path.dirname(path) or "."
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
