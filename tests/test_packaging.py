"""Packaging: the wheel, its metadata and entry points, bundled configs by name.

The wheel is built offline from a copy of the sources (nothing is written into the
checkout), installed with ``pip install --target`` and run from a directory outside the
repository with only that target on PYTHONPATH, so the checkout cannot be imported.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from jaxcert import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"jaxcert-train": "jaxcert.cli:train_main",
           "jaxcert-certify": "jaxcert.cli:certify_main",
           "jaxcert-reproduce": "jaxcert.cli:reproduce_main"}


def _version_in_source() -> str:
  text = open(os.path.join(ROOT, "jaxcert", "__init__.py")).read()
  return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _source_modules() -> set[str]:
  found = set()
  for folder, dirs, files in os.walk(os.path.join(ROOT, "jaxcert")):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    rel = os.path.relpath(folder, ROOT)
    found |= {f"{rel}/{f}".replace(os.sep, "/") for f in files if f.endswith(".py")}
  return found


def _pip(*args, cwd):
  env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
  r = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """Builds the wheel from a copy of pyproject.toml, README.md and jaxcert/ (offline)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  shutil.copytree(os.path.join(ROOT, "jaxcert"), src / "jaxcert",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src),
       cwd=tmp)
  (path,) = (tmp / "dist").glob("*.whl")
  return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
  """``pip install --no-deps --target``; returns (target, a cwd outside the repository)."""
  tmp = tmp_path_factory.mktemp("installed")
  target, cwd = tmp / "site", tmp / "elsewhere"
  cwd.mkdir()
  _pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=tmp)
  return target, cwd


def _run(installed, *args, timeout=120):
  target, cwd = installed
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(target)
  return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _requirements(section: str) -> dict[str, str]:
  """requirements.txt lines of a section ("runtime" or "tests") as {name: specifier}."""
  out: dict[str, dict[str, str]] = {"runtime": {}, "tests": {}}
  current = "runtime"
  for raw in open(os.path.join(ROOT, "requirements.txt")):
    line = raw.strip()
    if line.startswith("# tests"):
      current = "tests"
    line = line.split("#", 1)[0].strip()
    if line:
      name, spec = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(.*)", line).groups()
      out[current][_canonical(name)] = _spec(spec)
  return out[section]


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _spec(text: str) -> str:
  return ",".join(sorted(p.strip().replace(" ", "") for p in text.split(",") if p.strip()))


def _metadata(wheel) -> tuple[str, dict[str, str], dict[str, str]]:
  """(version, runtime requirements, extra "test" requirements) from the wheel's METADATA."""
  with zipfile.ZipFile(wheel) as z:
    text = z.read(f"jaxcert-{_version_in_source()}.dist-info/METADATA").decode()
  version = re.search(r"^Version: (.+)$", text, re.M).group(1).strip()
  runtime, test = {}, {}
  for req in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
    req, _, marker = req.partition(";")
    name, spec = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(.*)", req.strip()).groups()
    spec = spec.strip().strip("()")
    if not marker:
      runtime[_canonical(name)] = _spec(spec)
    elif re.search(r"""extra\s*==\s*["']test["']""", marker):
      test[_canonical(name)] = _spec(spec)
    else:
      raise AssertionError(f"unexpected requirement marker in METADATA: {req};{marker}")
  return version, runtime, test


def test_wheel_holds_every_module_the_configs_and_the_entry_points(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    version = _version_in_source()
    entry_points = z.read(f"jaxcert-{version}.dist-info/entry_points.txt").decode()
  assert wheel.name == f"jaxcert-{version}-py3-none-any.whl"
  modules = _source_modules()
  assert len(modules) >= 30 and "jaxcert/cli.py" in modules
  assert modules <= names, sorted(modules - names)
  assert {f"jaxcert/configs/{n}.py" for n in configs.BUNDLED} <= names
  # nothing but the package: no tests, scripts or the checkout's configs/ shims
  assert {n.split("/")[0] for n in names} == {"jaxcert", f"jaxcert-{version}.dist-info"}
  scripts = dict(re.findall(r"^(\S+) = (\S+)$", entry_points.split("[console_scripts]")[1],
                            re.M))
  assert scripts == SCRIPTS


def test_dependencies_match_requirements_txt(wheel):
  version, runtime, test = _metadata(wheel)
  assert version == _version_in_source() == "0.5.0"
  assert runtime == _requirements("runtime")
  assert runtime["jax"] == "<0.11,>=0.7.0" and runtime["ml-collections"] == ">=1.0.0"
  assert len(runtime) >= 14 and not {"pytest", "ruff"} & set(runtime)
  assert test == _requirements("tests")
  assert {"pytest", "ruff", "setuptools"} <= set(test)


def test_installed_package_imports_and_resolves_bundled_configs(installed):
  target, _ = installed
  code = ("import jaxcert, os; from jaxcert import configs; "
          "print(jaxcert.__version__); print(jaxcert.__file__); "
          "print(configs.path('cbir')); "
          "print(configs.get_config('cbir:mnist,small,act,cpu').train.num_steps); "
          "print(configs.get_config('smoothing:dml,0.5').smoothing.sigma); "
          "print(callable(jaxcert.train), callable(jaxcert.certify))")
  r = _run(installed, sys.executable, "-c", code)
  assert r.returncode == 0, r.stderr
  version, init, cbir, steps, sigma, callables = r.stdout.split("\n")[:6]
  assert version == "0.5.0"
  assert init == str(target / "jaxcert" / "__init__.py")   # the install, not the checkout
  assert cbir == str(target / "jaxcert" / "configs" / "cbir.py") and os.path.isfile(cbir)
  assert (int(steps), float(sigma)) == (6_000, 0.5)
  assert callables == "True True"


def test_installed_entry_points(installed):
  target, cwd = installed
  bin_dir = target / "bin"
  assert {p.name for p in bin_dir.iterdir()} >= set(SCRIPTS)

  r = _run(installed, sys.executable, "-m", "jaxcert.train", "--help")
  assert r.returncode == 0, r.stderr
  assert "Trains a feature extractor" in r.stdout
  assert "--config: Config: NAME[:ARG]" in r.stdout and "(default: 'quickstart')" in r.stdout
  assert "--workdir" in r.stdout

  r = _run(installed, str(bin_dir / "jaxcert-reproduce"), "--help")
  assert r.returncode == 0, r.stderr
  assert "Tables 1 and 2" in r.stdout and "--budget" in r.stdout

  # a bundled config by name, with its argument: the installed file runs (and rejects
  # the method), before any data is read or the workdir is made
  workdir = cwd / "run"
  r = _run(installed, str(bin_dir / "jaxcert-train"), "--config=cbir:mnist,small,nope",
           f"--workdir={workdir}")
  assert r.returncode == 1
  assert str(target / "jaxcert" / "configs" / "cbir.py") in r.stderr
  assert "METHOD must be one of ('triplet', 'act', 'cibp', 'tbt', 'fctb'), got 'nope'" in r.stderr
  # the checkout's path spelling names the same bundled config where no checkout is
  r = _run(installed, sys.executable, "-m", "jaxcert.train",
           "--config=configs/smoothing.py:dml,0.5", "--config.train.method=nope",
           f"--workdir={workdir}")
  assert r.returncode == 1
  assert "error: config.train.method must be one of" in r.stderr and "'nope'" in r.stderr
  assert not workdir.exists()

  r = _run(installed, str(bin_dir / "jaxcert-certify"), f"--workdir={workdir}",
           "--config.certify.no_such_key=1")
  assert r.returncode == 1
  assert "unknown config key 'certify.no_such_key'" in r.stderr and "audit_pool" in r.stderr


def test_config_names_and_paths_resolve(tmp_path, monkeypatch):
  cbir = configs.path("cbir")
  assert os.path.isfile(cbir) and cbir.endswith(os.path.join("jaxcert", "configs", "cbir.py"))
  monkeypatch.chdir(tmp_path)   # no configs/ here
  for spec in ("cbir:mnist,small,tbt", "cbir.py:mnist,small,tbt",
               "configs/cbir.py:mnist,small,tbt", "./configs/cbir.py:mnist,small,tbt"):
    assert configs.resolve(spec) == cbir + ":mnist,small,tbt", spec
  assert configs.resolve("quickstart") == configs.path("quickstart")
  own = tmp_path / "mine.py"
  own.write_text("def get_config(arg):\n  return arg\n")
  assert configs.resolve(f"{own}:x") == f"{own}:x"
  (tmp_path / "cbir.py").write_text("")
  assert configs.resolve("cbir.py:x") == "cbir.py:x"   # an existing file wins
  monkeypatch.chdir(ROOT)
  assert configs.resolve("configs/cbir.py:x") == "configs/cbir.py:x"   # the checkout's
  for bad in ("nosuch:abc", "other/cbir.py:x", "configs/nosuch.py"):
    with pytest.raises(ValueError, match=r"is neither a file nor a bundled config.*"
                       r"cbir, quickstart, smoothing"):
      configs.resolve(bad)
  with pytest.raises(ValueError, match=r"config ':x': expected NAME\[:ARG\]"):
    configs.resolve(":x")
  with pytest.raises(ValueError, match=r"config name 'cbir.py' is not a bundled config"):
    configs.get_config("cbir.py:mnist,small,tbt")


def test_bundled_configs_match_the_checkout_files():
  for spec in ("quickstart", "quickstart:triplet", "cbir:cifar10,large,fctb,3/255,cpu",
               "smoothing", "smoothing:dml,0.5"):
    name, _, arg = spec.partition(":")
    path = os.path.join(ROOT, "configs", f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"checkout_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    from_file = module.get_config(arg) if arg else module.get_config()
    assert from_file.to_dict() == configs.get_config(spec).to_dict(), spec
  c = configs.get_config("quickstart:triplet")
  assert (c.train.method, c.train.num_steps, c.model.arch) == ("triplet", 3_000, "small")
  assert configs.get_config("cbir:cifar10,large,fctb,3/255,cpu").certify.eps == \
      pytest.approx(3 / 255)
  with pytest.raises(ValueError, match=r"SIGMA must be a positive number, got 'x'"):
    configs.get_config("smoothing:gdml,x")
  with pytest.raises(ValueError, match=r"SIGMA must be a positive number, got -0.5"):
    configs.get_config("smoothing:gdml,-0.5")


def test_program_modules_do_not_shadow_the_api_functions():
  import importlib

  import jaxcert
  from jaxcert import certification, cli, training
  assert cli.train_main and jaxcert.train is training.train
  for name, function in (("train", training.train), ("certify", certification.certify)):
    with pytest.raises(ImportError, match=rf"`python -m jaxcert.{name}` program"):
      importlib.import_module(f"jaxcert.{name}")
    assert getattr(jaxcert, name) is function
