"""train (dml / gdml, ResNet, image folder) -> checkpoint -> certify.py smoothing."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxcert import certification, smoothing, training
from jaxcert.config import base_config


def tiny_config(method="gdml"):
  c = base_config()
  c.data.name = "fashion_mnist"
  c.data.num_queries = 10
  c.data.num_candidates = 30
  c.model.arch = "small"
  c.model.embed_dim = 8
  c.model.normalize = True
  c.train.method = method
  c.train.num_steps = 6
  c.train.batch_size = 12
  c.train.classes_per_batch = 3
  c.train.lr_decay_steps = (4,)
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.certify.method = "smoothing"
  c.smoothing.num_samples = 200
  c.smoothing.chunk_size = 64
  c.smoothing.batch_images = 2
  c.smoothing.ks = (1, 3)
  c.smoothing.num_radii = 9
  return c


@pytest.fixture
def mock_fmnist(monkeypatch):
  monkeypatch.setitem(training.data_lib.DEFAULT_SOURCE_DIRS, "fashion_mnist", None)
  with tfds.testing.mock_data(num_examples=64):
    yield


class Interrupt(Exception):
  pass


def test_gdml_resumes_with_beta_and_certify_writes_smoothing_report(tmp_path, mock_fmnist):
  cfg = tiny_config("gdml")
  full = training.train(cfg, str(tmp_path / "full"), log=lambda s: None)

  def stop_at_3(line):
    if line.startswith("step 3/"):
      raise Interrupt(line)
  with pytest.raises(Interrupt):
    training.train(cfg, str(tmp_path / "resumed"), log=stop_at_3)
  lines = []
  resumed = training.train(cfg, str(tmp_path / "resumed"), log=lines.append)
  assert any("resumed from checkpoint at step 2" in line for line in lines)
  jax.tree.map(np.testing.assert_array_equal, full.params, resumed.params)

  logs = []
  res = certification.certify(cfg, str(tmp_path / "full"), log=logs.append)
  out = tmp_path / "full" / "certify_smoothing"
  for name in ("results.json", "results.md", "certified_recall.png", "embeddings.npz"):
    assert (out / name).is_file(), name
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk["metrics"] == res["metrics"]
  assert len(on_disk["per_query"]) == 10 and on_disk["gallery"] == "fixed"
  t = smoothing.certified_t(200, 8, 1.0, 0.01, chunk_size=64)
  assert on_disk["t_query"] == pytest.approx(t)
  assert "halfspace_eb_top1" in on_disk["curve"]         # per-direction bounds (default)
  for row in on_disk["per_query"]:
    assert set(row["halfspace_eb_radius"]) == {"1", "3"}
    hs1 = float(row["halfspace_radius"]["1"])
    if row["paper_radius"] > 0:              # 0 = the paper abstains
      assert hs1 >= row["paper_radius"] - 1e-9
    assert float(row["halfspace_radius"]["3"]) >= hs1
  m = on_disk["metrics"]
  assert 0 <= m["rejected_ratio"] <= m["smoothed_recall_at_1"] <= 1
  # per-query radii recomputed from the saved embeddings give the same certificates
  arr = np.load(out / "embeddings.npz")
  cert = smoothing.certify_smoothed(arr["smoothed_queries"], arr["query_labels"],
                                    arr["gallery"], arr["candidate_labels"], sigma=0.25,
                                    norm_bound=1.0, t_query=t, ks=(1, 3))
  np.testing.assert_allclose(cert["paper_radius"],
                             [r["paper_radius"] for r in on_disk["per_query"]])
  assert arr["query_covariance"].shape == (10, 8, 8)
  # recomputed without sampling at a looser rho: smaller t, radii never smaller
  from jaxcert import smoothed_certify
  again = smoothed_certify.recertify(str(out), rho=0.2, output_dir=str(tmp_path / "re"),
                                     log=lambda s: None)
  assert again["t_query"] < on_disk["t_query"]
  for new, old in zip(again["per_query"], on_disk["per_query"], strict=True):
    assert new["paper_radius"] >= old["paper_radius"]
    assert float(new["halfspace_radius"]["1"]) >= float(old["halfspace_radius"]["1"])
  curve = on_disk["curve"]
  assert curve["paper"][0] == pytest.approx(
      np.mean([r["paper_radius"] > 0 for r in on_disk["per_query"]]))
  assert any("smoothing: 10/10 images" in line for line in logs)


def test_smoothed_gallery_mode_uses_the_union_bound(tmp_path, mock_fmnist):
  cfg = tiny_config("dml")
  cfg.train.num_steps = 2
  training.train(cfg, str(tmp_path), log=lambda s: None)
  cfg.smoothing.gallery = "smoothed"
  res = certification.certify(cfg, str(tmp_path), log=lambda s: None)
  t = smoothing.certified_t(200, 8, 1.0, 0.01, gallery_size=30, chunk_size=64)
  assert res["t_query"] == pytest.approx(t) and res["t_gallery"] == pytest.approx(t)
  assert t > smoothing.certified_t(200, 8, 1.0, 0.01, chunk_size=64)
  assert list(res["curve"]) == ["radius", "paper"]      # no half-space: gallery estimated
  for row in res["per_query"]:
    lower = row["margin"] - 4 * t if isinstance(row["margin"], float) else -1
    assert (row["paper_radius"] > 0) == (lower > 0)


def test_smoothing_config_errors(tmp_path, mock_fmnist):
  cfg = tiny_config("dml")
  cfg.model.normalize = False
  with pytest.raises(ValueError, match="needs an L2-normalised embedding"):
    training.train(cfg, str(tmp_path), log=lambda s: None)
  cfg = tiny_config("dml")
  cfg.train.classes_per_batch = 5
  with pytest.raises(ValueError, match="classes_per_batch=5 must be >= 2 and divide"):
    training.train(cfg, str(tmp_path), log=lambda s: None)
  cfg = tiny_config("dml")
  cfg.train.num_steps = 1
  training.train(cfg, str(tmp_path), log=lambda s: None)
  for key, value, match in [("gallery", "both", "smoothing.gallery must be one of"),
                            ("rho", 0.0, "smoothing.rho must lie in"),
                            ("sigma", -1.0, "smoothing.sigma must be a finite number > 0"),
                            ("num_samples", 0, "smoothing.num_samples must be a positive"),
                            ("ks", (1, 31), "K must satisfy 1 <= K <= |C| = 30")]:
    bad = tiny_config("dml")
    bad.smoothing[key] = value
    out = tmp_path / f"bad_{key}"
    with pytest.raises(ValueError, match=match):
      certification.certify(bad, str(tmp_path), output_dir=str(out), log=lambda s: None)
    assert not out.exists()
  cfg.certify.method = "both"
  with pytest.raises(ValueError, match="certify.method must be 'ibp' or 'smoothing'"):
    certification.certify(cfg, str(tmp_path), log=lambda s: None)


def _image_folder(root, classes=6, per_class=6, size=20):
  rng = np.random.default_rng(0)
  for c in range(classes):
    os.makedirs(root / f"class_{c:02d}")
    for i in range(per_class):
      base = np.full((size, size + 4, 3), 40 * c, np.uint8)
      img = np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / f"class_{c:02d}" / f"{i}.png")


def test_resnet18_dml_on_an_image_folder_trains_and_certifies(tmp_path):
  _image_folder(tmp_path / "images")
  cfg = tiny_config("dml")
  cfg.data.name = "folder"
  cfg.data.source_dir = str(tmp_path / "images")
  cfg.data.image_size = 16
  cfg.data.train_classes = 3
  cfg.data.num_queries = 6
  cfg.data.num_candidates = 12
  cfg.model.arch = "resnet18"
  cfg.model.freeze_bn = True
  cfg.train.num_steps = 2
  cfg.smoothing.num_samples = 32
  cfg.smoothing.chunk_size = 32
  lines = []
  result = training.train(cfg, str(tmp_path / "run"), log=lines.append)
  assert any("training resnet18 with dml on folder (18 images)" in line for line in lines)
  # frozen BN: statistics and affine parameters did not move
  init = training.build_model(cfg, (16, 16, 3))[1]
  np.testing.assert_array_equal(result.params["bn1"]["scale"], init["bn1"]["scale"])
  np.testing.assert_array_equal(result.params["bn1"]["mean"], init["bn1"]["mean"])
  assert not np.array_equal(result.params["conv1"]["kernel"], init["conv1"]["kernel"])
  res = certification.certify(cfg, str(tmp_path / "run"), log=lambda s: None)
  assert res["num_candidates"] == 12 and res["embed_dim"] == 8
  assert res["arch"] == "resnet18" and res["dataset"] == "folder"


def test_ablation_script_over_n_and_rho(tmp_path, mock_fmnist):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "smoothing_ablation.py")
  spec = importlib.util.spec_from_file_location("smoothing_ablation", path)
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  cfg = tiny_config("gdml")
  cfg.train.num_steps = 2
  training.train(cfg, str(tmp_path), log=lambda s: None)
  by_n = ablation.run(cfg, "n", ["64", "256"], str(tmp_path), str(tmp_path / "abl"),
                      log=lambda s: None)
  assert by_n["64"]["t"] > by_n["256"]["t"]                 # more samples, tighter t
  by_rho = ablation.run(cfg, "rho", ["0.1", "0.001"], str(tmp_path), str(tmp_path / "abl"),
                        log=lambda s: None)
  assert by_rho["0.1"]["t"] < by_rho["0.001"]["t"]
  for s in by_rho.values():   # a larger t can only shrink every certified curve
    assert all(h >= p - 1e-12 for h, p in zip(s["halfspace"], s["paper"], strict=True))
  assert all(a >= b for a, b in zip(by_rho["0.1"]["paper"], by_rho["0.001"]["paper"],
                                    strict=True))
  ablation.plot(by_n, "n", str(tmp_path / "n.png"))
  assert (tmp_path / "n.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="needs --workdir"):
    ablation.run(cfg, "n", ["64"], None, str(tmp_path / "abl"))


def test_smoothing_config_file():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "smoothing.py")
  spec = importlib.util.spec_from_file_location("smoothing_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("gdml,0.5")
  assert (c.train.method, c.train.noise_sigma, c.smoothing.sigma) == ("gdml", 0.5, 0.5)
  assert c.model.normalize and c.certify.method == "smoothing"
  assert mod.get_config("dml").train.method == "dml"
  with pytest.raises(ValueError, match="METHOD must be dml or gdml, got 'tbt'"):
    mod.get_config("tbt")
  with pytest.raises(ValueError, match="takes METHOD\\[,SIGMA\\]"):
    mod.get_config("gdml,0.5,3")
