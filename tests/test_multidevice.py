"""8 emulated CPU devices compute what 1 device computes (jaxcert.parallel).

JAX fixes its device count when the backend starts, so the same worker (this file run
as a script) runs in two subprocesses, one with 8 CPU devices and one with 1, and the
test compares what they wrote: training losses and parameters (tbt, act, gdml), IBP
feature boxes and CR-Recall@K, smoothed embeddings and smoothing radii. The 8-device
worker also reports where its arrays lived, so a run that silently used 1 device fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("tbt", "act", "gdml")
BATCH = 16


# ---------------------------------------------------------------- the worker


def _config(method: str):
  from jaxcert.config import base_config  # noqa: PLC0415
  c = base_config()
  c.data.name = "fashion_mnist"
  c.model.arch = "small"
  c.model.embed_dim = 8
  c.train.method = method
  c.train.num_steps = 3
  c.train.batch_size = BATCH
  c.train.learning_rate = 3e-3
  c.train.eps = 0.05
  c.train.ramp_start = 0
  c.train.ramp_end = 2
  c.train.act_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 100
  if method == "gdml":
    c.model.normalize = True
    c.train.classes_per_batch = 8      # 8 classes x 2 images
  return c


def _data():
  """80 uint8 28x28 images of 10 classes (brightness by class, plus noise)."""
  rng = np.random.default_rng(0)
  labels = (np.arange(80) % 10).astype(np.int32)
  images = 20.0 * labels[:, None, None, None] + rng.normal(60, 4, (80, 28, 28, 1))
  return np.clip(images, 0, 255).astype(np.uint8), labels


def _worker(out_dir: str, process_id: int | None = None, coordinator: str | None = None,
            num_processes: int = 2) -> None:
  """Writes results.json and arrays.npz to ``out_dir``. With ``process_id``: one of
  ``num_processes`` processes (jax.distributed through config.parallel) that train TBT
  together in ``out_dir``/.. and compute feature boxes each on its own devices."""
  import jax  # noqa: PLC0415  (no backend yet: jax.distributed starts first)

  from jaxcert import certification, models, parallel, smoothing, training  # noqa: PLC0415
  from jaxcert import data as data_lib  # noqa: PLC0415

  res: dict = {}
  arrays: dict = {}
  images, labels = _data()
  training.data_lib.load_config_split = lambda cfg, split: data_lib.Split(images, labels)

  # training: the rows each device's model call sees, the losses, the parameters
  rows_seen: list = []
  real_apply_fn = models.apply_fn

  def spying_apply_fn(graphdef):
    apply = real_apply_fn(graphdef)

    def spy(params, x):
      rows_seen.append(int(x.shape[0]))
      return apply(params, x)
    return spy

  multi = process_id is not None
  for method in ("tbt",) if multi else METHODS:
    rows_seen.clear()
    c = _config(method)
    if multi:   # train.py --config.parallel.distributed=True --config.parallel...
      c.parallel.distributed = True
      c.parallel.coordinator_address = coordinator
      c.parallel.num_processes = num_processes
      c.parallel.process_id = process_id
    workdir = os.path.join(os.path.dirname(out_dir), f"work_{method}") if multi else (
        tempfile.mkdtemp())
    training.models.apply_fn = spying_apply_fn
    r = training.train(c, workdir, log=lambda s: None)
    training.models.apply_fn = real_apply_fn
    if not process_id:   # metrics.csv: written by process 0 only
      with open(os.path.join(workdir, "metrics.csv")) as f:
        head, *rows = [line.strip().split(",") for line in f]
      res[f"{method}_loss"] = [float(row[head.index("loss")]) for row in rows]
    leaves = jax.tree.leaves(r.params)
    res[f"{method}_param_devices"] = min(len(x.sharding.device_set) for x in leaves)
    res[f"{method}_max_rows"] = max(rows_seen)
    arrays[f"{method}_params"] = np.concatenate([np.ravel(parallel.to_host(x))
                                                 for x in leaves])
  res.update(device_count=jax.device_count(), process_count=jax.process_count(),
             local_devices=jax.local_device_count(),
             rows=[parallel.process_rows(parallel.make_mesh(), BATCH).start,
                   parallel.process_rows(parallel.make_mesh(), BATCH).stop])

  if jax.device_count() > 1 and not multi:   # the batch must split evenly
    c = _config("tbt")
    c.train.batch_size = 12
    try:
      training.train(c, tempfile.mkdtemp(), log=lambda s: None)
      res["indivisible_error"] = None
    except ValueError as e:
      res["indivisible_error"] = str(e)

  # IBP feature boxes over queries, then the certificates
  c = _config("tbt")
  graphdef, params = training.build_model(c, images.shape[1:])
  apply = models.apply_fn(graphdef)
  x = data_lib.to_float(images)
  q, cand = x[:30], x[30:]
  lq, lc = labels[:30], labels[30:]
  devices_seen: list = []
  real_map = models.map_batches

  def spying_map(fn, imgs, batch_size, **kw):
    def spy(chunk):
      devices_seen.append(len(chunk.sharding.device_set))
      return fn(chunk)
    return real_map(spy, imgs, batch_size, **kw)

  models.map_batches = spying_map
  eps = 1e-6   # an untrained CNN: a radius where some rankings are certified
  bq = certification.feature_boxes(apply, params, q, eps, batch_size=12, fp_sound=True)
  bc = certification.feature_boxes(apply, params, cand, eps, batch_size=12, fp_sound=True)
  fq = models.embed(apply, params, q, batch_size=12)
  fc = models.embed(apply, params, cand, batch_size=12)
  models.map_batches = real_map
  res["box_devices"] = min(devices_seen)
  arrays.update(box_lower=np.concatenate([bq.lower, bc.lower]),
                box_upper=np.concatenate([bq.upper, bc.upper]), features=fq)
  if multi:   # the certificates are a function of the boxes compared above
    _save(out_dir, res, arrays)
    return
  cert = certification.certify_features(fq, bq, lq, fc, bc, lc, ks=(1, 5, 10),
                                        fp_sound=True)
  res["certificates"] = {k: {str(kk): float(vv) for kk, vv in v.items()}
                         for k, v in cert.items()}

  # smoothing: samples split 8 ways (1 image per step), images 4 x samples 2 (4 per step)
  c = _config("gdml")
  graphdef, params = training.build_model(c, images.shape[1:])
  apply = models.apply_fn(graphdef)
  smooth_rows: list = []

  def spy_apply(p, z):
    smooth_rows.append(int(z.shape[0]))
    return apply(p, z)

  n, chunk, sigma = 1500, 100, 0.25
  kw = dict(sigma=sigma, num_samples=n, key=jax.random.key(3), chunk_size=chunk)
  z1, cov = smoothing.smoothed_embed(spy_apply, params, q[:8], batch_images=1,
                                     covariance=True, **kw)
  z4 = smoothing.smoothed_embed(spy_apply, params, q[:8], batch_images=4, **kw)
  res["smoothing_rows"] = sorted(set(smooth_rows))
  gallery = smoothing.project_to_ball(models.embed(apply, params, cand), 1.0)
  t = smoothing.certified_t(n, z1.shape[1], 1.0, 0.01, chunk_size=chunk)
  rad = smoothing.certify_smoothed(z1, lq[:8], np.asarray(gallery, np.float64), lc,
                                   sigma=sigma, norm_bound=1.0, t_query=t, ks=(1, 3),
                                   cov=cov, num_samples=n, rho=0.01, chunk_size=chunk)
  arrays.update(smoothed=z1, smoothed4=z4, cov=cov,
                **{f"radius_{k}": np.asarray(v, np.float64) for k, v in rad.items()})
  res["mesh_devices"] = parallel.current_mesh().size

  _save(out_dir, res, arrays)


def _save(out_dir: str, res: dict, arrays: dict) -> None:
  np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(res, f)


# ---------------------------------------------------------------- the test


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _start(out, devices: int, *args: str) -> subprocess.Popen:
  out.mkdir(parents=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={devices}").strip(),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, __file__, str(out), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{8: one process, 8 devices; 1: one device; "p0", "p1": two processes x 4 devices}:
  (results, arrays) of each worker; all four run at once."""
  root = tmp_path_factory.mktemp("multidevice")
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = {8: (root / "dev8", 8, ()), 1: (root / "dev1", 1, ())}
  procs.update({f"p{i}": (root / "multi" / f"p{i}", 4, (str(i), coordinator, "2"))
                for i in range(2)})
  started = {k: (out, _start(out, n, *args)) for k, (out, n, args) in procs.items()}
  out = {}
  for k, (path, p) in started.items():
    log, _ = p.communicate(timeout=400)
    assert p.returncode == 0, f"worker {k} failed:\n{log[-4000:]}"
    with open(path / "results.json") as f:
      out[k] = (json.load(f), dict(np.load(path / "arrays.npz")))
  return out


def _assert_same_training(a, b, methods, tag):
  """Losses within float tolerance; parameters too, except that Adam's normalised step
  (size ~lr) may point either way for the rare entries whose gradient is ~0 up to
  rounding: those may differ by a few lr, all others by < 1e-5."""
  (ra, aa), (rb, ab) = a, b
  lr, steps = _config("tbt").train.learning_rate, _config("tbt").train.num_steps
  for m in methods:
    assert len(rb[f"{m}_loss"]) == steps
    np.testing.assert_allclose(ra[f"{m}_loss"], rb[f"{m}_loss"], rtol=2e-4,
                               err_msg=f"{tag} {m}")
    diff = np.abs(aa[f"{m}_params"] - ab[f"{m}_params"])
    assert np.mean(diff > 1e-5) < 1e-3, (tag, m, np.mean(diff > 1e-5))
    assert diff.max() < 4 * lr * steps, (tag, m, diff.max())


def test_the_8_device_run_used_8_devices(runs):
  r8, _ = runs[8]
  r1, _ = runs[1]
  assert r8["device_count"] == 8 and r1["device_count"] == 1
  assert r8["mesh_devices"] == 8 and r1["mesh_devices"] == 1
  assert r8["rows"] == [0, BATCH] and r1["rows"] == [0, BATCH]
  for m in METHODS:   # parameters replicated on all 8, each model call on 1/8 of the rows
    assert r8[f"{m}_param_devices"] == 8
    assert r8[f"{m}_max_rows"] * 8 == r1[f"{m}_max_rows"], m
  assert r1["tbt_max_rows"] == 3 * BATCH
  assert r8["box_devices"] == 8 and r1["box_devices"] == 1
  # 1 image x 100 samples per call on 1 device; 1 x 13 (100 over 8, padded) or 4 x 50
  # (4 images on 4 devices x 2 sample halves) on 8 -- plus the clean f(x) of covariance
  assert set(r1["smoothing_rows"]) >= {100, 400}
  assert max(r8["smoothing_rows"]) == 50 and 13 in r8["smoothing_rows"]
  assert "config.train.batch_size=12" in r8["indivisible_error"]
  assert "8" in r8["indivisible_error"]


def test_training_losses_and_parameters_match(runs):
  _assert_same_training(runs[8], runs[1], METHODS, "8 devices")
  for m in METHODS:   # the losses moved (the steps did something)
    assert len(set(np.round(runs[1][0][f"{m}_loss"], 6))) > 1, (m, runs[1][0][f"{m}_loss"])


def test_two_processes_train_together_and_match(runs):
  """jax.distributed (config.parallel): 2 processes x 4 devices, each feeding its half
  of every batch, train the model one device trains."""
  (r0, a0), (r1, a1) = runs["p0"], runs["p1"]
  for r in (r0, r1):
    assert (r["process_count"], r["device_count"], r["local_devices"]) == (2, 8, 4)
    assert r["tbt_param_devices"] == 8
    assert r["tbt_max_rows"] * 8 == runs[1][0]["tbt_max_rows"]
    assert r["box_devices"] == 4   # evaluation: each process on its own 4 devices
  assert r0["rows"] == [0, BATCH // 2] and r1["rows"] == [BATCH // 2, BATCH]
  _assert_same_training(runs["p0"], runs[1], ("tbt",), "2 processes")
  # both processes hold the same replicated parameters
  np.testing.assert_array_equal(a0["tbt_params"], a1["tbt_params"])


def test_feature_boxes_and_certificates_match(runs):
  (r8, a8), (r1, a1) = runs[8], runs[1]
  for k in ("box_lower", "box_upper", "features"):
    for other in (a8, runs["p0"][1], runs["p1"][1]):
      np.testing.assert_allclose(other[k], a1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert np.all(a1["box_lower"] < a1["box_upper"])
  assert r8["certificates"] == r1["certificates"]
  cr = r1["certificates"]["cr_recall_qa"]
  assert 0.0 < max(cr.values()) and min(cr.values()) < 1.0, cr   # not a trivial table


def test_smoothed_embeddings_and_radii_match(runs):
  (_, a8), (_, a1) = runs[8], runs[1]
  for k in ("smoothed", "smoothed4", "cov"):
    np.testing.assert_allclose(a8[k], a1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # 1 or 4 images per step: the same noise for every sample (up to summation order)
  np.testing.assert_allclose(a1["smoothed4"], a1["smoothed"], rtol=1e-5, atol=1e-7)
  radii = [k for k in a1 if k.startswith("radius_")]
  assert {"radius_paper_radius", "radius_halfspace_radius"} <= set(radii)
  for k in radii:
    np.testing.assert_allclose(a8[k], a1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert np.any(a1["radius_halfspace_radius"] > 0)   # some queries are certified


# ---------------------------------------------------------------- helpers, in this process


def test_mesh_and_batch_helpers_check_their_arguments():
  import jax  # noqa: PLC0415

  from jaxcert import parallel  # noqa: PLC0415
  n = jax.device_count()
  mesh = parallel.make_mesh()
  assert mesh.size == n and mesh.axis_names == (parallel.DATA,)
  assert parallel.make_mesh(1).size == 1
  for bad in (0, n + 1, True, 1.5):
    with pytest.raises(ValueError, match=r"config.parallel.num_devices must be an integer "
                       r"in \[1, \d+\] .* got config.parallel.num_devices="):
      parallel.make_mesh(bad, name="config.parallel.num_devices")
  assert parallel.process_rows(mesh, 4 * n) == slice(0, 4 * n)
  one = jax.make_mesh((1,), ("data",))
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh with an axis"):
    with parallel.use_mesh(jax.make_mesh((1,), ("model",))):
      pass
  with parallel.use_mesh(one):
    assert parallel.current_mesh() is one
  assert parallel.current_mesh() is parallel.local_mesh()
  with pytest.raises(ValueError, match="axis must lie in"):
    parallel.batch_spec(2, 2)
  assert parallel.batch_spec(5, 1) == jax.sharding.PartitionSpec(None, "data")
  # a [3, B, ...] triplet batch split along B; values unchanged, back on the host
  x = np.arange(3 * 4 * n * 2, dtype=np.float32).reshape(3, 4 * n, 2)
  got = parallel.shard_batch({"images": x}, mesh, {"images": parallel.batch_spec(3, 1)})
  assert got["images"].sharding.spec == parallel.batch_spec(3, 1)
  np.testing.assert_array_equal(parallel.to_host(got)["images"], x)
  rep = parallel.replicate({"w": x}, mesh)["w"]
  assert rep.sharding.is_fully_replicated and len(rep.sharding.device_set) == n


def test_indivisible_batch_and_bad_device_counts_fail_before_training(tmp_path):
  import jax  # noqa: PLC0415

  from jaxcert import parallel, training  # noqa: PLC0415
  c = _config("tbt")
  c.parallel.num_devices = jax.device_count() + 1
  with pytest.raises(ValueError, match=r"config.parallel.num_devices must be an integer"):
    training.train(c, str(tmp_path), log=lambda s: None)
  mesh = jax.make_mesh((1,), ("data",))
  with pytest.raises(ValueError, match=r"config.train.batch_size=7 must be divisible by"):
    parallel.check_divisible(7, _FakeMesh(2), "config.train.batch_size")
  parallel.check_divisible(8, mesh, "config.train.batch_size")
  c = _config("tbt")
  c.parallel.distributed = True
  c.parallel.num_processes, c.parallel.process_id = 2, 5
  with pytest.raises(ValueError, match=r"config.parallel.process_id must lie in \[0, "):
    training.train(c, str(tmp_path), log=lambda s: None)
  assert not os.listdir(tmp_path)


class _FakeMesh:
  """A stand-in with a ``data`` axis of ``n`` devices (check_divisible reads only that)."""

  def __init__(self, n):
    self.shape = {"data": n}


def test_process_split_gives_disjoint_parts_covering_the_split():
  from jaxcert import parallel  # noqa: PLC0415
  parts = [parallel.process_split("train", process_index=i, process_count=3) for i in range(3)]
  assert [(p.split, p.index, p.count) for p in parts] == [("train", i, 3) for i in range(3)]
  assert parallel.process_split("test").count == 1
  with pytest.raises(ValueError, match="process_index must lie in"):
    parallel.process_split("train", process_index=3, process_count=3)


def test_pgd_takes_a_start_drawn_by_the_caller():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from jaxcert import attacks  # noqa: PLC0415
  x = jnp.full((4, 3), 0.5)
  key = jax.random.key(0)
  start = jax.random.uniform(jax.random.split(key)[1], x.shape, x.dtype, x - 0.1, x + 0.1)
  loss = lambda z: jnp.sum((z - 0.2) ** 2, axis=1)
  a = attacks.pgd(loss, x, 0.1, steps=0, step_size=0.01, key=key, random_start=True)
  b = attacks.pgd(loss, x, 0.1, steps=0, step_size=0.01, start=start)
  np.testing.assert_array_equal(a, b)   # the same draw as pgd's own random start
  with pytest.raises(ValueError, match="either start or random_start"):
    attacks.pgd(loss, x, 0.1, steps=1, step_size=0.01, key=key, random_start=True,
                start=start)


if __name__ == "__main__":   # OUT_DIR [PROCESS_ID COORDINATOR NUM_PROCESSES]
  if len(sys.argv) > 2:
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
  else:
    _worker(sys.argv[1])
