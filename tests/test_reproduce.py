"""The paper's grid: configs for every cell, and the reproduction run end to end (mock data)."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from jaxcert import data as data_lib
from jaxcert import grid, paper, reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dataset", grid.DATASETS)
def test_every_grid_cell_has_a_config(dataset):
  for arch in grid.ARCHS:
    for method in grid.METHODS:
      for budget in grid.BUDGETS:
        for eps in grid.EPS[dataset]:
          c = grid.cbir_config(f"{dataset},{arch},{method},{eps!r},{budget}")
          assert (c.data.name, c.model.arch, c.train.method) == (dataset, arch, method)
          assert c.certify.eps == pytest.approx(eps)
          assert c.train.eps == grid.TRAIN_EPS[dataset]
          if method == "fctb":
            assert c.train.ramp_start == c.train.ramp_end == 0
            assert c.train.kappa == grid.FCTB_KAPPA[dataset]
          else:
            assert c.train.kappa == 0.5
  paper_cfg = grid.cbir_config(f"{dataset},large,tbt")
  epochs = 200 if dataset == "cifar10" else 100
  assert paper_cfg.train.num_steps == epochs * (50_000 if dataset == "cifar10" else 60_000) // 100
  assert paper_cfg.train.ramp_start == 2_000 and paper_cfg.train.ramp_end == 10_000
  assert paper_cfg.certify.attack_steps == 100 and paper_cfg.certify.ca_sources == 100


def test_grid_config_errors_and_fractions():
  assert grid.cbir_config("cifar10,small,act,3/255").certify.eps == pytest.approx(3 / 255)
  assert grid.cbir_config("cifar10,small,act").certify.eps == pytest.approx(2 / 255)
  assert grid.cbir_config("mnist,small,act").certify.eps == 0.2
  assert grid.cbir_config("mnist,small,act,cpu").train.num_steps == 6_000
  for bad, msg in (("mnist,small", "DATASET,ARCH,METHOD"), ("svhn,small,tbt", "DATASET"),
                   ("mnist,huge,tbt", "ARCH"), ("mnist,small,pgd", "METHOD"),
                   ("mnist,small,tbt,abc", "EPS"), ("mnist,small,tbt,0.1,gpu", "BUDGET")):
    with pytest.raises(ValueError, match=msg):
      grid.cbir_config(bad)


def test_paper_lookup():
  assert paper.lookup("fashion_mnist", "large", "tbt", 0.2, "cr_recall_ca") == (
      0.00, 0.07, 0.24, 0.64)
  assert paper.lookup("cifar10", "large", "fctb", 2 / 255, "recall")[0] == 0.19
  assert paper.lookup("fashion_mnist", "small", "tbt", 0.2, "recall") is None
  assert paper.lookup("fashion_mnist", "large", "tbt", 0.1, "recall") is None
  assert reproduce.eps_tag(2 / 255) == "2_255" and reproduce.eps_tag(0.2) == "0.2"


TINY = {"train.num_steps": 4, "train.batch_size": 8, "train.log_every": 2,
        "train.checkpoint_every": 2, "train.ramp_start": 1, "train.ramp_end": 2,
        "train.act_steps": 2, "model.embed_dim": 8,
        "data.num_queries": 10, "data.num_candidates": 16,
        "certify.ks": (1, 10), "certify.batch_size": 16, "certify.attack_steps": 2,
        "certify.ca_sources": 2, "certify.audit_pool": 8}


def test_reproduce_end_to_end_and_resumes(tmp_path, monkeypatch):
  monkeypatch.setitem(data_lib.DEFAULT_SOURCE_DIRS, "fashion_mnist", None)
  root = str(tmp_path / "grid")
  lines = []
  kw = dict(datasets=["fashion_mnist"], archs=["small"], methods=["triplet", "cibp", "fctb"],
            eps_values=[0.05], budget="cpu", root=root, overrides=TINY, log=lines.append)
  with tfds.testing.mock_data(num_examples=64):
    data = reproduce.run(**kw)
  # fctb needs tbt: trained first although not requested
  assert any("[train 3/4] fashion_mnist small tbt" in s for s in lines)
  assert os.path.isdir(os.path.join(root, "fashion_mnist_small_tbt_cpu", "checkpoints"))
  table = open(os.path.join(root, "tables.md")).read()
  for name in ("| Triplet |", "| C-IBP |", "| TBT+FCTB |"):
    assert table.count(name) == 2, table      # Table 1 and Table 2
  assert "| TBT |" not in table
  assert "## Table 2: ER / CR-Recall@K, fashion_mnist, small, eps = 0.05" in table
  with open(os.path.join(root, "cbir_fashion_mnist_small_eps0.05.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"
  saved = json.load(open(os.path.join(root, "tables.json")))
  assert saved == json.loads(json.dumps(data))
  assert len(saved["cells"]) == 3
  for cell in saved["cells"]:
    m = cell["ours"]
    for k in ("1", "10"):   # a certificate never beats an attack
      assert m["cr_recall_qa"][k] <= m["er_recall_qa"][k]
      assert m["cr_recall_ca"][k] <= m["er_recall_ca"][k]
    assert all(a.startswith("0/") for a in cell["audit"]), cell["audit"]
  # a second run trains nothing and certifies nothing
  lines.clear()
  with tfds.testing.mock_data(num_examples=64):
    reproduce.run(**kw)
  assert sum("already trained" in s for s in lines) == 4
  assert sum("up to date" in s for s in lines) == 3
  assert not any("QA attack" in s for s in lines)


def test_reproduce_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match=r"methods must be a non-empty subset.*'pgd'"):
    reproduce.run(datasets=["mnist"], archs=["small"], methods=["pgd"], root=str(tmp_path))
  with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
    reproduce.cell_config("mnist", "small", "tbt", None, "cpu", str(tmp_path),
                          {"train.nope": 1})
  r = subprocess.run([sys.executable, "reproduce.py", "--datasets=svhn",
                      f"--root={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0 and "datasets must be a non-empty subset" in r.stderr
  assert not os.listdir(tmp_path)
