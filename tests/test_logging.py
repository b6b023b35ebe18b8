"""Training logs (metrics.csv, TensorBoard events) and run metadata (run_info)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess

import flax
import jax
import jaxlib
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import Interrupt, stop_at, tiny_train_config
from jaxcert import certification, metric_writer, report, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_INFO_KEYS = {"config", "seed", "versions", "platform", "backend", "devices",
                 "device_kinds", "device_count", "local_device_count", "process_count",
                 "process_index", "git", "hostname", "argv", "time_utc"}


def tiny_config(method="tbt"):
  c = tiny_train_config(method)
  c.seed = 3
  c.train.checkpoint_every = 3
  c.certify.ks = (1, 5)
  c.certify.attack = False
  return c


pytestmark = pytest.mark.usefixtures("mock_fashion_mnist")


def _scalars(tb_dir):
  acc = event_accumulator.EventAccumulator(tb_dir, size_guidance={"scalars": 0,
                                                                  "tensors": 0})
  acc.Reload()
  return acc, {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def _git_head():
  try:
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                       text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return r.stdout.strip()


def _check_run_info(info, cfg):
  assert RUN_INFO_KEYS <= set(info)
  assert info["config"] == json.loads(cfg.to_json())
  assert info["seed"] == cfg.seed == 3
  v = info["versions"]
  assert v["jax"] == jax.__version__ and v["flax"] == flax.__version__
  assert v["optax"] == optax.__version__ and v["numpy"] == np.__version__
  assert v["orbax-checkpoint"] == ocp.__version__
  assert v["jaxlib"] == jaxlib.__version__
  assert v["python"] == platform.python_version()
  assert info["devices"] == [str(d) for d in jax.devices()]
  assert info["device_count"] == jax.device_count() == len(info["devices"])
  assert info["device_kinds"] == sorted({d.device_kind for d in jax.devices()})
  assert info["backend"] == jax.default_backend()
  assert (info["process_count"], info["process_index"]) == (1, 0)
  assert info["hostname"] == socket.gethostname()
  when = datetime.datetime.fromisoformat(info["time_utc"])
  age = datetime.datetime.now(datetime.timezone.utc) - when
  assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10)
  head = _git_head()
  if head is None:
    assert info["git"] is None
  else:
    assert info["git"]["commit"] == head and isinstance(info["git"]["dirty"], bool)


def test_csv_and_tensorboard_hold_the_schedule_and_survive_a_resume(tmp_path):
  cfg = tiny_config("tbt")
  training.train(cfg, str(tmp_path / "full"), log=lambda s: None)
  cut = tmp_path / "cut"
  with pytest.raises(Interrupt):   # rows 1..5 written, last checkpoint at step 3
    training.train(cfg, str(cut), log=stop_at(5))
  assert metric_writer.read_csv(str(cut / "metrics.csv"))["step"] == [1, 2, 3, 4, 5]
  lines = []
  training.train(cfg, str(cut), log=lines.append)
  assert any("resumed from checkpoint at step 3" in s for s in lines)

  full = metric_writer.read_csv(str(tmp_path / "full" / "metrics.csv"))
  got = metric_writer.read_csv(str(cut / "metrics.csv"))
  columns = ["step", "wall_time", "loss", "reg", "triplet", "box_width", "grad_norm",
             "eps", "kappa", "lr", "steps_per_sec", "images_per_sec"]
  assert list(got) == columns
  assert got["step"] == [1, 2, 3, 4, 5, 6]   # rows 4, 5 of the cut run were replaced
  assert np.all(np.diff(got["wall_time"]) >= 0)
  # the resumed rows hold the uninterrupted run's values (bit-exact resume)
  for c in columns[2:10]:
    assert got[c] == full[c], c
  f32 = lambda xs: np.asarray(xs, np.float32)
  np.testing.assert_array_equal(f32(got["eps"]), f32([0, 0, 0.05, 0.1, 0.1, 0.1]))
  np.testing.assert_array_equal(f32(got["kappa"]), f32([1, 1, 0.75, 0.5, 0.5, 0.5]))
  decayed = np.float32(1e-3) * np.float32(0.1)   # optax multiplies in float32
  np.testing.assert_array_equal(f32(got["lr"]), f32([1e-3] * 4 + [decayed] * 2))
  eps_fn, kappa_fn = training.eps_schedule(cfg.train), training.kappa_schedule(cfg.train)
  lr_fn = training.lr_schedule(cfg.train)
  for i, s in enumerate(got["step"]):   # the values of the update from s - 1 to s
    assert got["eps"][i] == float(eps_fn(s - 1))
    assert got["kappa"][i] == float(kappa_fn(s - 1))
    assert got["lr"][i] == float(lr_fn(s - 1))
  loss, kappa = np.asarray(got["loss"]), np.asarray(got["kappa"])
  assert np.all(np.isfinite(loss)) and np.all(np.asarray(got["grad_norm"]) > 0)
  # Eq. 20: loss = kappa * triplet + (1 - kappa) * reg (batch means)
  np.testing.assert_allclose(loss, kappa * np.asarray(got["triplet"])
                             + (1 - kappa) * np.asarray(got["reg"]), rtol=1e-5)
  assert got["box_width"][0] == 0.0 and got["box_width"][-1] > 0   # eps 0, then 0.1
  np.testing.assert_allclose(np.asarray(got["images_per_sec"]),
                             24 * np.asarray(got["steps_per_sec"]), rtol=1e-12)

  # TensorBoard: the restart marker drops the cut run's steps 4, 5
  assert len(os.listdir(cut / "tensorboard")) == 2
  acc, scalars = _scalars(str(cut / "tensorboard"))
  assert set(scalars) == {training.metric_tag(c) for c in columns[2:]}
  assert {"train/loss", "schedule/eps", "schedule/lr", "perf/steps_per_sec"} <= set(scalars)
  for c in columns[2:]:
    events = scalars[training.metric_tag(c)]
    assert [e.step for e in events] == got["step"], c
    np.testing.assert_array_equal(f32([e.value for e in events]), f32(got[c]))
  assert "run_info" in acc.Tags()["tensors"]

  # run_info.json: one entry per launch
  with open(cut / "run_info.json") as f:
    infos = json.load(f)
  assert [(i["start_step"], i["resumed"]) for i in infos] == [(0, False), (3, True)]
  for info in infos:
    _check_run_info(info, cfg)
  # a finished run launched again trains nothing and records nothing
  before = (cut / "metrics.csv").read_text()
  training.train(cfg, str(cut), log=lambda s: None)
  assert (cut / "metrics.csv").read_text() == before
  assert len(json.loads((cut / "run_info.json").read_text())) == 2
  assert len(os.listdir(cut / "tensorboard")) == 2


def test_writer_truncates_extends_and_rejects(tmp_path):
  wd = str(tmp_path)
  with metric_writer.MetricWriter(wd) as w:
    for s in range(1, 6):
      w.write(s, {"a": s / 10, "b": -s})
  with open(tmp_path / "metrics.csv", "a") as f:
    f.write("6,17")   # a half-written line of a killed run
  with metric_writer.MetricWriter(wd, start_step=3) as w:
    assert metric_writer.read_csv(w.csv_path)["step"] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"step must increase: got step=3 after step 3"):
      w.write(3, {"a": 0.0})
    w.write(4, {"a": 0.25, "c": float("nan")})   # a new column, b missing
  got = metric_writer.read_csv(str(tmp_path / "metrics.csv"))
  assert list(got) == ["step", "wall_time", "a", "b", "c"]
  assert got["step"] == [1, 2, 3, 4]
  assert got["a"] == [0.1, 0.2, 0.3, 0.25]
  assert got["b"][:3] == [-1, -2, -3] and np.isnan(got["b"][3])
  assert all(np.isnan(got["c"]))
  _, scalars = _scalars(str(tmp_path / "tensorboard"))
  assert [e.step for e in scalars["a"]] == [1, 2, 3, 4]
  assert [e.step for e in scalars["b"]] == [1, 2, 3]
  np.testing.assert_array_equal([e.value for e in scalars["a"]],
                                np.float32([0.1, 0.2, 0.3, 0.25]))
  # a fresh start (no checkpoint) over an old log keeps the header only
  metric_writer.MetricWriter(wd, start_step=0).close()
  assert (tmp_path / "metrics.csv").read_text() == "step,wall_time,a,b,c\n"

  with pytest.raises(ValueError, match=r"start_step must be an integer >= 0, got -1"):
    metric_writer.MetricWriter(wd, start_step=-1)
  with metric_writer.MetricWriter(wd) as w, pytest.raises(ValueError, match="'step'"):
    w.write(1, {"step": 1.0})
  with pytest.raises(ValueError, match="is closed"):
    w.write(1, {"a": 1.0})
  off = tmp_path / "off"
  metric_writer.MetricWriter(str(off), enabled=False).write(1, {"a": 1.0})
  assert not off.exists()
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "metrics.csv").write_text("epoch,loss\n1,2\n")
  with pytest.raises(ValueError, match=r"bad/metrics.csv is not a metrics file.*'epoch'"):
    metric_writer.MetricWriter(str(tmp_path / "bad"))


def test_run_info_without_git_and_bad_inputs(tmp_path, monkeypatch):
  cfg = tiny_config()
  _check_run_info(report.run_info(cfg), cfg)

  def no_git(*a, **k):
    raise FileNotFoundError("git")
  monkeypatch.setattr(report.subprocess, "run", no_git)
  info = report.run_info(cfg)
  assert info["git"] is None and info["versions"]["jax"] == jax.__version__
  monkeypatch.undo()
  # a checkout whose top level is not jaxcert's (jaxcert installed inside another repo)
  assert report.git_commit(os.path.join(ROOT, "jaxcert")) is None
  with pytest.raises(TypeError, match="config must be .* got int"):
    report.run_info(3)
  (tmp_path / "run_info.json").write_text('{"not": "a list"}')
  with pytest.raises(ValueError, match=r"run_info.json must hold a JSON list"):
    report.append_run_info(str(tmp_path), cfg)


def test_certify_results_carry_run_info(tmp_path):
  cfg = tiny_config("triplet")
  cfg.train.num_steps = 2
  if "fp_sound" in cfg.certify:   # this test is about the record, not the bounds
    cfg.certify.fp_sound = False
  training.train(cfg, str(tmp_path), log=lambda s: None)
  res = certification.certify(cfg, str(tmp_path), log=lambda s: None)
  with open(tmp_path / "certify" / "results.json") as f:
    saved = json.load(f)
  _check_run_info(saved["run_info"], cfg)
  # the keys results files had before run_info, still there
  assert saved["versions"]["jax"] == jax.__version__
  assert saved["versions"]["devices"] == [str(d) for d in jax.devices()]
  assert res["run_info"]["config"] == saved["config"]


def test_smoothing_results_carry_run_info(tmp_path):
  cfg = tiny_config("dml")
  cfg.model.normalize = True
  cfg.model.embed_dim = 8
  cfg.train.num_steps = 2
  cfg.train.batch_size = 12
  cfg.train.classes_per_batch = 3
  cfg.certify.method = "smoothing"
  cfg.smoothing.num_samples = 64
  cfg.smoothing.chunk_size = 64
  cfg.smoothing.ks = (1,)
  cfg.smoothing.num_radii = 5
  training.train(cfg, str(tmp_path), log=lambda s: None)
  with open(tmp_path / "metrics.csv") as f:
    header = f.readline().strip().split(",")
  assert header == ["step", "wall_time", "loss", "beta", "d_an", "d_ap", "grad_norm",
                    "eps", "kappa", "lr", "lr_beta", "steps_per_sec", "images_per_sec"]
  certification.certify(cfg, str(tmp_path), log=lambda s: None)
  with open(tmp_path / "certify_smoothing" / "results.json") as f:
    saved = json.load(f)
  _check_run_info(saved["run_info"], cfg)
  assert saved["versions"]["jax"] == jax.__version__
  assert saved["versions"]["devices"] == [str(d) for d in jax.devices()]
