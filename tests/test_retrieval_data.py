"""jaxcert.retrieval_data: class splits, folder source, tfds readers. No network, no TF."""

import inspect
import io
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxcert import data
from jaxcert import retrieval_data as rd

LABEL_KEYS = {"stanford_online_products": "class_id", "caltech_birds2011": "label",
              "cars196": "label"}


# ---------------------------------------------------------------- class_split


def test_class_split_rule_and_reindex():
  labels = np.array([0, 3, 1, 4, 2, 3, 0, 5])
  idx, lab = rd.class_split(labels, 3, "train")
  np.testing.assert_array_equal(idx, [0, 2, 4, 6])
  np.testing.assert_array_equal(lab, [0, 1, 2, 0])
  assert idx.dtype == np.int64 and lab.dtype == np.int32
  idx, lab = rd.class_split(labels, 3, "test")
  np.testing.assert_array_equal(idx, [1, 3, 5, 7])
  np.testing.assert_array_equal(lab, [0, 1, 0, 2])  # 3, 4, 3, 5 -> dense
  # Gaps in the label space are closed: 7, 9 -> 0, 1.
  idx, lab = rd.class_split([0, 7, 9, 7], 5, "test")
  np.testing.assert_array_equal(idx, [1, 2, 3])
  np.testing.assert_array_equal(lab, [0, 1, 0])
  # Empty split.
  idx, lab = rd.class_split([0, 1], 5, "test")
  assert idx.shape == (0,) and lab.shape == (0,)


def test_class_split_subsampling_is_deterministic():
  labels = np.array([2, 0, 2, 1, 0, 2, 1, 0, 3])
  idx, lab = rd.class_split(labels, 3, "train", max_per_class=2)
  np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4, 6])  # first two of each class
  np.testing.assert_array_equal(lab, [2, 0, 2, 1, 0, 1])
  idx, lab = rd.class_split(labels, 3, "train", max_classes=2)
  np.testing.assert_array_equal(idx, [1, 3, 4, 6, 7])  # classes 0 and 1
  np.testing.assert_array_equal(lab, [0, 1, 0, 1, 0])
  idx, lab = rd.class_split(labels, 3, "train", max_classes=2, max_per_class=1)
  np.testing.assert_array_equal(idx, [1, 3])
  np.testing.assert_array_equal(lab, [0, 1])
  idx, lab = rd.class_split(labels, 1, "test", max_classes=1, max_per_class=5)
  np.testing.assert_array_equal(idx, [3, 6])  # class 1 only
  np.testing.assert_array_equal(lab, [0, 0])
  # More than available: no-op.
  idx, _ = rd.class_split(labels, 3, "train", max_classes=10, max_per_class=10)
  np.testing.assert_array_equal(idx, [0, 1, 2, 3, 4, 5, 6, 7])


@pytest.mark.parametrize("args,kwargs,match", [
    (([0, 1], 1, "val"), {}, "unknown split 'val'"),
    (([0, 1], 0, "train"), {}, "num_train_classes must be a positive integer, got 0"),
    (([0, 1], True, "train"), {}, "num_train_classes must be a positive integer, got True"),
    (([0, -1], 1, "train"), {}, "labels must be non-negative, got -1"),
    (([[0, 1]], 1, "train"), {}, r"labels must be a 1-D integer array, got int64 \(1, 2\)"),
    (([0.0, 1.0], 1, "train"), {}, "labels must be a 1-D integer array, got float64"),
    (([0, 1], 1, "train"), {"max_classes": 0}, "max_classes must be a positive integer, got 0"),
    (([0, 1], 1, "train"), {"max_per_class": 1.5},
     "max_per_class must be a positive integer, got 1.5"),
])
def test_class_split_errors(args, kwargs, match):
  with pytest.raises(data.DataError, match=match):
    rd.class_split(*args, **kwargs)


# ------------------------------------------------------------ resize and crop


def test_resize_center_crop_wide_gradient():
  # 60 x 20 (w x h), red = 4x, green = 10y. Shorter side 20 -> 10: 30 x 10,
  # crop columns 10..19 of the resized image = original columns 20..39.
  x, y = np.meshgrid(np.arange(60), np.arange(20))
  img = np.stack([4 * x, 10 * y, np.full_like(x, 77)], -1).astype(np.uint8)
  out = rd.resize_center_crop(img, 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  # A linear ramp stays linear under the 2x bilinear box: column c of the
  # crop is resized column c + 10, centred on original x = 2(c + 10) + 0.5.
  np.testing.assert_allclose(out[:, :, 0], np.broadcast_to(8 * np.arange(10) + 82, (10, 10)),
                             atol=1)
  np.testing.assert_allclose(out[1:9, :, 1].T, np.broadcast_to(20 * np.arange(1, 9) + 5, (10, 8)),
                             atol=1)  # interior rows (edge rows renormalise)
  assert (out[..., 2] == 77).all()


def test_resize_center_crop_tall_and_rounding():
  # Tall: 20 x 60 (w x h), red = 4y: crop rows of the 10 x 30 resize = 10..19.
  x, y = np.meshgrid(np.arange(20), np.arange(60))
  img = np.stack([4 * y, np.zeros_like(y), np.zeros_like(y)], -1).astype(np.uint8)
  out = rd.resize_center_crop(img, 10)
  np.testing.assert_allclose(out[:, :, 0].T, np.broadcast_to(8 * np.arange(10) + 82, (10, 10)),
                             atol=1)
  # No resize when the shorter side already is the size; offsets round like
  # torchvision's int(round(.)): (13 - 10) / 2 = 1.5 -> 2, (11 - 10) / 2 -> 0.
  x, _ = np.meshgrid(np.arange(13), np.arange(10))
  img = np.stack([10 * x] * 3, -1).astype(np.uint8)
  np.testing.assert_array_equal(rd.resize_center_crop(img, 10)[0, :, 0], 10 * np.arange(2, 12))
  np.testing.assert_array_equal(rd.resize_center_crop(img[:, :11], 10)[0, :, 0],
                                10 * np.arange(0, 10))
  # Upscaling and greyscale [H, W, 1] input.
  out = rd.resize_center_crop(np.full((4, 6, 1), 200, np.uint8), 8)
  assert out.shape == (8, 8, 3) and (out == 200).all()


# --------------------------------------------------------------- folder source


def save(path, color, size=(10, 6), mode="RGB", fmt=None):
  Image.new(mode, size, color).save(path, fmt)
  return str(path)


@pytest.fixture
def tree(tmp_path):
  """5 classes (a..e) with known colours, mixed formats and extension case."""
  root = tmp_path / "imgs"
  spec = {
      "a_red": [("1.png", (255, 0, 0), "RGB", "PNG"), ("2.PNG", (255, 0, 0), "RGB", "PNG"),
                ("3.Jpg", (255, 0, 0), "RGB", "JPEG")],
      "b_green": [("x.jpeg", (0, 255, 0), "RGB", "JPEG"), ("y.bmp", (0, 255, 0), "RGB", "BMP")],
      "c_blue": [("only.png", (0, 0, 255), "RGB", "PNG")],
      "d_grey": [("g1.png", 128, "L", "PNG"), ("g2.JPEG", 60, "L", "JPEG")],
      "e_rgba": [("t.png", (10, 20, 250, 100), "RGBA", "PNG")],
  }
  for cls, files in spec.items():
    (root / cls).mkdir(parents=True)
    for name, color, mode, fmt in files:
      save(root / cls / name, color, mode=mode, fmt=fmt)
  (root / "a_red" / "notes.txt").write_text("not an image")
  (root / "a_red" / ".hidden.png").write_bytes(b"junk")  # ignored
  (root / ".cache").mkdir()  # ignored: hidden
  (root / "stray.png").write_bytes(b"junk")  # ignored: not in a class folder
  return root


def test_folder_classes_and_default_split(tree):
  assert rd.image_folder_classes(tree) == ["a_red", "b_green", "c_blue", "d_grey", "e_rgba"]
  tr = rd.load_image_folder(tree, "train", image_size=8)  # default: 5 // 2 = 2 classes
  assert tr.images.shape == (5, 8, 8, 3) and tr.images.dtype == np.uint8
  np.testing.assert_array_equal(tr.labels, [0, 0, 0, 1, 1])
  assert tr.labels.dtype == np.int32
  np.testing.assert_array_equal(tr.images[:2].reshape(-1, 3), np.tile([255, 0, 0], (128, 1)))
  assert np.abs(tr.images[2].astype(int) - [255, 0, 0]).max() <= 3  # JPEG
  assert np.abs(tr.images[3].astype(int) - [0, 255, 0]).max() <= 3  # JPEG
  np.testing.assert_array_equal(tr.images[4].reshape(-1, 3), np.tile([0, 255, 0], (64, 1)))
  te = rd.load_image_folder(tree, "test", image_size=8)
  np.testing.assert_array_equal(te.labels, [0, 1, 1, 2])  # c, d, d, e
  np.testing.assert_array_equal(te.images[0].reshape(-1, 3), np.tile([0, 0, 255], (64, 1)))
  np.testing.assert_array_equal(te.images[1], np.full((8, 8, 3), 128, np.uint8))  # L -> RGB
  assert np.abs(te.images[2].astype(int) - 60).max() <= 3
  np.testing.assert_array_equal(te.images[3].reshape(-1, 3), np.tile([10, 20, 250], (64, 1)))


def test_folder_train_classes_and_subsampling(tree):
  tr = rd.load_image_folder(tree, "train", image_size=4, train_classes=3)
  np.testing.assert_array_equal(tr.labels, [0, 0, 0, 1, 1, 2])
  te = rd.load_image_folder(tree, "test", image_size=4, train_classes=3)
  np.testing.assert_array_equal(te.labels, [0, 0, 1])
  sub = rd.load_image_folder(tree, "train", image_size=4, train_classes=4, max_per_class=1)
  np.testing.assert_array_equal(sub.labels, [0, 1, 2, 3])
  sub = rd.load_image_folder(tree, "test", image_size=4, train_classes=1, max_classes=2)
  np.testing.assert_array_equal(sub.labels, [0, 0, 1])  # b (2 images), c (1)
  np.testing.assert_array_equal(sub.images[2, 0, 0], [0, 0, 255])


def test_folder_non_square_resize_crop(tmp_path):
  # 30 x 10: left third red, middle green, right blue -> 6 px: 18 x 6, crop 6..11.
  (tmp_path / "r" / "k0").mkdir(parents=True)
  (tmp_path / "r" / "k1").mkdir()
  img = np.zeros((10, 30, 3), np.uint8)
  img[:, :10, 0] = img[:, 10:20, 1] = img[:, 20:, 2] = 255
  Image.fromarray(img).save(tmp_path / "r" / "k0" / "wide.png")
  save(tmp_path / "r" / "k1" / "z.png", (1, 2, 3))
  out = rd.load_image_folder(tmp_path / "r", "train", image_size=6)
  assert out.images.shape == (1, 6, 6, 3)
  # Crop columns 6..11 of the resize = original 10..19 (green); only the
  # outermost columns get some red/blue from the bilinear filter.
  np.testing.assert_array_equal(out.images[0, :, 1:5], np.tile([0, 255, 0], (6, 4, 1)))
  assert out.images[0, :, 0, 0].min() > 0 and out.images[0, :, 5, 2].min() > 0
  assert out.images[0, :, :, 1].min() > 128


def test_folder_corrupt_files_named(tree):
  bad = tree / "b_green" / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 this is not a jpeg")
  with pytest.raises(data.DataError, match="cannot read image file") as e:
    rd.load_image_folder(tree, "train", image_size=8)
  assert str(bad) in str(e.value)
  rd.load_image_folder(tree, "test", image_size=8)  # other split: not decoded
  bad.unlink()
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(buf, "PNG")
  trunc = tree / "c_blue" / "trunc.png"
  trunc.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  with pytest.raises(data.DataError, match="cannot read image file") as e:
    rd.load_image_folder(tree, "test", image_size=8)
  assert str(trunc) in str(e.value)


def test_folder_structure_errors(tree, tmp_path):
  empty = tree / "c_blue"
  for f in empty.iterdir():
    f.unlink()
  (empty / "readme.txt").write_text("x")
  with pytest.raises(data.DataError, match="has no images") as e:
    rd.load_image_folder(tree, "train")
  assert str(empty) in str(e.value) and ".jpg, .jpeg, .png, .bmp" in str(e.value)
  missing = tmp_path / "nope"
  with pytest.raises(data.DataError, match="does not exist") as e:
    rd.load_image_folder(missing, "train")
  assert str(missing) in str(e.value)
  with pytest.raises(data.DataError, match="is not a directory"):
    rd.load_image_folder(tree / "stray.png", "train")
  (tmp_path / "flat").mkdir()
  save(tmp_path / "flat" / "a.png", (0, 0, 0))
  with pytest.raises(data.DataError, match="has no class folders"):
    rd.load_image_folder(tmp_path / "flat", "train")
  (tmp_path / "flat" / "only").mkdir()
  save(tmp_path / "flat" / "only" / "a.png", (0, 0, 0))
  with pytest.raises(data.DataError, match="has 1 class folder .*needs at least 2"):
    rd.load_image_folder(tmp_path / "flat", "train")


@pytest.mark.parametrize("value", [0, 5, -1, True, 2.5, "2"])
def test_folder_train_classes_range(tree, value):
  with pytest.raises(data.DataError) as e:
    rd.load_image_folder(tree, "train", train_classes=value)
  msg = str(e.value)
  assert "train_classes must be an integer in [1, 4]" in msg and repr(value) in msg
  assert "5 class folders" in msg


@pytest.mark.parametrize("kwargs,match", [
    ({"split": "val"}, "unknown split 'val'"),
    ({"image_size": 0}, "image_size must be a positive integer, got 0"),
    ({"max_per_class": -2}, "max_per_class must be a positive integer, got -2"),
])
def test_folder_argument_errors(tree, kwargs, match):
  kwargs = {"split": "train", **kwargs}
  with pytest.raises(data.DataError, match=match):
    rd.load_image_folder(tree, **kwargs)


# ------------------------------------------------------- tfds: not prepared


@pytest.fixture
def forbid_download(monkeypatch):
  """Any download / prepare attempt fails the test (install before mock_data)."""

  def boom(*args, **kwargs):
    raise AssertionError("a download was attempted")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", boom)
  monkeypatch.setattr(tfds.download.DownloadManager, "download", boom)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", boom)


@pytest.mark.parametrize("name,k", [("stanford_online_products", 11318),
                                    ("caltech_birds2011", 100), ("cars196", 98)])
def test_not_prepared_message(tmp_path, forbid_download, name, k):
  with pytest.raises(data.DataError) as e:
    rd.load_retrieval(name, "train", data_dir=tmp_path)
  msg = str(e.value)
  for part in (f"retrieval dataset {name!r} is not prepared in {tmp_path}/{name}/",
               "cannot be downloaded on this machine",
               f"tfds build {name} --data_dir=DIR --file_format=array_record",
               "download_and_prepare(file_format='array_record')",
               "pass data_dir=DIR", "load_image_folder", f"train_classes={k}"):
    assert part in msg, (part, msg)
  assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "mnist"}, "unknown retrieval dataset name 'mnist'; supported: "
                        "'stanford_online_products', 'caltech_birds2011', 'cars196'"),
    ({"split": "validation"}, "unknown split 'validation'"),
    ({"image_size": -3}, "image_size must be a positive integer, got -3"),
    ({"max_classes": 0}, "max_classes must be a positive integer, got 0"),
])
def test_load_retrieval_argument_errors(kwargs, match):
  kwargs = {"name": "cars196", "split": "train", **kwargs}
  with pytest.raises(data.DataError, match=match):
    rd.load_retrieval(**kwargs)


def test_specs():
  assert rd.RETRIEVAL_DATASETS == ("stanford_online_products", "caltech_birds2011", "cars196")
  for name in rd.RETRIEVAL_DATASETS:
    spec = rd.SPECS[name]
    feats = tfds.builder(name).info.features  # no download, no TF needed
    assert spec.label_key == LABEL_KEYS[name]
    assert isinstance(feats[spec.image_key], tfds.features.Image)
    assert feats[spec.label_key].num_classes == spec.num_classes
  assert [(rd.SPECS[n].num_classes, rd.SPECS[n].num_train_classes)
          for n in rd.RETRIEVAL_DATASETS] == [(22634, 11318), (200, 100), (196, 98)]


# ------------------------------------------------------------ tfds: mock_data


@pytest.mark.parametrize("name", rd.RETRIEVAL_DATASETS)
def test_mock_data_split_rule(forbid_download, name):
  n, k, key = 24, rd.SPECS[name].num_train_classes, LABEL_KEYS[name]
  with tfds.testing.mock_data(num_examples=n):
    # What the mock serves for each tfds split (it is the same for both).
    b = tfds.builder(name)
    mock = {s: data._getitems(b.as_data_source(s), list(range(n))) for s in ("train", "test")}
    orig = np.array([int(ex[key]) for s in ("train", "test") for ex in mock[s]])
    pics = [np.asarray(ex["image"]) for s in ("train", "test") for ex in mock[s]]
    out = {s: rd.load_retrieval(name, s, image_size=16, data_dir="/nonexistent")
           for s in ("train", "test")}
    sub = rd.load_retrieval(name, "test", image_size=4, max_per_class=1, max_classes=3)
  num_classes = rd.SPECS[name].num_classes
  assert orig.min() >= 0 and orig.max() < num_classes
  for s, sel in (("train", orig < k), ("test", orig >= k)):
    got = out[s]
    assert 0 < sel.sum() < 2 * n  # both sides of the rule are exercised
    assert got.images.shape == (sel.sum(), 16, 16, 3) and got.images.dtype == np.uint8
    assert got.labels.dtype == np.int32
    # Labels: the selected original classes, densely re-indexed in order.
    np.testing.assert_array_equal(got.labels, np.unique(orig[sel], return_inverse=True)[1])
    first = int(np.flatnonzero(sel)[0])
    np.testing.assert_array_equal(got.images[0], rd.resize_center_crop(pics[first], 16))
  test_classes = np.unique(orig[orig >= k])
  assert sub.images.shape == (min(3, test_classes.size), 4, 4, 3)
  np.testing.assert_array_equal(np.sort(sub.labels), np.arange(min(3, test_classes.size)))
  # The kept examples: first occurrence of each of the 3 smallest test classes.
  kept = [int(np.flatnonzero(orig == c)[0]) for c in test_classes[:3]]
  np.testing.assert_array_equal(sub.labels, np.argsort(np.argsort(orig[sorted(kept)])))


# ------------------------------------------ tfds: array_record in stock layout


def png(color, size=(12, 8), mode="RGB", fmt="PNG"):
  buf = io.BytesIO()
  Image.new(mode, size, color).save(buf, fmt)
  return buf.getvalue()


class _StockLayout(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the stock builder's record layout (encoded image bytes + int64 label)
  as array_record without TF; `name`, label key and examples set per subclass."""

  VERSION = tfds.core.Version("1.0.0")
  LABEL_KEY = "label"
  NUM_CLASSES = 200
  EXAMPLES = {}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(inspect.getfile(cls))

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        self.LABEL_KEY: tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
    }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in self.EXAMPLES}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(self.EXAMPLES[split]):
      yield i, {"image": image, self.LABEL_KEY: label}


def prepared_stock(monkeypatch, data_dir, name, label_key, num_classes, examples):
  cls = type("Fake", (_StockLayout,), {"name": name, "LABEL_KEY": label_key,
                                       "NUM_CLASSES": num_classes, "EXAMPLES": examples},
             skip_registration=True)
  cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  real = tfds.builder
  monkeypatch.setattr(tfds, "builder", lambda n, data_dir=None, **kw: (
      cls(data_dir=data_dir) if n == name else real(n, data_dir=data_dir, **kw)))


def test_array_record_stock_layout_cub(tmp_path, monkeypatch, caplog):
  # CUB-like: tfds train/test are not class-disjoint; the union is split by label.
  examples = {
      "train": [(png((0, 0, 10)), 0), (png((0, 0, 150)), 150),
                (png((0, 0, 99), size=(30, 10)), 99), (png(33, mode="L"), 3)],
      "test": [(png((0, 0, 100)), 100), (png((1, 0, 0), fmt="JPEG"), 0),
               (png((0, 0, 199), mode="RGB"), 199)],
  }
  prepared_stock(monkeypatch, tmp_path, "caltech_birds2011", "label", 200, examples)
  with caplog.at_level(logging.WARNING, logger="jaxcert.retrieval_data"):
    tr = rd.load_retrieval("caltech_birds2011", "train", image_size=6, data_dir=tmp_path)
  assert "4 images, the dataset's documentation says 5864" in caplog.text
  assert tr.images.shape == (4, 6, 6, 3)
  np.testing.assert_array_equal(tr.labels, [0, 2, 1, 0])  # classes 0, 99, 3, 0
  np.testing.assert_array_equal(tr.images[0, 0, 0], [0, 0, 10])
  np.testing.assert_array_equal(tr.images[1], np.tile([0, 0, 99], (6, 6, 1)))
  np.testing.assert_array_equal(tr.images[2], np.full((6, 6, 3), 33))  # greyscale -> RGB
  assert np.abs(tr.images[3].astype(int) - [1, 0, 0]).max() <= 3  # JPEG
  te = rd.load_retrieval("caltech_birds2011", "test", image_size=6, data_dir=tmp_path)
  np.testing.assert_array_equal(te.labels, [1, 0, 2])  # classes 150, 100, 199
  np.testing.assert_array_equal(te.images[:, 0, 0, 2], [150, 100, 199])
  sub = rd.load_retrieval("caltech_birds2011", "train", image_size=2, data_dir=tmp_path,
                          max_per_class=1)
  np.testing.assert_array_equal(sub.images[:, 0, 0, 2], [10, 99, 33])


def test_array_record_stock_layout_sop_and_errors(tmp_path, monkeypatch):
  examples = {"train": [(png((0, 5, 0)), 5), (png((0, 17, 0)), 11317)],
              "test": [(png((0, 18, 0)), 11318), (png((0, 33, 0)), 22633),
                       (b"garbage", 11320)]}
  prepared_stock(monkeypatch, tmp_path, "stanford_online_products", "class_id", 22634,
                 examples)
  tr = rd.load_retrieval("stanford_online_products", "train", image_size=3, data_dir=tmp_path)
  np.testing.assert_array_equal(tr.labels, [0, 1])
  np.testing.assert_array_equal(tr.images[:, 0, 0, 1], [5, 17])
  with pytest.raises(data.DataError, match="cannot decode image") as e:
    rd.load_retrieval("stanford_online_products", "test", image_size=3, data_dir=tmp_path)
  assert "tfds split 'test'" in str(e.value) and "record 2" in str(e.value)
  # Only the selected records are decoded: class 11318 alone is readable.
  sub = rd.load_retrieval("stanford_online_products", "test", image_size=3,
                          data_dir=tmp_path, max_classes=1)
  np.testing.assert_array_equal(sub.labels, [0])
  np.testing.assert_array_equal(sub.images[:, 0, 0, 1], [18])


def test_array_record_label_out_of_range(tmp_path, monkeypatch):
  examples = {"train": [(png((0, 0, 0)), 0)], "test": [(png((0, 0, 0)), 196)]}
  prepared_stock(monkeypatch, tmp_path, "cars196", "label", 300, examples)
  with pytest.raises(data.DataError, match=r"'label' values span 196..196, expected 0..195"):
    rd.load_retrieval("cars196", "train", data_dir=tmp_path)


def test_array_record_missing_split(tmp_path, monkeypatch):
  prepared_stock(monkeypatch, tmp_path, "cars196", "label", 196,
                 {"train": [(png((0, 0, 0)), 0)]})
  with pytest.raises(data.DataError, match=r"has splits \['train'\], expected \['train', 'test'\]"):
    rd.load_retrieval("cars196", "train", data_dir=tmp_path)


def test_tfrecord_copy_needs_conversion(tmp_path, monkeypatch):
  prepared_stock(monkeypatch, tmp_path, "cars196", "label", 196,
                 {"train": [(png((0, 0, 0)), 0)], "test": [(png((0, 0, 0)), 100)]})

  def tfrecord_only(self, split, **kwargs):  # what tfds says for a tfrecord copy
    raise NotImplementedError("Random access data source for file format tfrecord")

  monkeypatch.setattr(_StockLayout, "as_data_source", tfrecord_only)
  with pytest.raises(data.DataError) as e:
    rd.load_retrieval("cars196", "test", data_dir=tmp_path)
  msg = str(e.value)
  assert "cannot be read without TensorFlow" in msg and "file format tfrecord" in msg
  assert ("tfds convert_format --dataset_dir=<data_dir>/cars196 "
          "--out_file_format=array_record") in msg
