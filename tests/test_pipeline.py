"""train -> checkpoint -> interrupt -> resume -> certify on tfds mock data."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import Interrupt, stop_at, tiny_train_config
from jaxcert import certification, losses, training
from jaxcert.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


tiny_config = tiny_train_config
pytestmark = pytest.mark.usefixtures("mock_fashion_mnist")


def test_resume_matches_uninterrupted_run(tmp_path):
  cfg = tiny_config()
  full = training.train(cfg, str(tmp_path / "full"), log=lambda s: None)
  assert full.step == 6
  with pytest.raises(Interrupt):
    training.train(cfg, str(tmp_path / "cut"), log=stop_at(5))  # last ckpt: 4
  lines = []
  resumed = training.train(cfg, str(tmp_path / "cut"), log=lines.append)
  assert any("resumed from checkpoint at step 4" in s for s in lines)
  assert resumed.step == 6
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # max_to_keep=2: steps 4 and 6 remain
  ckpts = sorted(os.listdir(tmp_path / "cut" / "checkpoints"))
  assert ckpts == ["4", "6"], ckpts
  # a progress line has loss, eps/kappa, rate and ETA
  assert any("steps/s" in s and "ETA" in s and "kappa" in s for s in lines)


def test_certify_writes_report(tmp_path, capsys):
  cfg = tiny_config()
  training.train(cfg, str(tmp_path), log=lambda s: None)
  res = certification.certify(cfg, str(tmp_path))
  out = tmp_path / "certify"
  with open(out / "results.json") as f:
    saved = json.load(f)
  assert saved["num_queries"] == 12 and saved["num_candidates"] == 20
  assert saved["eps"] == 0.05 and saved["checkpoint_step"] == 6
  assert not set(saved["query_indices"]) & set(saved["candidate_indices"])
  m = saved["metrics"]
  for k in ("1", "5", "20"):
    for key in ("cr_recall_qa", "cr_recall_ca"):
      assert m[key][k] <= m[f"{key}_one_sided"][k] <= m["recall"][k]
    assert m["cr_recall_qa"][k] <= m["er_recall_qa"][k]
    assert m["cr_recall_ca"][k] <= m["er_recall_ca"][k]
  for kind in ("qa_audit", "ca_audit"):
    audit = saved["attack"].pop(kind)
    assert audit["broken"] == 0 and audit["claims"] >= 0
  assert saved["attack"] == {"steps": 3, "ca_sources": 3, "step_size": 0.005, "seed": 0,
                             "restarts": 1}
  assert m["recall"]["1"] <= m["recall"]["5"] <= m["recall"]["20"]
  with open(out / "cr_recall.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  table = (out / "results.md").read_text()
  assert "| Recall@K |" in table and "ER QA 5 | " in table and "CR CA 20 |" in table
  assert "ER QA 1" in capsys.readouterr().out
  assert res["metrics"] == saved["metrics"]


def test_failed_certify_leaves_nothing(tmp_path):
  cfg = tiny_config()
  training.train(cfg, str(tmp_path), log=lambda s: None)
  cfg.certify.ks = (1, 21)  # K > |C| = 20
  with pytest.raises(ValueError, match=r"K must satisfy 1 <= K <= \|C\| = 20"):
    certification.certify(cfg, str(tmp_path))
  cfg.certify.ks = (1,)
  cfg.certify.ca_sources = 0
  with pytest.raises(ValueError, match="config.certify.ca_sources"):
    certification.certify(cfg, str(tmp_path))
  cfg.certify.ca_sources = 3
  cfg.certify.eps = -0.1
  with pytest.raises(ValueError, match=r"config.certify.eps.*-0.1"):
    certification.certify(cfg, str(tmp_path))
  assert not [p for p in os.listdir(tmp_path) if p.startswith("certify")]


def test_report_write_is_atomic(tmp_path, monkeypatch):
  from jaxcert import report
  cfg = tiny_config()
  training.train(cfg, str(tmp_path), log=lambda s: None)
  certification.certify(cfg, str(tmp_path))
  before = (tmp_path / "certify" / "results.json").read_text()

  def boom(*a, **k):
    raise RuntimeError("plot failed")

  monkeypatch.setattr(report, "plot", boom)
  cfg.certify.eps = 0.01
  with pytest.raises(RuntimeError, match="plot failed"):
    certification.certify(cfg, str(tmp_path))
  assert (tmp_path / "certify" / "results.json").read_text() == before
  assert sorted(os.listdir(tmp_path)) == ["certify", "checkpoints", "config.json",
                                         "metrics.csv", "run_info.json", "tensorboard"]


def test_missing_and_corrupt_checkpoint(tmp_path):
  cfg = tiny_config()
  with pytest.raises(CheckpointError, match="does not exist"):
    certification.certify(cfg, str(tmp_path / "nope"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="empty"):
    certification.certify(cfg, str(tmp_path / "empty"))
  training.train(cfg, str(tmp_path / "run"), log=lambda s: None)
  step_dir = tmp_path / "run" / "checkpoints" / "6"
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name != "_CHECKPOINT_METADATA":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(CheckpointError, match="6"):
    certification.certify(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "certify")


def test_non_finite_loss_stops_with_step(tmp_path, monkeypatch):
  cfg = tiny_config(method="triplet")
  monkeypatch.setattr(losses, "triplet_loss", lambda *a, **k: np.float32(np.nan) * a[0][:, 0])
  with pytest.raises(FloatingPointError, match="at step 0"):
    training.train(cfg, str(tmp_path), log=lambda s: None)
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


def test_bad_train_config(tmp_path):
  cfg = tiny_config()
  cfg.train.eps = -1.0
  with pytest.raises(ValueError, match=r"config.train.eps.*-1.0"):
    training.train(cfg, str(tmp_path))
  cfg = tiny_config(method="nope")
  with pytest.raises(ValueError, match="config.train.method"):
    training.train(cfg, str(tmp_path))


def test_bad_images():
  from jaxcert import models
  g, p = models.split(models.make_model("small", (28, 28, 1), embed_dim=4))
  apply = models.apply_fn(g)
  x = np.full((2, 28, 28, 1), 0.5, np.float32)
  x[1, 3, 4, 0] = np.nan
  with pytest.raises(ValueError, match=r"NaN.*\(1, 3, 4, 0\)"):
    certification.embed(apply, p, x)
  with pytest.raises(ValueError, match=r"\[0.0, 255.0\]"):
    certification.feature_boxes(apply, p, np.full((2, 28, 28, 1), 255.0), 0.1)
  with pytest.raises(ValueError, match=r"shape \[N, H, W, C\]"):
    certification.embed(apply, p, np.zeros((28, 28)))
  with pytest.raises(ValueError, match=r"eps=-0.5"):
    certification.feature_boxes(apply, p, np.zeros((1, 28, 28, 1)), -0.5)


def test_cli_rejects_unknown_config_key(tmp_path):
  for script in ("train.py", "certify.py"):
    r = subprocess.run([sys.executable, script, f"--workdir={tmp_path}",
                        "--config.train.no_such_key=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "unknown config key 'train.no_such_key'" in r.stderr
    assert "batch_size" in r.stderr  # lists the allowed keys


def test_cibp_resumes_with_its_head_and_fctb_fine_tunes_the_tbt_model(tmp_path):
  cfg = tiny_config(method="cibp")
  full = training.train(cfg, str(tmp_path / "full"), log=lambda s: None)
  with pytest.raises(Interrupt):
    training.train(cfg, str(tmp_path / "cut"), log=stop_at(5))
  resumed = training.train(cfg, str(tmp_path / "cut"), log=lambda s: None)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  res = certification.certify(cfg, str(tmp_path / "cut"), log=lambda s: None)
  assert res["method"] == "cibp" and res["checkpoint_step"] == 6

  tbt = tiny_config()
  f0 = training.train(tbt, str(tmp_path / "tbt"), log=lambda s: None)
  ft = tiny_config(method="fctb")
  ft.train.ramp_start = ft.train.ramp_end = 0
  ft.train.init_from = str(tmp_path / "tbt")
  lines = []
  tuned = training.train(ft, str(tmp_path / "fctb"), log=lines.append)
  assert any("20 candidates, f0 from" in s and "fctb" in s for s in lines)
  assert any("keep" in s and "reg" in s and "kappa 0.500" in s for s in lines)
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(f0.params), jax.tree.leaves(tuned.params),
                           strict=True)]
  assert 0 < max(moved) < 0.1   # starts from f0 and moves (6 Adam steps of lr 1e-3)
  res = certification.certify(ft, str(tmp_path / "fctb"), log=lambda s: None)
  assert res["method"] == "fctb"


def test_fctb_needs_a_compatible_init(tmp_path):
  ft = tiny_config(method="fctb")
  with pytest.raises(ValueError, match="config.train.init_from is required"):
    training.train(ft, str(tmp_path / "a"))
  ft.train.init_from = str(tmp_path / "missing")
  with pytest.raises(CheckpointError, match="no config.json"):
    training.train(ft, str(tmp_path / "b"))
  other = tiny_config(method="triplet")
  other.model.embed_dim = 4
  training.train(other, str(tmp_path / "other"), log=lambda s: None)
  ft.train.init_from = str(tmp_path / "other")
  with pytest.raises(ValueError, match="model.embed_dim=4"):
    training.train(ft, str(tmp_path / "c"))


def test_certify_with_crown_ibp_boxes(tmp_path):
  c = tiny_config()
  c.certify.fp_sound = False
  training.train(c, str(tmp_path), log=lambda s: None)
  ibp_res = certification.certify(c, str(tmp_path), output_dir=str(tmp_path / "ibp"),
                                  log=lambda s: None)
  c.certify.bound_method = "crown_ibp"
  res = certification.certify(c, str(tmp_path), output_dir=str(tmp_path / "crown"),
                              log=lambda s: None)
  assert res["bound_method"] == "crown_ibp"
  # Boxes inside IBP's -> every certified claim of IBP stays certified.
  assert res["mean_box_width"]["query"] <= ibp_res["mean_box_width"]["query"] + 1e-9
  for name in ("cr_recall_qa", "cr_recall_ca"):
    for k, v in res["metrics"][name].items():
      assert v >= ibp_res["metrics"][name][k], (name, k)
  for kind in ("qa_audit", "ca_audit"):
    assert res["attack"][kind]["broken"] == 0
  c.certify.fp_sound = True   # float-sound CROWN-IBP boxes (tests/test_fp_linear.py)
  fp_res = certification.certify(c, str(tmp_path), output_dir=str(tmp_path / "fp"),
                                 log=lambda s: None)
  assert fp_res["fp_sound"] and fp_res["bound_method"] == "crown_ibp"
  assert fp_res["mean_box_width"]["query"] >= res["mean_box_width"]["query"]
  for kind in ("qa_audit", "ca_audit"):
    assert fp_res["attack"][kind]["broken"] == 0
  nq = c.data.num_queries   # the widening's cost is counted against plain CROWN-IBP
  for kind in ("qa", "ca"):
    for k, cost in fp_res["fp_sound_cost"][kind].items():
      assert cost["plain"] == round(res["metrics"][f"cr_recall_{kind}"][k] * nq), (kind, k)
      assert cost["sound"] == round(fp_res["metrics"][f"cr_recall_{kind}"][k] * nq)
  # scripts/compare_bounds.py: the same numbers as certify(), side by side. Its absl
  # flags are removed afterwards (other scripts define --config too).
  import importlib.util  # noqa: PLC0415

  from absl import flags as absl_flags  # noqa: PLC0415
  before = set(absl_flags.FLAGS)
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "compare_bounds.py")
  try:
    spec = importlib.util.spec_from_file_location("compare_bounds", path)
    compare_bounds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_bounds)
    cmp = compare_bounds.compare(c, str(tmp_path), ["ibp", "crown_ibp"],
                                 fp_sound=(False, True), log=lambda s: None)
  finally:
    for name in set(absl_flags.FLAGS) - before:
      delattr(absl_flags.FLAGS, name)
  rows = cmp["bounds"]
  assert list(rows) == ["ibp", "ibp+fp", "crown_ibp", "crown_ibp+fp"]
  for name, ref in (("crown_ibp+fp", fp_res), ("crown_ibp", res), ("ibp", ibp_res)):
    assert "cr_recall_qa" in rows[name]["metrics"]
    for key, v in rows[name]["metrics"].items():
      assert v == ref["metrics"][key], (name, key)
  assert rows["crown_ibp+fp"]["width_vs_ibp"] <= 1.0   # against ibp+fp
  c.certify.bound_method = "deeppoly"
  with pytest.raises(ValueError, match="bound_method"):
    certification.certify(c, str(tmp_path), output_dir=str(tmp_path / "x"),
                          log=lambda s: None)
  assert not os.path.exists(tmp_path / "x")
