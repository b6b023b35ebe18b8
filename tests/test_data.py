"""jaxcert.data: offline tfds builders, mock_data, splits. No network, no TF."""

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxcert import data

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array, magic, gz=True):
  array = np.asarray(array, np.uint8)
  raw = struct.pack(">i", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  raw += array.tobytes()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(raw)
  return str(path)


def synthetic_idx_dir(root, n_train=50, n_test=30, gz=True, seed=0):
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  ext = ".gz" if gz else ""
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, 2051, gz)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, 2049, gz)
    out[split] = (images, labels)
  return out


def synthetic_cifar_dir(root, per_batch=4, n_test=6, seed=0):
  d = root / "cifar-10-batches-py"
  d.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  out = {"train": ([], []), "test": ([], [])}
  for name, n, split in [(f"data_batch_{i}", per_batch, "train") for i in range(1, 6)] + [
      ("test_batch", n_test, "test")]:
    flat = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, n)]
    with open(d / name, "wb") as f:  # like the original: protocol 2, bytes keys
      pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": flat,
                   b"filenames": [b"x.png"] * n}, f, protocol=2)
    out[split][0].append(flat.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    out[split][1].extend(labels)
  return {s: (np.concatenate(im), np.array(lb)) for s, (im, lb) in out.items()}


@pytest.fixture
def download_spy(monkeypatch):
  """Records step-3 calls and runs the real hook (a no-op under mock_data)."""
  calls, real = [], data._stock_download_and_prepare

  def spy(builder):
    calls.append(builder.name)
    return real(builder)

  monkeypatch.setattr(data, "_stock_download_and_prepare", spy)
  return calls


@pytest.fixture
def no_download(monkeypatch):
  """Step 3 (stock download) fails deterministically, without any network."""
  calls = []

  def fail(builder):
    calls.append(builder.name)
    raise RuntimeError("download disabled in tests")

  monkeypatch.setattr(data, "_stock_download_and_prepare", fail)
  return calls


# ------------------------------------------------------------ offline builder


@pytest.mark.parametrize("name,gz", [("fashion_mnist", True), ("mnist", False)])
def test_offline_idx_roundtrip(tmp_path, no_download, name, gz):
  src = synthetic_idx_dir(tmp_path / "src", gz=gz)
  data_dir = tmp_path / "tfds"
  for split, n in (("train", 50), ("test", 30)):
    s = data.load(name, split, data_dir=str(data_dir), source_dir=str(tmp_path / "src"))
    assert s.images.shape == (n, 28, 28, 1) and s.images.dtype == np.uint8
    assert s.labels.shape == (n,) and s.labels.dtype == np.int32
    np.testing.assert_array_equal(s.images[..., 0], src[split][0])  # same order
    np.testing.assert_array_equal(s.labels, src[split][1])
    assert len(s) == n
  assert (data_dir / f"jaxcert_{name}" / "1.0.0" / "dataset_info.json").is_file()
  assert no_download == []
  # The prepared copy is reused; sources are no longer needed.
  s = data.load(name, "test", data_dir=str(data_dir), source_dir=str(tmp_path / "gone"))
  np.testing.assert_array_equal(s.labels, src["test"][1])
  assert "tensorflow" not in sys.modules


def test_offline_cifar10_roundtrip(tmp_path, no_download):
  src = synthetic_cifar_dir(tmp_path / "src")
  data_dir = str(tmp_path / "tfds")
  for split, n in (("train", 20), ("test", 6)):
    # Either the cifar-10-batches-py dir itself or its parent.
    for sd in (tmp_path / "src", tmp_path / "src" / "cifar-10-batches-py"):
      s = data.load("cifar10", split, data_dir=data_dir, source_dir=str(sd))
      assert s.images.shape == (n, 32, 32, 3) and s.images.dtype == np.uint8
      np.testing.assert_array_equal(s.images, src[split][0])
      np.testing.assert_array_equal(s.labels, src[split][1])
  # pixel (0, 0) of image 0 is bytes 0 (R), 1024 (G), 2048 (B) of its row
  with open(tmp_path / "src" / "cifar-10-batches-py" / "test_batch", "rb") as f:
    row = pickle.load(f, encoding="bytes")[b"data"][0]
  np.testing.assert_array_equal(s.images[0, 0, 0], row[[0, 1024, 2048]])
  assert no_download == []


def test_cifar10_refuses_foreign_pickle(tmp_path, no_download):
  synthetic_cifar_dir(tmp_path / "src")
  with open(tmp_path / "src" / "cifar-10-batches-py" / "test_batch", "wb") as f:
    pickle.dump({b"data": os.system}, f)
  with pytest.raises(data.DataError, match="test_batch"):
    data.load("cifar10", "test", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "src"))


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path, no_download):
  data_dir = str(tmp_path / "tfds")
  test = data.load("fashion_mnist", "test", data_dir=data_dir)  # prepares both splits
  train = data.load("fashion_mnist", "train", data_dir=data_dir)
  assert test.images.shape == (10000, 28, 28, 1) and train.images.shape == (60000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [1000] * 10)
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [6000] * 10)
  images, labels = data.read_source("fashion_mnist", FMNIST_DIR, "test")
  np.testing.assert_array_equal(test.images, images)
  np.testing.assert_array_equal(test.labels, labels)
  assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published t10k order
  assert no_download == []


# ------------------------------------------------------------------- failures


def test_bad_magic_names_file(tmp_path, no_download):
  synthetic_idx_dir(tmp_path / "src")
  bad = write_idx(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz", np.zeros(30), 2051)
  with pytest.raises(data.DataError, match="bad magic number 2051, expected 2049") as e:
    data.load("fashion_mnist", "test", data_dir=str(tmp_path / "tfds"),
              source_dir=str(tmp_path / "src"))
  assert bad in str(e.value)
  assert not (tmp_path / "tfds" / "jaxcert_fashion_mnist" / "1.0.0").exists()
  assert no_download == []  # a corrupt source is an error, not a reason to download


def test_truncated_idx_names_file(tmp_path, no_download):
  synthetic_idx_dir(tmp_path / "src", gz=False)
  path = tmp_path / "src" / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(data.DataError, match="size mismatch") as e:
    data.load("mnist", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path / "src"))
  assert str(path) in str(e.value) and "39200" in str(e.value)


def test_truncated_gzip_names_file(tmp_path):
  synthetic_idx_dir(tmp_path / "src")
  path = tmp_path / "src" / "t10k-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:500])
  with pytest.raises(data.DataError, match="truncated or corrupt") as e:
    data.read_source("fashion_mnist", str(tmp_path / "src"), "test")
  assert str(path) in str(e.value)


def test_count_mismatch(tmp_path):
  synthetic_idx_dir(tmp_path / "src")
  write_idx(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz", np.zeros(29), 2049)
  with pytest.raises(data.DataError, match="30 images .* but 29 labels"):
    data.read_source("fashion_mnist", str(tmp_path / "src"), "test")


def test_missing_everything_one_error(tmp_path, no_download):
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError) as e:
    data.load("fashion_mnist", "test", data_dir=str(tmp_path / "tfds"),
              source_dir=str(tmp_path / "empty"))
  msg = str(e.value)
  for needle in ("dataset-fashion-mnist", "source_dir", "data.source_dir", "TensorFlow",
                 "t10k-images-idx3-ubyte", "download disabled in tests"):
    assert needle in msg, needle
  assert isinstance(e.value.__cause__, RuntimeError)
  assert no_download == ["fashion_mnist"]


def test_missing_cifar_message(tmp_path, no_download):
  with pytest.raises(data.DataError, match="cifar-10-batches-py") as e:
    data.load("cifar10", "train", data_dir=str(tmp_path / "tfds"),
              source_dir=str(tmp_path / "nope"))
  assert "does not exist" in str(e.value) and "source_dir" in str(e.value)


def test_no_tensorflow_skips_stock_download(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_has_tensorflow", lambda: False)
  with pytest.raises(data.DataError, match="TensorFlow is not installed"):
    data.load("mnist", "test", data_dir=str(tmp_path / "tfds"), source_dir=str(tmp_path))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="imagenet", split="test"), "unknown dataset name 'imagenet'.*'fashion_mnist'"),
    (dict(name="mnist", split="validation"), "unknown split 'validation'.*'train', 'test'"),
])
def test_load_argument_errors(kwargs, match):
  with pytest.raises(data.DataError, match=match):
    data.load(kwargs["name"], kwargs["split"])


# ------------------------------------------------------------------ mock_data


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)),
                                        ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
@pytest.mark.parametrize("with_sources", [False, True])
def test_mock_data(tmp_path, download_spy, name, shape, with_sources):
  (tmp_path / "empty").mkdir()
  if with_sources:  # goes through the offline builder (sources are not read)
    if name == "cifar10":
      synthetic_cifar_dir(tmp_path / "src")
    else:
      synthetic_idx_dir(tmp_path / "src")
  src = str(tmp_path / ("src" if with_sources else "empty"))
  with tfds.testing.mock_data(num_examples=17):
    s = data.load(name, "test", data_dir=str(tmp_path / "tfds"), source_dir=src)
    s2 = data.load(name, "train", data_dir=str(tmp_path / "tfds"), source_dir=src)
  assert s.images.shape == (17, *shape) and s.images.dtype == np.uint8
  assert s.labels.shape == (17,) and s.labels.dtype == np.int32
  assert 0 <= s.labels.min() and s.labels.max() < 10
  assert s.images.std() > 50  # random pixels over 0..255
  np.testing.assert_array_equal(s.images, s2.images)  # mock: same examples per split
  assert not (tmp_path / "tfds").exists()  # nothing prepared
  # Without sources: step 3, whose download_and_prepare the mock makes a no-op.
  assert download_spy == ([] if with_sources else [name, name])


# ------------------------------------------------------ query/candidate split


def test_query_candidate_split():
  q, c = data.query_candidate_split(1000, 100, 300, seed=0)
  assert q.shape == (100,) and c.shape == (300,)
  assert q.dtype == np.int64 and c.dtype == np.int64
  assert len(np.intersect1d(q, c)) == 0
  assert len(np.unique(q)) == 100 and len(np.unique(c)) == 300
  assert np.all(np.diff(q) > 0) and np.all(np.diff(c) > 0)
  assert q.min() >= 0 and max(q.max(), c.max()) < 1000
  q2, c2 = data.query_candidate_split(np.zeros(1000, np.int32), 100, 300, seed=0)
  np.testing.assert_array_equal(q, q2)
  np.testing.assert_array_equal(c, c2)
  q3, c3 = data.query_candidate_split(1000, 100, 300, seed=1)
  assert not np.array_equal(q, q3) and not np.array_equal(c, c3)
  q4, c4 = data.query_candidate_split(10, 4, 6, seed=3)  # uses every index
  np.testing.assert_array_equal(np.sort(np.concatenate([q4, c4])), np.arange(10))


@pytest.mark.parametrize("args,match", [
    ((100, 60, 41, 0), "60 \\+ 41 = 101 exceeds the N=100"),
    ((100, 0, 10, 0), "num_queries must be a positive integer, got 0"),
    ((100, 10, -1, 0), "num_candidates must be a positive integer, got -1"),
    ((100, 2.5, 10, 0), "num_queries must be a positive integer, got 2.5"),
    ((0, 1, 1, 0), "N=0"),
    ((np.zeros(5), 1, 1, -1), "seed must be a non-negative integer, got -1"),
    ((None, 1, 1, 0), "labels_or_n"),
])
def test_query_candidate_split_errors(args, match):
  with pytest.raises(data.DataError, match=match):
    data.query_candidate_split(*args)


# -------------------------------------------------------------------- helpers


def test_to_float():
  x = np.array([[0, 1, 128, 255]], np.uint8)
  y = data.to_float(x)
  assert y.dtype == np.float32 and y.shape == x.shape
  np.testing.assert_array_equal(y, np.array([[0, 1 / 255, 128 / 255, 1]], np.float32))
  with pytest.raises(data.DataError, match="uint8.*float64"):
    data.to_float(np.zeros(3))


def test_split_validates():
  data.Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int32))
  with pytest.raises(data.DataError, match="labels"):
    data.Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int32))
  with pytest.raises(data.DataError, match="images"):
    data.Split(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32))
  assert data.SUPPORTED == ("mnist", "fashion_mnist", "cifar10")
  assert issubclass(data.DataError, ValueError)
