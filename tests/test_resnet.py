"""ResNet-18/50 with frozen BatchNorm: shapes, parameter counts, batch
independence, torchvision weight files, trainable masks, gradients and IBP."""

import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcert import interval, models, resnet

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "scripts", "convert_torchvision_resnet.py")


def _randomize_bn(model, seed):
  """Non-trivial BN affine and statistics, so that BN layers are not identities."""
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)

  def walk(node):
    for v in node.values():
      if isinstance(v, dict) and set(v) == {"scale", "bias", "mean", "var"}:
        n = v["scale"].shape
        v["scale"] = jnp.asarray(1 + 0.1 * rng.standard_normal(n), jnp.float32)
        v["bias"] = jnp.asarray(0.1 * rng.standard_normal(n), jnp.float32)
        v["mean"] = jnp.asarray(0.1 * rng.standard_normal(n), jnp.float32)
        v["var"] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
      elif isinstance(v, dict):
        walk(v)

  walk(pure)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def _images(n, shape=(32, 32, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, *shape)), jnp.float32)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def model18():
  return _randomize_bn(resnet.make_resnet(18, (32, 32, 3), seed=0), seed=1)


@pytest.fixture(scope="module")
def pure18(model18):
  graphdef, params = models.split(model18)
  return graphdef, params, jax.jit(models.apply_fn(graphdef))


def test_output_shape_and_unit_norm(pure18):
  _, params, apply = pure18
  out = apply(params, _images(2))
  assert out.shape == (2, 128)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), [1.0, 1.0], atol=1e-5)


def test_greyscale_equals_replicated_rgb():
  grey = resnet.make_resnet(18, (28, 28, 1), embed_dim=16, seed=3)
  rgb = resnet.make_resnet(18, (28, 28, 3), embed_dim=16, seed=3)
  assert grey.small_input and rgb.small_input  # auto: H <= 64
  x = _images(1, (28, 28, 1))
  out = grey(x)
  assert out.shape == (1, 16)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), [1.0], atol=1e-5)
  np.testing.assert_allclose(out, rgb(jnp.repeat(x, 3, axis=-1)), atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\].*x.shape=\(1, 28, 28, 3\)"):
    grey(jnp.zeros((1, 28, 28, 3)))


def test_param_counts_match_torchvision():
  # torchvision resnet50: 25,557,032 params; fc 2048*1000 + 1000 = 2,049,000.
  # resnet18: 11,689,512; fc 512*1000 + 1000 = 513,000. (BN running stats are
  # buffers there, not parameters.)
  expected = {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}
  assert expected == {18: 11_176_512, 50: 23_508_032}
  for depth, feat in ((18, 512), (50, 2048)):
    abstract = nnx.eval_shape(lambda d=depth: resnet.make_resnet(d, (224, 224, 3)))
    assert not abstract.small_input and abstract.feature_dim == feat
    params = nnx.state(abstract, nnx.Param)
    head = _count(params["head"])
    assert head == feat * 128 + 128
    assert _count(params) - head == expected[depth]
    # The pure dict (models.split) also carries the BN statistics: mean + var.
    graphdef, pure = models.split(abstract)
    stats = _count(nnx.state(abstract, resnet.BNStat))
    bn_affine = _count(jax.tree.map(lambda p, t: p if t else None, pure,
                                    resnet.trainable_mask(pure, freeze_bn=False)))
    assert _count(pure) == _count(params) + stats == bn_affine + stats
    if depth == 50:
      out = jax.eval_shape(models.apply_fn(graphdef), pure,
                           jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
      assert out.shape == (2, 128)


def test_frozen_bn_batch_independence(pure18):
  _, params, apply = pure18
  x = _images(8, seed=5)
  batch = apply(params, x)
  single = apply(params, x[3:4])
  np.testing.assert_allclose(single[0], batch[3], atol=1e-6)


def test_frozen_bn_hand_value():
  bn = resnet.FrozenBatchNorm(3)
  scale, bias = np.array([2.0, -1.0, 0.5]), np.array([0.1, 0.2, -0.3])
  mean, var = np.array([0.5, -1.0, 2.0]), np.array([4.0, 0.25, 1.0])
  bn.scale[...], bn.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
  bn.mean[...], bn.var[...] = jnp.asarray(mean), jnp.asarray(var)
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  expect = scale * (x - mean) / np.sqrt(var + 1e-5) + bias
  np.testing.assert_allclose(bn(jnp.asarray(x)), expect, rtol=1e-5, atol=1e-6)
  # e.g. channel 0, x = 2.5: 2 * 2 / sqrt(4.00001) + 0.1 = 2.0999994...
  np.testing.assert_allclose(bn(jnp.full((1, 3), 2.5))[0, 0], 2.1, atol=1e-5)
  assert isinstance(nnx.split(bn, nnx.Param, resnet.BNStat)[2]["mean"], resnet.BNStat)


def test_export_load_round_trip(model18, pure18, tmp_path):
  path = str(tmp_path / "w.npz")
  keys = resnet.export_torchvision_npz(model18, path)
  with np.load(path) as f:
    assert f["conv1.weight"].shape == (64, 3, 3, 3)  # small-input stem, OIHW
    assert f["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert f["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert f["layer2.0.downsample.1.running_var"].shape == (128,)
    assert f["head.weight"].shape == (128, 512)
    # 20 convs (stem, 16 in blocks, 3 projections), 20 BNs x 4 arrays, the head.
    assert len(f.files) == len(keys) == 20 + 20 * 4 + 2
  other = resnet.make_resnet(18, (32, 32, 3), seed=7)
  x = _images(2, seed=2)
  _, params, apply = pure18
  assert not np.allclose(other(x), apply(params, x), atol=1e-3)
  assert resnet.load_pretrained(other, path) == []
  np.testing.assert_allclose(other(x), apply(params, x), atol=1e-6)

  # Without the head (an ImageNet file): the backbone loads, the head stays at init.
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files if not k.startswith("head.")}
  arrays["fc.weight"] = np.zeros((1000, 512), np.float32)  # ignored
  arrays["layer1.0.bn1.num_batches_tracked"] = np.array(5)  # ignored
  np.savez(tmp_path / "nohead.npz", **arrays)
  fresh = resnet.make_resnet(18, (32, 32, 3), seed=7)
  head_before = np.asarray(fresh.head.kernel[...])
  assert resnet.load_pretrained(fresh, tmp_path / "nohead.npz") == [
      "head.bias", "head.weight"]
  np.testing.assert_array_equal(fresh.head.kernel[...], head_before)
  np.testing.assert_allclose(fresh.features(x), model18.features(x), atol=1e-6)

  # A 7x7 ImageNet stem does not fit the 3x3 small-input stem: left at init.
  arrays["conv1.weight"] = np.ones((64, 3, 7, 7), np.float32)
  np.savez(tmp_path / "stem7.npz", **arrays)
  assert "conv1.weight" in resnet.load_pretrained(fresh, tmp_path / "stem7.npz")


def test_load_pretrained_errors(model18, tmp_path):
  good = str(tmp_path / "good.npz")
  resnet.export_torchvision_npz(model18, good)
  with np.load(good) as f:
    arrays = {k: f[k] for k in f.files}
  target = resnet.make_resnet(18, (32, 32, 3), seed=9)
  before = jax.tree.map(np.asarray, models.split(target)[1])

  missing = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    resnet.load_pretrained(target, missing)

  (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
  with pytest.raises(ValueError, match=r"corrupt\.npz.*not a valid \.npz"):
    resnet.load_pretrained(target, tmp_path / "corrupt.npz")
  (tmp_path / "text.npz").write_bytes(b"hello")
  with pytest.raises(ValueError, match="not a valid .npz"):
    resnet.load_pretrained(target, tmp_path / "text.npz")

  drop = dict(arrays)
  del drop["layer3.1.bn2.running_var"]
  np.savez(tmp_path / "drop.npz", **drop)
  with pytest.raises(ValueError, match=r"lacks 1 key.*layer3\.1\.bn2\.running_var"):
    resnet.load_pretrained(target, tmp_path / "drop.npz")

  bad = dict(arrays, **{"layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)})
  np.savez(tmp_path / "shape.npz", **bad)
  with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight'.*expected "
                     r"\(64, 64, 3, 3\), got \(64, 64, 1, 1\)"):
    resnet.load_pretrained(target, tmp_path / "shape.npz")

  extra = dict(arrays, **{"layer1.0.conv3.weight": np.zeros((256, 64, 1, 1), np.float32)})
  np.savez(tmp_path / "extra.npz", **extra)
  with pytest.raises(ValueError, match=r"does not have.*layer1\.0\.conv3\.weight"):
    resnet.load_pretrained(target, tmp_path / "extra.npz")

  # ResNet-18 weights into a ResNet-50 (abstract: no need to allocate it).
  abstract50 = nnx.eval_shape(lambda: resnet.make_resnet(50, (224, 224, 3)))
  with pytest.raises(ValueError, match="holds ResNet-18 weights, the model is ResNet-50"):
    resnet.load_pretrained(abstract50, good)

  # No failed load touched the model.
  after = models.split(target)[1]
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_trainable_mask_and_frozen_optimizer(pure18):
  _, params, _ = pure18
  mask = resnet.trainable_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert mask["bn1"] == {"scale": True, "bias": True, "mean": False, "var": False}
  assert mask["layer2"][0]["downsample"][1]["var"] is False
  assert mask["layer2"][0]["downsample"][0]["kernel"] is True
  assert mask["head"] == {"kernel": True, "bias": True}
  # ResNet-18: 1 stem BN + 8 blocks * 2 + 3 projection BNs = 20 BN layers.
  assert sum(not t for t in jax.tree.leaves(mask)) == 2 * 20
  frozen = resnet.trainable_mask(params, freeze_bn=True)
  assert frozen["layer4"][1]["bn2"] == dict.fromkeys(("scale", "bias", "mean", "var"),
                                                     False)
  assert sum(not t for t in jax.tree.leaves(frozen)) == 4 * 20

  # AdamW's weight decay would move the statistics; the wrapper keeps them.
  grads = jax.tree.map(jnp.ones_like, params)
  for freeze_bn in (False, True):
    tx = resnet.frozen_bn_optimizer(optax.adamw(1e-2, weight_decay=0.5), params,
                                    freeze_bn=freeze_bn)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == resnet.trainable_mask(params, freeze_bn=freeze_bn)


def test_gradient_finite_and_nonzero(pure18):
  graphdef, params, _ = pure18
  apply = models.apply_fn(graphdef)
  x = _images(2, seed=4)
  target = jnp.asarray(np.random.default_rng(1).standard_normal((2, 128)), jnp.float32)
  grad_fn = jax.jit(jax.grad(lambda p, x, t: jnp.sum(apply(p, x) * t)))
  grads = grad_fn(params, x, target)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for path in (("conv1", "kernel"), ("layer1", 0, "bn1", "scale"),
               ("layer4", 1, "conv2", "kernel"), ("head", "kernel")):
    g = grads
    for k in path:
      g = g[k]
    assert float(jnp.linalg.norm(g)) > 0, path
  # Statistics get exactly zero gradient (stop_gradient).
  stats = jax.tree.map(lambda g, t: None if t else g, grads, resnet.trainable_mask(grads))
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(stats))
  # Safe L2 normalisation: an all-zero embedding still has a finite gradient.
  zero_head = dict(params, head=jax.tree.map(jnp.zeros_like, params["head"]))
  grads0 = grad_fn(zero_head, x, target)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads0))
  assert float(jnp.linalg.norm(grads0["head"]["kernel"])) > 0


@pytest.mark.parametrize("small_input", [True, False])
def test_ibp_sound_on_resnet18(small_input):
  model = _randomize_bn(resnet.make_resnet(18, (32, 32, 3), normalize=False,
                                           small_input=small_input, seed=2), seed=3)
  graphdef, params = models.split(model)
  f = lambda z: models.apply_fn(graphdef)(params, z)
  x = _images(1, seed=6)
  eps = 1e-4
  box = interval.ibp(f)(interval.input_box(x, eps))
  assert box.shape == (1, 128)
  rng = np.random.default_rng(0)
  for z in (x, jnp.clip(x + eps * jnp.sign(rng.standard_normal(x.shape)), 0, 1)):
    y = f(z.astype(jnp.float32))
    assert bool(jnp.all(box.lower <= y)) and bool(jnp.all(y <= box.upper))


def test_argument_errors():
  with pytest.raises(ValueError, match=r"depth must be one of \(18, 50\), got depth=34"):
    resnet.make_resnet(34, (32, 32, 3))
  with pytest.raises(ValueError, match=r"C in \(1, 3\).*input_shape=\(32, 32, 2\)"):
    resnet.make_resnet(18, (32, 32, 2))
  with pytest.raises(ValueError, match=r"input_shape must be \(H, W, C\)"):
    resnet.make_resnet(18, (32, 32))
  with pytest.raises(ValueError, match="embed_dim must be an integer >= 1, got "
                     "embed_dim=0"):
    resnet.make_resnet(18, (32, 32, 3), embed_dim=0)
  with pytest.raises(ValueError, match=r"std must be > 0.*std=\(0.2, 0.0, 0.2\)"):
    resnet.make_resnet(18, (32, 32, 3), std=(0.2, 0.0, 0.2))
  with pytest.raises(ValueError, match="small_input must be True, False or None"):
    resnet.make_resnet(18, (32, 32, 3), small_input=1)
  with pytest.raises(ValueError, match="nested dict"):
    resnet.trainable_mask([1, 2])


def _load_script():
  spec = importlib.util.spec_from_file_location("convert_torchvision_resnet", _SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_convert_script(model18, tmp_path, monkeypatch):
  script = _load_script()
  src = str(tmp_path / "src.npz")
  resnet.export_torchvision_npz(model18, src)
  with np.load(src) as f:
    state_dict = {"module." + k: f[k] for k in f.files}
  state_dict["module.bn1.num_batches_tracked"] = np.array(3)
  pth = tmp_path / "resnet.pth"
  pth.write_bytes(b"stand-in for a torch file")

  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
  with pytest.raises(SystemExit, match="needs PyTorch.*pip install torch"):
    script.main([str(pth), str(tmp_path / "out.npz")])

  fake_torch = types.SimpleNamespace(
      load=lambda path, map_location, weights_only: {"state_dict": state_dict})
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  script.main([str(pth), str(tmp_path / "out.npz")])
  with np.load(tmp_path / "out.npz") as f:
    assert "bn1.num_batches_tracked" not in f.files
    assert f["conv1.weight"].shape == (64, 3, 3, 3)
  target = resnet.make_resnet(18, (32, 32, 3), seed=11)
  assert resnet.load_pretrained(target, tmp_path / "out.npz") == []
  x = _images(1, seed=8)
  np.testing.assert_allclose(target(x), model18(x), atol=1e-6)
