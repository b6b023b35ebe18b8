"""Time and peak memory of certification as the gallery grows (|C| = 1k, 10k, 100k).

  python bench/gallery_scaling.py [--queries=1000] [--sizes=1000,10000,100000]
      [--dim=128] [--tasks=ibp,dense,smoothing] [--smoothing_queries=1000] [--dense_max=10000]
      [--fp_sound]

Random features of the right shape (d = ``dim``, 10 classes), each (task, |C|) in a
fresh subprocess so that its peak RSS (``ru_maxrss``) is its own:

- ``ibp``: :func:`jaxcert.gallery.certify_gallery` -- clean ranks, QA and CA rank bounds
  (Thm 1, 2) and Recall / CR-Recall@{1,10,20,40} (two- and one-sided) -- on boxes of
  half-width 0.02 around the features (``--fp_sound``: float-sound bounds and eps = 0
  boxes around the clean features, as ``certify.py`` uses them). The compile is timed
  separately (a warm-up on one query chunk).
- ``dense``: the same through the dense [Q, N] path (``certification._certify(...,
  dense=True)``), only up to ``--dense_max`` candidates, for comparison; timed on a
  second run (the first compiles for these shapes; "compile s" is the difference).
- ``smoothing``: :func:`jaxcert.smoothing.certify_smoothed` against a fixed gallery
  (minimum margin, the paper's radius, half-space radii for K = 1, 10) with vectors in
  the unit ball.

Prints one table: seconds of the call, nanoseconds per (query, candidate) pair (flat =
time linear in |Q| |C|), the inputs' own size, the call's working memory (peak RSS
during the call minus RSS before it, the peak reset through /proc/self/clear_refs:
flat = memory independent of |C|), for IBP the scratch memory of the compiled
per-chunk computation (exact, from XLA), and the subprocess's peak RSS (ru_maxrss: imports,
compilation, data generation and the call). IBP inputs are float32 device arrays, as
a JAX pipeline holds features; host (numpy) inputs would add one float32 copy.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KS = (1, 10, 20, 40)
MB = 2 ** 20


def _rss_mb() -> float:
  """Peak RSS of this process so far (ru_maxrss), MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def _vm(key: str) -> float:
  """VmRSS (now) or VmHWM (peak since the last reset) of this process, MB."""
  with open("/proc/self/status") as f:
    line = next(x for x in f if x.startswith(key + ":"))
  return int(line.split()[1]) / 1024


def _reset_peak() -> None:
  """Restarts VmHWM at the current RSS (Linux >= 4.0), so the next peak is the call's."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _measure(fn) -> tuple[float, float, object]:
  """(seconds, peak RSS during fn minus RSS before it in MB, fn's result)."""
  _reset_peak()
  before = _vm("VmRSS")
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, _vm("VmHWM") - before, out


def _worker(task: str, q: int, n: int, d: int, fp_sound: bool) -> dict:
  import jax
  import numpy as np

  from jaxcert import certification, gallery, smoothing
  from jaxcert.interval import Interval

  jax.block_until_ready(jax.numpy.zeros(1) + 1)   # start the runtime
  rng = np.random.default_rng(0)
  ql, cl = rng.integers(0, 10, q), rng.integers(0, 10, n)
  if task == "smoothing":
    def ball(k):
      v = rng.standard_normal((k, d))
      v *= (rng.uniform(0.5, 1.0, k) / np.linalg.norm(v, axis=1))[:, None]
      return v
    z, gal = ball(q), ball(n)
    inputs = z.nbytes + gal.nbytes
    seconds, work, cert = _measure(lambda: smoothing.certify_smoothed(
        z, ql, gal, cl, sigma=0.5, norm_bound=1.0, t_query=0.01, ks=(1, 10)))
    summary = {"halfspace_k1": float(np.mean(cert["halfspace_radius"][:, 0] > 0))}
    return {"seconds": seconds, "compile": 0.0, "work_mb": work, "peak_mb": _rss_mb(),
            "inputs_mb": inputs / MB, "xla_mb": None, "summary": summary}

  # features and boxes as a JAX pipeline holds them: float32 device arrays
  put = lambda x: jax.block_until_ready(jax.numpy.asarray(x))
  qf = put(rng.standard_normal((q, d), dtype=np.float32))
  cf = put(rng.standard_normal((n, d), dtype=np.float32))
  w = np.float32(0.02)
  args = [qf, Interval(put(qf - w), put(qf + w)), ql, cf, Interval(put(cf - w), put(cf + w)),
          cl]
  clean = None
  if fp_sound:   # eps = 0 boxes around the clean features, one ulp wide
    ulp = lambda x: Interval(put(jax.numpy.nextafter(x, -np.inf)),
                             put(jax.numpy.nextafter(x, np.inf)))
    clean = (ulp(qf), ulp(cf))
  inputs = sum(x.nbytes for x in jax.tree.leaves((args, clean)))
  kw = dict(fp_sound=fp_sound, clean_boxes=clean)
  if task == "dense":   # run twice: the first compiles (for these very shapes)
    t0 = time.perf_counter()
    certification._certify(*args, KS, dense=True, **kw)
    first = time.perf_counter() - t0
    seconds, work, out = _measure(lambda: certification._certify(*args, KS, dense=True, **kw))
    res = out[0]
    compile_s = max(first - seconds, 0.0)
  else:
    t0 = time.perf_counter()   # warm-up: one query chunk compiles the same function
    head = lambda a: jax.tree.map(lambda x: x[:gallery.QUERY_CHUNK], a)
    gallery.certify_gallery(*head(args[:3]), *args[3:], KS, fp_sound=fp_sound,
                            clean_boxes=None if clean is None else (head(clean[0]), clean[1]))
    compile_s = time.perf_counter() - t0
    seconds, work, out = _measure(lambda: gallery.certify_gallery(*args, KS, **kw))
    res = out.metrics()
    xla = _xla_temp_mb(gallery, q, n, d, fp_sound)
  summary = {"cr_qa_40": res["cr_recall_qa"][40], "cr_ca_40": res["cr_recall_ca"][40]}
  return {"seconds": seconds, "compile": compile_s, "work_mb": work, "peak_mb": _rss_mb(),
          "inputs_mb": inputs / MB, "xla_mb": xla if task == "ibp" else None,
          "summary": summary}


def _xla_temp_mb(gallery, q: int, n: int, d: int, fp_sound: bool) -> float:
  """Scratch memory XLA allocates for one query chunk's computation (exact, from the
  compiled executable; the candidates are arguments, not scratch)."""
  import jax
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jax.numpy.float32)
  qc = min(gallery.QUERY_CHUNK, q)
  lowered = gallery._query_chunk.lower(
      (f32(qc, d),) * 5, jax.ShapeDtypeStruct((qc,), jax.numpy.int32), (f32(n, d),) * 5,
      jax.ShapeDtypeStruct((n,), jax.numpy.int32), jax.ShapeDtypeStruct((5,), bool),
      n=n, nc=min(gallery.CAND_CHUNK, n), ks=KS, fp_sound=fp_sound, clean_boxes=fp_sound)
  return lowered.compile().memory_analysis().temp_size_in_bytes / MB


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--smoothing_queries", type=int, default=None, help="default: --queries")
  p.add_argument("--sizes", default="1000,10000,100000")
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--tasks", default="ibp,dense,smoothing", help="of ibp, dense, smoothing")
  p.add_argument("--dense_max", type=int, default=10_000,
                 help="largest |C| for the dense comparison (with --tasks=...,dense)")
  p.add_argument("--fp_sound", action="store_true")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    q = args.queries
    print(json.dumps(_worker(args.worker, q, args.n, args.dim, args.fp_sound)))
    return

  import jax
  print(f"devices: {jax.devices()}  jax {jax.__version__}  cpus: {os.cpu_count()}")
  sizes = [int(s) for s in args.sizes.split(",")]
  tasks = args.tasks.split(",")
  bad = set(tasks) - {"ibp", "dense", "smoothing"}
  if bad:
    raise SystemExit(f"--tasks: unknown {sorted(bad)}; allowed: ibp, dense, smoothing")
  rows = []
  t_all = time.perf_counter()
  for task in tasks:
    q = (args.smoothing_queries or args.queries) if task == "smoothing" else args.queries
    for n in sizes:
      if task == "dense" and n > args.dense_max:
        continue
      cmd = [sys.executable, os.path.abspath(__file__), f"--worker={task}", f"--n={n}",
             f"--queries={q}", f"--dim={args.dim}"] + (["--fp_sound"] if args.fp_sound else [])
      out = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if out.returncode:
        raise SystemExit(f"{task} |C|={n} failed:\n{out.stderr[-3000:]}")
      r = json.loads(out.stdout.strip().splitlines()[-1])
      r.update(task=task, q=q, n=n)
      rows.append(r)
      _print_row(r, header=len(rows) == 1)
  print(f"total {time.perf_counter() - t_all:.0f}s")
  for task in tasks:
    mine = [r for r in rows if r["task"] == task]
    if len(mine) >= 2:
      a, b = mine[0], mine[-1]
      print(f"{task}: |C| x{b['n'] / a['n']:.0f} -> time x{b['seconds'] / a['seconds']:.1f}, "
            f"call working memory {a['work_mb']:.0f} -> {b['work_mb']:.0f} MB")


def _print_row(r: dict, header: bool) -> None:
  if header:
    print("| task | Q | C | seconds | compile s | ns / (Q C) | inputs MB | call working MB "
          "| XLA scratch MB | process peak RSS MB | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
  check = ", ".join(f"{k} {v:.3f}" for k, v in r["summary"].items())
  xla = "" if r["xla_mb"] is None else f"{r['xla_mb']:.1f}"
  print(f"| {r['task']} | {r['q']:,} | {r['n']:,} | {r['seconds']:.1f} | {r['compile']:.1f} "
        f"| {r['seconds'] / (r['q'] * r['n']) * 1e9:.0f} | {r['inputs_mb']:.0f} "
        f"| {r['work_mb']:.0f} | {xla} | {r['peak_mb']:.0f} | {check} |", flush=True)


if __name__ == "__main__":
  main()
