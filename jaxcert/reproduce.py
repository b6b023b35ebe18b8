"""Reproducing the CBIR paper's Tables 1 and 2 over any part of its grid.

``run(...)`` (what ``reproduce.py`` calls) trains every requested
(dataset, arch, method) cell with ``grid.cbir_config`` -- resuming from the
latest checkpoint, so an interrupted grid continues where it stopped -- then
certifies each trained model at each eps (skipped when a ``results.json`` for
the same config exists) and writes, under ``root``:

- ``tables.md``: Table 1 (Recall@K) and Table 2 (ER/CR-Recall@K, QA and CA) in the
  paper's layout, each cell ``ours (paper)`` where the paper has the number,
  plus the certificate audit counts;
- ``tables.json``: the same numbers, machine-readable;
- ``cbir_<dataset>_<arch>_eps<eps>.png``: Recall / ER / CR curves over K per method.

TBT+FCTB (``fctb``) fine-tunes the TBT model of the same cell, which is trained
first when it is not in the request.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable, Sequence

from jaxcert import certification, grid, paper, report, training

ORDER = ("triplet", "act", "cibp", "tbt", "fctb")
ER_CR = ("er_recall_qa", "cr_recall_qa", "er_recall_ca", "cr_recall_ca")
ER_CR_NAMES = ("ER QA", "CR QA", "ER CA", "CR CA")


def eps_tag(eps: float) -> str:
  """0.2 -> "0.2"; the CIFAR-10 radii n/255 -> "n_255" (for file names)."""
  num = eps * 255
  if eps < 0.1 and abs(num - round(num)) < 1e-9:
    return f"{int(round(num))}_255"
  return f"{eps:g}"


def eps_text(eps: float) -> str:
  return eps_tag(eps).replace("_", "/")


def cell_dir(root: str, dataset: str, arch: str, method: str, budget: str) -> str:
  return os.path.join(root, f"{dataset}_{arch}_{method}_{budget}")


def cell_config(dataset: str, arch: str, method: str, eps: float | None, budget: str,
                root: str, overrides: dict | None = None):
  """The grid config of one cell, with ``overrides`` ({"train.num_steps": 10, ...})."""
  spec = f"{dataset},{arch},{method}" + (f",{eps!r}" if eps is not None else "")
  config = grid.cbir_config(f"{spec},{budget}")
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"unknown config key {key!r} in overrides")
    node[leaf] = value
  if method == "fctb":
    config.train.init_from = cell_dir(root, dataset, arch, "tbt", budget)
  return config


def _check(name: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
  values = list(values)
  bad = [v for v in values if v not in allowed]
  if bad or not values:
    raise ValueError(f"{name} must be a non-empty subset of {tuple(allowed)}, got {values!r}")
  return values


def _same_config(path: str, config) -> bool:
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return False
  return json.dumps(old.get("config"), sort_keys=True) == json.dumps(
      json.loads(config.to_json()), sort_keys=True)


def run(*, datasets: Sequence[str], archs: Sequence[str], methods: Sequence[str],
        eps_values: Iterable[float] | None = None, budget: str = "paper",
        root: str = "runs/cbir", stages: Sequence[str] = ("train", "certify", "tables"),
        overrides: dict | None = None, log: Callable[[str], None] = print) -> dict:
  """Trains, certifies and tabulates the requested part of the grid. Returns the tables."""
  datasets = _check("datasets", datasets, grid.DATASETS)
  archs = _check("archs", archs, grid.ARCHS)
  methods = sorted(_check("methods", methods, grid.METHODS), key=ORDER.index)
  _check("budget", [budget], grid.BUDGETS)
  stages = _check("stages", stages, ("train", "certify", "tables"))
  eps_values = None if eps_values is None else [float(e) for e in eps_values]
  to_train = list(methods)
  if "fctb" in methods and "tbt" not in methods:
    to_train.insert(to_train.index("fctb"), "tbt")

  def eps_for(dataset):
    return eps_values if eps_values is not None else list(grid.EPS[dataset])

  cells = [(d, a, m) for d in datasets for a in archs for m in to_train]
  if "train" in stages:
    for i, (d, a, m) in enumerate(cells):
      config = cell_config(d, a, m, None, budget, root, overrides)
      workdir = cell_dir(root, d, a, m, budget)
      log(f"[train {i + 1}/{len(cells)}] {d} {a} {m} ({budget}) -> {workdir}")
      t0 = time.perf_counter()
      training.train(config, workdir, log=log)
      log(f"[train {i + 1}/{len(cells)}] done in {time.perf_counter() - t0:.0f}s")

  jobs = [(d, a, m, e) for d in datasets for a in archs for m in methods for e in eps_for(d)]
  if "certify" in stages:
    for i, (d, a, m, e) in enumerate(jobs):
      config = cell_config(d, a, m, e, budget, root, overrides)
      workdir = cell_dir(root, d, a, m, budget)
      out = os.path.join(workdir, f"certify_eps{eps_tag(e)}")
      if _same_config(os.path.join(out, "results.json"), config):
        log(f"[certify {i + 1}/{len(jobs)}] {d} {a} {m} eps {eps_text(e)}: up to date")
        continue
      log(f"[certify {i + 1}/{len(jobs)}] {d} {a} {m} eps {eps_text(e)} -> {out}")
      certification.certify(config, workdir, output_dir=out, log=log)

  tables = {}
  if "tables" in stages:
    tables = write_tables(root, datasets, archs, methods, budget, eps_for, log=log)
  return tables


def _load_results(root, d, a, m, e, budget):
  path = os.path.join(cell_dir(root, d, a, m, budget), f"certify_eps{eps_tag(e)}",
                      "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _cell(ours, theirs) -> str:
  if ours is None:
    return "-" if theirs is None else f"- ({theirs:.2f})"
  return f"{ours:.2f}" if theirs is None else f"{ours:.2f} ({theirs:.2f})"


def _values(results, metric, ks):
  if results is None or metric not in results["metrics"]:
    return [None] * len(ks)
  return [results["metrics"][metric].get(str(k)) for k in ks]


def write_tables(root: str, datasets, archs, methods, budget, eps_for, *,
                 log: Callable[[str], None] = print) -> dict:
  """Writes tables.md, tables.json and the plots from the results under ``root``."""
  ks = paper.KS
  cache: dict = {}

  def load(d, a, m, e):
    if (d, a, m, e) not in cache:
      cache[d, a, m, e] = _load_results(root, d, a, m, e, budget)
    return cache[d, a, m, e]

  lines = [f"# CBIR grid ({budget} budget)", "",
           "Each cell: ours (paper). The paper's numbers are its Tables 1-2 (Large model, "
           "eps 0.2 / 2/255); '-' where a run is missing or the paper has no number.", ""]
  data: dict = {"budget": budget, "ks": list(ks), "cells": []}
  for a in archs:
    # Table 1: clean Recall@K, at the paper's eps (recall does not depend on eps).
    lines += [f"## Table 1: Recall@K ({a})", ""]
    head = "| method | " + " | ".join(f"{d} @{k}" for d in datasets for k in ks) + " |"
    lines += [head, "|" + "---|" * (1 + len(datasets) * len(ks))]
    for m in methods:
      row = []
      for d in datasets:
        res = next((r for r in (load(d, a, m, e) for e in eps_for(d)) if r is not None),
                   None)
        theirs = paper.lookup(d, a, m, paper.PAPER_EPS[d], "recall")
        row += [_cell(o, None if theirs is None else theirs[i])
                for i, o in enumerate(_values(res, "recall", ks))]
      lines.append(f"| {paper.METHOD_NAMES[m]} | " + " | ".join(row) + " |")
    lines.append("")
    for d in datasets:
      for e in eps_for(d):
        lines += [f"## Table 2: ER / CR-Recall@K, {d}, {a}, eps = {eps_text(e)}", ""]
        cols = [f"{n} @{k}" for n in ER_CR_NAMES for k in ks]
        lines += ["| method | " + " | ".join(cols) + " | audit QA | audit CA |",
                  "|" + "---|" * (3 + len(cols))]
        curves = {}
        for m in methods:
          res = load(d, a, m, e)
          row = []
          cell = {"dataset": d, "arch": a, "method": m, "eps": e,
                  "ours": None if res is None else res["metrics"], "paper": {}}
          for metric in ER_CR:
            theirs = paper.lookup(d, a, m, e, metric)
            cell["paper"][metric] = theirs
            row += [_cell(o, None if theirs is None else theirs[i])
                    for i, o in enumerate(_values(res, metric, ks))]
          cell["paper"]["recall"] = paper.lookup(d, a, m, e, "recall")
          audits = []
          for kind in ("qa_audit", "ca_audit"):
            au = ((res or {}).get("attack") or {}).get(kind)
            audits.append("-" if not au else f"{au['broken']}/{au['claims']}")
          cell["audit"] = audits
          data["cells"].append(cell)
          lines.append(f"| {paper.METHOD_NAMES[m]} | " + " | ".join(row) + " | "
                       + " | ".join(audits) + " |")
          if res is not None:
            curves[m] = res
        lines.append("")
        if curves:
          png = os.path.join(root, f"cbir_{d}_{a}_eps{eps_tag(e)}.png")
          _plot(png, curves, ks, f"{d}, {a}, eps = {eps_text(e)} ({budget} budget)",
                {m: {metric: paper.lookup(d, a, m, e, metric) for metric in
                     ("recall",) + ER_CR} for m in curves})
          lines += [f"![{d} {a} eps {eps_text(e)}]({os.path.basename(png)})", ""]
  lines += ["audit: certified claims broken by PGD / claims attacked (must be 0 / n).", ""]
  report.atomic_write_text(os.path.join(root, "tables.md"), "\n".join(lines))
  report.atomic_write_text(os.path.join(root, "tables.json"), json.dumps(data, indent=1))
  log("\n".join(lines))
  log(f"wrote {root}/tables.md, tables.json")
  return data


def _plot(path, curves: dict, ks, title: str, theirs: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = ("recall",) + ER_CR
  names = ("Recall",) + ER_CR_NAMES
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), sharey=True)
  for ax, metric, name in zip(axes, metrics, names, strict=True):
    for m, res in curves.items():
      color = f"C{ORDER.index(m)}"
      own_ks = res["ks"]
      ours = _values(res, metric, own_ks)
      if all(v is not None for v in ours):
        ax.plot(own_ks, ours, "o-", color=color, label=paper.METHOD_NAMES[m])
      ref = theirs[m].get(metric)
      if ref is not None:
        ax.plot(ks, ref, "x--", color=color, alpha=0.6)
    ax.set_title(name)
    ax.set_xlabel("K")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("recall (solid: ours, dashed: paper)")
  axes[0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


if __name__ == "__main__":   # python -m jaxcert.reproduce: the jaxcert-reproduce program
  from jaxcert import cli
  cli.reproduce_main()
