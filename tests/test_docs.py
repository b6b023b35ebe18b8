"""The generated config reference is current, and the docs the README links exist."""

import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location(
      "config_reference", os.path.join(ROOT, "scripts", "config_reference.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_config_reference_is_current_and_complete():
  mod = _script()
  text = mod.render()
  with open(os.path.join(ROOT, "docs", "CONFIG.md")) as f:
    assert f.read() == text, "docs/CONFIG.md is stale: run python scripts/config_reference.py"
  from jaxcert.config import base_config
  cfg = base_config()
  for sec, node in cfg.items():
    keys = [f"{sec}.{k}" for k in node] if hasattr(node, "items") else [sec]
    for key in keys:
      assert f"| `{key}` |" in text, key
  # A key's comment reaches the table (escaped pipes included).
  assert "ibp \\| crown_ibp \\| crown" in text


def test_readme_links_resolve():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  links = re.findall(r"\]\(((?:docs|notebooks)/[^)#]*)\)", readme)
  assert len(links) >= 8
  for link in links:
    assert os.path.exists(os.path.join(ROOT, link)), link
