"""Results files: JSON, a Markdown table in the paper's layout, and a PNG plot.

``write_report`` is atomic at the directory level: everything is written into a
temporary sibling directory that replaces ``out_dir`` only once all files exist,
so a failed run leaves either the previous results or nothing.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

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
  if results.get("fp_sound_cost"):
    lines += ["", fp_sound_line(results["fp_sound_cost"], ks)]
  return "\n".join(lines)


def fp_sound_line(cost: dict, ks) -> str:
  """One line: queries certified (Eq. 25) with unwidened boxes that the fp-sound
  bounds do not certify, per K, for QA and CA (``certification.fp_sound_cost``)."""
  parts = [f"{kind.upper()} " + "/".join(str(cost[kind][str(k)]["lost"]) for k in ks)
           + " (of " + "/".join(str(cost[kind][str(k)]["plain"]) for k in ks) + ")"
           for kind in ("qa", "ca")]
  return (f"Float-sound bounds: certified queries lost to the rounding widening at K = "
          f"{'/'.join(str(k) for k in ks)}: " + ", ".join(parts) + ".")


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


_UMASK = os.umask(0o022)   # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` via a temporary file in the same directory + rename.

  The file gets the permissions an ``open(path, "w")`` would give it (mkstemp's
  are 0600).
  """
  parent = os.path.dirname(path) or "."
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---------------------------------------------------------------- run metadata

# distribution name -> module whose __version__ is read first
_PACKAGES = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
             "orbax-checkpoint": "orbax.checkpoint", "numpy": "numpy"}


def _version(package: str) -> str | None:
  try:
    version = getattr(importlib.import_module(_PACKAGES[package]), "__version__", None)
  except ImportError:
    version = None
  if version is None:
    try:
      version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return None if version is None else str(version)


def git_commit(path: str | None = None) -> dict | None:
  """``{"commit", "dirty"}`` of the git checkout whose top level is ``path`` (default:
  the directory holding the ``jaxcert`` package), or None when git is missing, times
  out, or ``path`` is not the top of a checkout (e.g. jaxcert installed elsewhere)."""
  root = os.path.abspath(path or os.path.dirname(os.path.dirname(__file__)))

  def git(*args: str) -> str:
    return subprocess.run(("git", "-C", root) + args, capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()

  try:
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
      return None
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": dirty}


def run_info(config: Any = None) -> dict:
  """What a result needs to be reproduced: the resolved config, seed, library
  versions, devices, processes, git commit, host and UTC time (JSON-serialisable).

  ``config`` is an ``ml_collections.ConfigDict`` (or a plain dict, or None).
  ``versions`` holds jax, jaxlib, flax, optax, orbax-checkpoint, numpy (installed
  distribution versions; None when one is missing) and python.
  """
  import jax  # noqa: PLC0415  (report stays importable without initialising jax)

  if config is None:
    cfg = None
  elif hasattr(config, "to_json"):
    cfg = json.loads(config.to_json())
  elif isinstance(config, dict):
    cfg = json.loads(json.dumps(config))
  else:
    raise TypeError(f"config must be an ml_collections.ConfigDict, a dict or None, got "
                    f"{type(config).__name__}")
  devices = jax.devices()
  versions = {p: _version(p) for p in _PACKAGES}
  versions["python"] = platform.python_version()
  return {
      "config": cfg,
      "seed": None if cfg is None else cfg.get("seed"),
      "versions": versions,
      "platform": platform.platform(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in devices],
      "device_kinds": sorted({d.device_kind for d in devices}),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "process_count": jax.process_count(),
      "process_index": jax.process_index(),
      "git": git_commit(),
      "hostname": socket.gethostname(),
      "argv": list(sys.argv),
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }


def results_metadata(config: Any = None) -> dict:
  """``{"run_info": run_info(config), "versions": ...}`` for a results dict.

  ``versions`` keeps the keys results files always had (``jax``, ``devices``) and
  adds the other library versions.
  """
  info = run_info(config)
  return {"run_info": info,
          "versions": {**info["versions"], "devices": info["devices"]}}


RUN_INFO_NAME = "run_info.json"


def append_run_info(workdir: str, config: Any = None, **extra) -> dict:
  """Appends ``run_info(config)`` plus ``extra`` to the JSON list in
  ``workdir/run_info.json`` (one entry per launch of a run: the first describes the
  fresh start, later ones each resume) and rewrites the file atomically.

  Raises ValueError naming the file if it exists but is not such a list.
  """
  path = os.path.join(workdir, RUN_INFO_NAME)
  entries: Any = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        entries = json.load(f)
    except ValueError:
      entries = None
    if not isinstance(entries, list):
      raise ValueError(f"{path} must hold a JSON list of run records (one per launch), "
                       "it does not; move it away to start a new one")
  entry = {**run_info(config), **extra}
  atomic_write_text(path, json.dumps(entries + [entry], indent=2) + "\n")
  return entry
