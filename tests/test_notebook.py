"""notebooks/quickstart.ipynb: stored clean, and runs top to bottom in a fresh kernel.

The run injects a parameters cell (papermill-style) with mock tfds data, no installs,
a tiny config and a work directory in tmp_path, and executes the notebook with nbclient
in a kernel whose kernelspec points at this interpreter (sys.executable).
"""

from __future__ import annotations

import base64
import json
import math
import os
import sys

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOK_DIR, "quickstart.ipynb")
KERNEL = "jaxcert-notebook-test"

TINY_QUICKSTART = {
    "model.embed_dim": 16,
    "train.num_steps": 6,
    "train.batch_size": 8,
    "train.lr_decay_steps": (4,),
    "train.ramp_start": 1,
    "train.ramp_end": 3,
    "train.log_every": 2,
    "train.checkpoint_every": 3,
    "data.num_queries": 12,
    "data.num_candidates": 20,
    "certify.ks": (1, 5, 10),
    "certify.batch_size": 8,
    "certify.attack_steps": 3,
    "certify.ca_sources": 3,
    "certify.audit_pool": 5,
}
TINY_SMOOTHING = {
    "model.embed_dim": 8,
    "train.num_steps": 4,
    "train.batch_size": 12,
    "train.classes_per_batch": 3,
    "train.lr_decay_steps": (2,),
    "train.log_every": 2,
    "train.checkpoint_every": 2,
    "data.num_queries": 10,
    "data.num_candidates": 30,
    "smoothing.num_samples": 64,
    "smoothing.chunk_size": 32,
    "smoothing.batch_images": 2,
    "smoothing.ks": (1, 3),
    "smoothing.num_radii": 5,
}


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"want exactly one cell tagged 'parameters', got {tagged}"
  assert nb.cells[tagged[0]].cell_type == "code"
  return tagged[0]


def _defaults(nb) -> dict:
  namespace: dict = {}
  exec(nb.cells[_parameters_index(nb)].source, namespace)  # literals only
  return {k: v for k, v in namespace.items() if not k.startswith("__")}


def _outputs(nb, output_type: str | None = None):
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if output_type is None or out.output_type == output_type:
        yield out


def test_notebook_is_stored_clean():
  nb = _read()
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown" and "quickstart" in nb.cells[0].source
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"cell {i} is stored with outputs"
      assert cell.execution_count is None, f"cell {i} is stored with an execution count"
  defaults = _defaults(nb)
  assert defaults["MOCK_DATA"] is False and defaults["INSTALL"] is True
  assert defaults["QUICKSTART_OVERRIDES"] == {} and defaults["METHOD"] == "tbt"
  assert isinstance(defaults["WORKDIR"], str) and isinstance(defaults["REPO_URL"], str)


def _setup_helpers(nb) -> dict:
  """The function definitions of the set-up cell (the part before it acts)."""
  cells = [c for c in nb.cells if "def runtime_requirements" in c.source]
  assert len(cells) == 1
  definitions, marker, _ = cells[0].source.partition("\nlocated = find_jaxcert()")
  assert marker, "the set-up cell no longer starts acting at `located = find_jaxcert()`"
  namespace: dict = {}
  exec(definitions, namespace)
  return namespace


def test_setup_installs_the_runtime_part_and_finds_the_checkout(tmp_path, monkeypatch):
  helpers = _setup_helpers(_read())
  specs = helpers["runtime_requirements"](os.path.join(ROOT, "requirements.txt"))
  names = [s.split(">")[0].split("<")[0].split("=")[0].strip().lower() for s in specs]
  for needed in ("jax", "flax", "tensorflow-datasets", "ml-collections", "matplotlib"):
    assert needed in names, (needed, specs)
  for test_only in ("pytest", "nbclient", "nbformat", "ipykernel"):  # Colab keeps its own
    assert test_only not in names, (test_only, specs)
  assert all("#" not in s and " " not in s for s in specs), specs
  assert helpers["is_checkout"](ROOT) and not helpers["is_checkout"](str(tmp_path))
  monkeypatch.chdir(tmp_path)  # jaxcert is importable here, so its checkout is found
  assert helpers["find_jaxcert"]() == ("checkout", ROOT)


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """A kernelspec in tmp_path that runs this interpreter; found through JUPYTER_PATH."""
  prefix = tmp_path / "jupyter"
  install_kernelspec(kernel_name=KERNEL, prefix=str(prefix))
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  spec = KernelSpecManager().get_kernel_spec(KERNEL)
  assert spec.argv[0] == sys.executable
  return KERNEL


def test_notebook_runs_headless_on_mock_data(tmp_path, kernel):
  nb = _read()
  params = {"MOCK_DATA": True, "INSTALL": False, "REPO_URL": "",
            "WORKDIR": str(tmp_path / "runs"), "QUICKSTART_OVERRIDES": TINY_QUICKSTART,
            "RUN_SMOOTHING": True, "SMOOTHING_OVERRIDES": TINY_SMOOTHING}
  assert set(params) <= set(_defaults(nb)), "injecting a name the notebook does not define"
  source = "# Parameters injected by tests/test_notebook.py\n" + "\n".join(
      f"{k} = {v!r}" for k, v in params.items())
  injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(_parameters_index(nb) + 1, injected)
  before = sorted(os.listdir(NOTEBOOK_DIR))

  client = NotebookClient(nb, kernel_name=kernel, timeout=240, startup_timeout=60,
                          resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError naming the cell on any error

  assert not list(_outputs(nb, "error"))
  assert sorted(os.listdir(NOTEBOOK_DIR)) == before  # writes only under WORKDIR
  text = "".join(o.text for o in _outputs(nb, "stream"))
  assert f"python: {sys.executable}" in text
  assert f"jaxcert: checkout {ROOT}\n" in text  # found as ../ from notebooks/

  # IBP certificates: results.json of the tiny TBT run
  out = tmp_path / "runs" / "quickstart_tbt" / "certify"
  saved = json.loads((out / "results.json").read_text())
  assert saved["checkpoint_step"] == 6 and saved["method"] == "tbt"
  assert saved["num_queries"] == 12 and saved["num_candidates"] == 20
  assert saved["ks"] == [1, 5, 10]
  m = saved["metrics"]
  for k in ("1", "5", "10"):
    for key in ("recall", "cr_recall_qa", "cr_recall_ca"):
      assert math.isfinite(m[key][k]) and 0.0 <= m[key][k] <= 1.0, (key, k, m[key][k])
    assert m["cr_recall_qa"][k] <= m["recall"][k]
    assert m["cr_recall_ca"][k] <= m["recall"][k]
  assert saved["attack"]["qa_audit"]["broken"] == 0
  assert saved["attack"]["ca_audit"]["broken"] == 0
  assert f"Recall@1 = {m['recall']['1']:.3f}, Recall@10 = {m['recall']['10']:.3f}" in text

  # displayed: both Markdown tables as written, both PNGs byte for byte
  shown = list(_outputs(nb, "display_data"))
  markdown = [o.data["text/markdown"] for o in shown if "text/markdown" in o.data]
  pngs = [base64.b64decode(o.data["image/png"]) for o in shown if "image/png" in o.data]
  assert (out / "results.md").read_text() in markdown
  assert "| Recall@K | 1 | 5 | 10 |" in markdown[0]
  assert (out / "cr_recall.png").read_bytes() in pngs

  # randomized smoothing section
  sm_out = tmp_path / "runs" / "smoothing_gdml" / "certify_smoothing"
  sm = json.loads((sm_out / "results.json").read_text())
  assert sm["checkpoint_step"] == 4 and sm["num_samples"] == 64 and sm["num_queries"] == 10
  assert 0.0 <= sm["metrics"]["rejected_ratio"] <= sm["metrics"]["smoothed_recall_at_1"] <= 1
  assert (sm_out / "results.md").read_text() in markdown
  assert (sm_out / "certified_recall.png").read_bytes() in pngs
  assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
