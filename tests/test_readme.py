"""The README's Python example runs and its claims hold."""

import os
import re

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_api_example():
  text = open(os.path.join(ROOT, "README.md")).read()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  ns: dict = {}
  exec(compile(code, "README.md", "exec"), ns)
  qbox, q, embed = ns["qbox"], ns["q"], ns["embed"]
  y = embed(q)
  assert bool(jnp.all((qbox.lower <= y + 1e-5) & (y <= qbox.upper + 1e-5)))
  qa, ok, rank = ns["qa"], ns["ok"], ns["rank"]
  assert qa.lower.shape == qa.upper.shape == ok.shape == rank.shape == (4, 6)
  assert bool(jnp.all((qa.lower <= rank) & (rank <= qa.upper)))


def test_readme_smoothing_example():
  text = open(os.path.join(ROOT, "README.md")).read()
  code = re.findall(r"```python\n(.*?)```", text, re.S)[1]
  ns: dict = {}
  exec(compile(code, "README.md", "exec"), ns)
  cert = ns["cert"]
  paper, hs = cert["paper_radius"], cert["halfspace_radius"]
  assert paper.shape == (4,) and hs.shape == (4, 2)
  assert np.all(hs[:, 1] >= hs[:, 0])
  assert np.all(hs[paper > 0, 0] >= paper[paper > 0])
  assert np.all(paper <= 1.3491 * 0.25)
