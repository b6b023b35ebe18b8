"""ruff: the repository is clean under pyproject.toml's rules, and those rules are live.

Only ``ruff check`` (E, F, W, I, B): formatting is kept by hand, so no ``ruff format``.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args, stdin=None):
  return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args],
                        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean():
  r = _ruff("--output-format=concise", ".")
  assert r.returncode == 0, r.stdout + r.stderr


def test_project_rules_apply():
  """A snippet in the project's style passes; each selected rule family still fires."""
  good = ('"""Doc."""\n\nimport os\n\nimport numpy as np\n\nfrom jaxcert import grid\n\n\n'
          'def f(x):\n  if x:\n    return os.sep, np.pi, grid.DATASETS\n'
          '  g = lambda y: y   # E731 is off: JAX names one-line lambdas\n'
          '  return g(x) + "' + "x" * 60 + '"\n')
  r = _ruff("--stdin-filename=jaxcert/_probe.py", "-", stdin=good)
  assert r.returncode == 0, r.stdout + r.stderr

  bad = ('import sys\nimport os\n'            # I001 unsorted, F401 unused sys
         'def f(a, b):\n'
         '  l = 1 \n'                         # W291 trailing space, E741 ambiguous name
         '  return [x for x in zip(a, b)], l, os.sep, "' + "y" * 90 + '"\n')  # B905, E501
  r = _ruff("--output-format=concise", "--stdin-filename=jaxcert/_probe.py", "-", stdin=bad)
  assert r.returncode == 1
  found = {line.split(" ")[1] for line in r.stdout.splitlines() if ": " in line and
           line.startswith("jaxcert/_probe.py:")}
  assert {"I001", "F401", "W291", "E741", "B905", "E501"} <= found, r.stdout
