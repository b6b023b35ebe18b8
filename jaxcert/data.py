"""Datasets (MNIST, Fashion-MNIST, CIFAR-10) as in-memory numpy arrays via tfds.

``load(name, split)`` returns a :class:`Split` (uint8 images ``[N, H, W, C]``,
int32 labels ``[N]``). It tries, in order:

1. the stock tfds dataset ``name`` if it is already prepared in ``data_dir``
   (tfds default data dir when ``None``);
2. the offline builder ``jaxcert_<name>`` defined here: if it is already
   prepared in ``data_dir`` it is read; otherwise it is prepared from local
   original files -- ``source_dir`` or a per-dataset default
   (:data:`DEFAULT_SOURCE_DIRS`; Fashion-MNIST: the Debian/Ubuntu package
   ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``).
   MNIST/Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
   ``t10k-labels-idx1-ubyte``, gzipped or not; ``*.idx3-ubyte`` spellings are
   accepted too). CIFAR-10: the python-pickle batches (``data_batch_1`` ..
   ``data_batch_5``, ``test_batch``) in ``source_dir`` or in
   ``source_dir/cifar-10-batches-py``;
3. the stock builder's ``download_and_prepare`` (needs internet and, because
   the stock builders use ``tfds.features.Image``, TensorFlow; skipped when
   TensorFlow is not installed, except under ``tfds.testing.mock_data``).

If all fail, one :class:`DataError` says how to fix it and lists every
underlying error. Corrupt source files raise :class:`DataError` at once.

What works without TensorFlow (verified with tensorflow-datasets 4.9.10):

* Preparing: a ``GeneratorBasedBuilder`` whose features are
  ``Tensor(uint8, encoding=Encoding.BYTES)`` + ``ClassLabel`` needs no image
  encoding; examples are serialized to ``tf.train.Example`` bytes with tfds'
  bundled protobuf (``tensorflow_datasets.proto``) and written with
  ``file_format="array_record"``. The offline builders set
  ``disable_shuffling=True``, so records keep the order of the source files.
  (``Encoding.BYTES`` stores the pixels as one bytes value instead of 784
  int64s: 1.6x faster to prepare, records 30% smaller, decodable with
  ``np.frombuffer``.)
* Reading: ``builder.as_data_source(split)`` is an ``ArrayRecordDataSource``
  whose default decode (``features.deserialize_example_np``, numpy parser)
  works without TF but costs ~100 us/example (6 s for 60k). For the offline
  builders ``load`` asks for ``deserialize_method=RAW_BYTES``, reads chunks
  with ``__getitems__`` and parses each record with the bundled
  ``tf_example_pb2.Example`` (upb): ~30 us/example. Stock builders use the
  default decode.
* Stock builders: ``tfds.builder(name)``, ``info`` and ``is_prepared()`` work
  without TF. Preparing them does not: ``Image.encode_example`` calls
  ``tf.image.encode_png``. Reading a stock dataset prepared as array_record
  works (``Image.decode_example_np`` uses OpenCV or Pillow); one prepared as
  tfrecord needs ``as_dataset`` and thus TF. Also, in tfds 4.9.10
  ``DatasetBuilder.code_path`` (used by ``download_and_prepare``) imports the
  ``importlib_resources`` backport, which tfds only requires on Python < 3.9;
  without it step 3 fails even with TF (the offline builders override
  ``code_path`` and are not affected).
* ``tfds.testing.mock_data`` patches ``DatasetBuilder.__init__`` (forces
  ``data_dir`` to ``tensorflow_datasets/testing/metadata``, not shipped in
  the wheel, so ``is_prepared()`` is False for every builder, ours included),
  ``download_and_prepare`` (no-op), ``as_data_source`` (random examples made
  from ``features.get_tensor_info()``: ``Image`` -> uint8 numpy, no PNG and
  no TF) and ``as_dataset`` (``tf.data``, needs TF). ``load`` always reads
  through ``as_data_source`` first, so under the mock it returns
  ``num_examples`` random examples of the right shape, through step 2 (when
  source files exist; they are not read) or step 3. The mock's
  ``__getitems__`` is broken in 4.9.10 (a ``functools.partial`` set on the
  instance, TypeError), so reading falls back to per-index ``__getitem__``.

The offline builders are not put in the tfds registry (re-importing this
module would otherwise fail); a prepared copy can be read elsewhere with
``tfds.builder_from_directory(data_dir/jaxcert_<name>/1.0.0)``. A prepared
copy is reused whatever ``source_dir`` says; delete its directory to rebuild.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import inspect
import logging
import os
import pickle
import struct
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

__all__ = [
    "DEFAULT_SOURCE_DIRS",
    "DataError",
    "SUPPORTED",
    "Split",
    "load",
    "query_candidate_split",
    "to_float",
]

log = logging.getLogger(__name__)

SUPPORTED = ("mnist", "fashion_mnist", "cifar10")
SPLITS = ("train", "test")

# Where `load` looks for original files when `source_dir` is None.
DEFAULT_SOURCE_DIRS: dict[str, str | None] = {
    "mnist": "/usr/share/datasets/mnist",
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": None,
}

IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}
_CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                "horse", "ship", "truck"],
}
_HOMEPAGES = {
    "mnist": "http://yann.lecun.com/exdb/mnist/",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html",
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                  "test": ("test_batch",)}
_READ_CHUNK = 8192


class DataError(ValueError):
  """Bad arguments, missing or corrupt data."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split in memory: uint8 images [N, H, W, C], int32 labels [N]."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    im, lb = self.images, self.labels
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4:
      raise DataError(f"Split.images must be a uint8 array [N, H, W, C], got "
                      f"{type(im).__name__} {getattr(im, 'dtype', None)} "
                      f"{getattr(im, 'shape', None)}")
    if not isinstance(lb, np.ndarray) or lb.dtype != np.int32 or lb.shape != im.shape[:1]:
      raise DataError(f"Split.labels must be an int32 array [{im.shape[0]}], got "
                      f"{type(lb).__name__} {getattr(lb, 'dtype', None)} "
                      f"{getattr(lb, 'shape', None)}")

  def __len__(self) -> int:
    return int(self.labels.shape[0])


# ----------------------------------------------------------------- arguments


def _check_name(name) -> None:
  if not isinstance(name, str) or name not in SUPPORTED:
    raise DataError(f"unknown dataset name {name!r} (data.name); supported: "
                    f"{', '.join(map(repr, SUPPORTED))}")


def _check_split(split) -> None:
  if not isinstance(split, str) or split not in SPLITS:
    raise DataError(f"unknown split {split!r}; allowed: "
                    f"{', '.join(map(repr, SPLITS))}")


def _check_count(arg: str, value) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise DataError(f"{arg} must be a positive integer, got {value!r}")
  if value <= 0:
    raise DataError(f"{arg} must be a positive integer, got {value}")
  return int(value)


# ------------------------------------------------------- original file readers


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Reads an IDX (optionally .gz) file of unsigned bytes, checking integrity."""
  kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise DataError(f"cannot read IDX {kind} file {path}: {e} "
                    "(truncated or corrupt file?)") from e
  if len(raw) < 4:
    raise DataError(f"IDX {kind} file {path} is truncated: {len(raw)} bytes")
  (got,) = struct.unpack(">i", raw[:4])
  if got != magic:
    raise DataError(f"IDX {kind} file {path} has bad magic number {got}, "
                    f"expected {magic} (not an IDX {kind} file, or corrupt)")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"IDX {kind} file {path} is truncated inside its header")
  dims = struct.unpack(f">{ndim}I", raw[4:header])
  want = int(np.prod(dims, dtype=np.int64))
  if len(raw) - header != want:
    raise DataError(f"IDX {kind} file {path}: size mismatch, header says "
                    f"{'x'.join(map(str, dims))} = {want} data bytes but the "
                    f"file has {len(raw) - header} (truncated or corrupt)")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_paths(source_dir: str, split: str) -> tuple[dict[str, str], list[str]]:
  """Finds the IDX images/labels files of `split`; returns (found, missing)."""
  prefix = _IDX_PREFIX[split]
  found, missing = {}, []
  for kind, d in (("images", 3), ("labels", 1)):
    names = [f"{prefix}-{kind}-idx{d}-ubyte", f"{prefix}-{kind}.idx{d}-ubyte"]
    for n in names:
      hit = next((p for p in (os.path.join(source_dir, n + ext) for ext in (".gz", ""))
                  if os.path.isfile(p)), None)
      if hit:
        found[kind] = hit
        break
    else:
      missing.append(names[0] + "[.gz]")
  return found, missing


def _read_idx_split(name: str, source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  found, missing = _idx_paths(source_dir, split)
  if missing:
    raise DataError(f"{name}: missing {', '.join(missing)} in {source_dir}")
  images = _read_idx(found["images"], _IDX_IMAGES_MAGIC)
  labels = _read_idx(found["labels"], _IDX_LABELS_MAGIC)
  h, w, _ = IMAGE_SHAPES[name]
  if images.shape[1:] != (h, w):
    raise DataError(f"IDX images file {found['images']} holds "
                    f"{images.shape[1]}x{images.shape[2]} images, {name} needs {h}x{w}")
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{name} {split}: {images.shape[0]} images in {found['images']} "
                    f"but {labels.shape[0]} labels in {found['labels']}")
  if labels.size and labels.max() >= 10:
    raise DataError(f"IDX labels file {found['labels']} has label {labels.max()}, "
                    "expected 0..9")
  return images[..., None], labels


class _CifarUnpickler(pickle.Unpickler):
  """Unpickles only what CIFAR-10 batches contain (dicts, lists, numpy arrays)."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
      ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
    return super().find_class(module, name)


def _cifar_dir(source_dir: str) -> str:
  sub = os.path.join(source_dir, "cifar-10-batches-py")
  return sub if os.path.isdir(sub) else source_dir


def _cifar_missing(source_dir: str) -> list[str]:
  d = _cifar_dir(source_dir)
  return [b for s in SPLITS for b in _CIFAR_BATCHES[s]
          if not os.path.isfile(os.path.join(d, b))]


def _read_cifar_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  d = _cifar_dir(source_dir)
  images, labels = [], []
  for b in _CIFAR_BATCHES[split]:
    path = os.path.join(d, b)
    try:
      with open(path, "rb") as f:
        batch = _CifarUnpickler(f, encoding="bytes").load()
      batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
      data = np.asarray(batch["data"])
      lab = np.asarray(batch["labels"])
    except FileNotFoundError as e:
      raise DataError(f"cifar10: missing batch file {path}") from e
    except Exception as e:  # pickle errors, KeyError, AttributeError, EOFError...
      raise DataError(f"cannot read CIFAR-10 batch file {path}: {e!r} "
                      "(expected the python pickle of cifar-10-batches-py)") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
      raise DataError(f"CIFAR-10 batch file {path}: 'data' is {data.dtype} "
                      f"{data.shape}, expected uint8 [N, 3072]")
    if lab.shape != (data.shape[0],) or (lab.size and (lab.min() < 0 or lab.max() >= 10)):
      raise DataError(f"CIFAR-10 batch file {path}: 'labels' has shape {lab.shape} "
                      f"(expected ({data.shape[0]},)) or values outside 0..9")
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(lab.astype(np.int64))
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _missing_sources(name: str, source_dir: str) -> list[str]:
  if name == "cifar10":
    return _cifar_missing(source_dir)
  return [m for s in SPLITS for m in _idx_paths(source_dir, s)[1]]


def read_source(name: str, source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split from the original files: uint8 [N, H, W, C], int64 [N]."""
  _check_name(name)
  _check_split(split)
  if name == "cifar10":
    return _read_cifar_split(source_dir, split)
  return _read_idx_split(name, source_dir, split)


# ------------------------------------------------------ offline tfds builders


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepares `DATASET` from local original files, array_record, no TF needed."""

  name = "jaxcert_offline"
  DATASET = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Uint8 tensors from the original files, source order."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10's DatasetBuilder.code_path imports `importlib_resources`
    # (only a dependency on Python < 3.9) for builders defined in a package;
    # without it download_and_prepare fails. Our source file is all it needs.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, source_dir: str | None = None, **kwargs: Any):
    self._source_dir = source_dir
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} read offline from its original files by jaxcert.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=IMAGE_SHAPES[self.DATASET], dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=_CLASS_NAMES[self.DATASET]),
        }),
        supervised_keys=("image", "label"),
        homepage=_HOMEPAGES[self.DATASET],
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # all local
    if not self._source_dir:
      raise DataError(f"{self.name}: no source_dir to prepare from")
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split):
    images, labels = read_source(self.DATASET, self._source_dir, split)
    for i in range(labels.shape[0]):
      yield i, {"image": images[i], "label": int(labels[i])}


class JaxcertMnist(_OfflineBuilder, skip_registration=True):
  name = "jaxcert_mnist"
  DATASET = "mnist"


class JaxcertFashionMnist(_OfflineBuilder, skip_registration=True):
  name = "jaxcert_fashion_mnist"
  DATASET = "fashion_mnist"


class JaxcertCifar10(_OfflineBuilder, skip_registration=True):
  name = "jaxcert_cifar10"
  DATASET = "cifar10"


OFFLINE_BUILDERS = {b.DATASET: b for b in (JaxcertMnist, JaxcertFashionMnist, JaxcertCifar10)}


# ------------------------------------------------------------------- reading


def _tfds_is_mocked() -> bool:
  fn = tfds.core.DatasetBuilder.as_data_source
  return getattr(fn, "__module__", "").startswith("tensorflow_datasets.testing")


def _getitems(ds, keys: list[int]) -> Sequence[Any]:
  getitems = getattr(ds, "__getitems__", None)
  if getitems is not None:
    try:
      return getitems(keys)
    except TypeError:  # tfds 4.9.10 mock_data: its __getitems__ patch is unbound
      pass
  return [ds[k] for k in keys]


def _stack(ds, shape: tuple[int, ...], what: str) -> Split:
  n = len(ds)
  images = np.empty((n, *shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    exs = _getitems(ds, list(range(start, min(n, start + _READ_CHUNK))))
    chunk = np.stack([np.asarray(ex["image"]) for ex in exs])
    if chunk.shape[1:] != shape or chunk.dtype != np.uint8:
      raise DataError(f"{what}: images are {chunk.dtype} {chunk.shape[1:]}, "
                      f"expected uint8 {shape}")
    images[start:start + len(exs)] = chunk
    labels[start:start + len(exs)] = [int(ex["label"]) for ex in exs]
  return Split(images, labels)


def _parse_records(records: Sequence[bytes], shape: tuple[int, ...], what: str):
  """Parses the offline builders' tf.train.Example records (no TF, no tfds decode)."""
  size = int(np.prod(shape))
  parse = tf_example_pb2.Example.FromString
  images, labels = [], []
  try:
    for rec in records:
      feature = parse(rec).features.feature
      images.append(feature["image"].bytes_list.value[0])
      labels.append(feature["label"].int64_list.value[0])
  except Exception as e:  # DecodeError, IndexError: not our record layout
    raise DataError(f"{what}: unexpected record format ({e!r}); delete the "
                    "prepared directory to rebuild it") from e
  if any(len(im) != size for im in images):
    raise DataError(f"{what}: image records are not {size} bytes ({shape})")
  return (np.frombuffer(b"".join(images), np.uint8).reshape(-1, *shape),
          np.asarray(labels, np.int32))


def _read_offline(builder: _OfflineBuilder, split: str, shape: tuple[int, ...]) -> Split:
  """Fast path: raw records + one protobuf parse each (~4x faster than tfds decode)."""
  what = f"{builder.name} {split} in {builder.data_dir}"
  ds = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  n = len(ds)
  images = np.empty((n, *shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    stop = min(n, start + _READ_CHUNK)
    images[start:stop], labels[start:stop] = _parse_records(
        _getitems(ds, list(range(start, stop))), shape, what)
  return Split(images, labels)


def _read_builder(builder, split: str, shape: tuple[int, ...]) -> Split:
  if isinstance(builder, _OfflineBuilder):
    return _read_offline(builder, split, shape)
  what = f"{builder.name} {split} in {builder.data_dir}"
  try:
    ds = builder.as_data_source(split)
  except (NotImplementedError, ValueError) as e:  # no random-access format
    log.info("%s: as_data_source failed (%s); using as_dataset (needs TF)", what, e)
    ex = tfds.as_numpy(builder.as_dataset(split, batch_size=-1))
    images = np.asarray(ex["image"])
    if images.shape[1:] != shape or images.dtype != np.uint8:
      raise DataError(f"{what}: images are {images.dtype} {images.shape[1:]}, "
                      f"expected uint8 {shape}") from None
    return Split(images, np.asarray(ex["label"]).astype(np.int32))
  return _stack(ds, shape, what)


def _is_prepared(builder) -> bool:
  # is_prepared() logs a warning for every missing variant dir; check first.
  return epath.Path(builder.data_dir).exists() and builder.is_prepared()


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _stock_download_and_prepare(builder) -> None:
  """Step 3; a module-level hook so tests can replace it."""
  if not _tfds_is_mocked() and not _has_tensorflow():
    raise ModuleNotFoundError(
        "TensorFlow is not installed; the stock tfds builder needs it to "
        "encode its tfds.features.Image while preparing")
  builder.download_and_prepare(file_format="array_record")


def _help(name: str, data_dir, failures: list[str]) -> str:
  if name == "fashion_mnist":
    local = ("install the Debian/Ubuntu package `dataset-fashion-mnist` "
             "(apt-get install dataset-fashion-mnist: files in "
             "/usr/share/datasets/fashion-mnist), or put the four original IDX "
             "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
             "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a "
             "directory and pass it as source_dir (config key data.source_dir)")
  elif name == "mnist":
    local = ("put the four original MNIST IDX files (train-images-idx3-ubyte.gz, "
             "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
             "t10k-labels-idx1-ubyte.gz) in a directory and pass it as "
             "source_dir (config key data.source_dir) [for Fashion-MNIST the "
             "Debian/Ubuntu package `dataset-fashion-mnist` provides them]")
  else:
    local = ("extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/"
             "cifar.html) and pass the cifar-10-batches-py directory (data_batch_1"
             "..5, test_batch) as source_dir (config key data.source_dir)")
  lines = "\n".join(f"  - {f}" for f in failures)
  return (f"could not load dataset {name!r} (data_dir={data_dir!r}). Either "
          f"{local}; or run where tensorflow-datasets can download it, with "
          f"TensorFlow installed (e.g. Colab). Errors:\n{lines}")


def load(name: str, split: str, *, data_dir: str | None = None,
         source_dir: str | None = None) -> Split:
  """Loads `split` ("train" | "test") of `name` into memory; see module doc."""
  _check_name(name)
  _check_split(split)
  if data_dir is not None:
    data_dir = os.path.expanduser(os.fspath(data_dir))
  if source_dir is not None:
    source_dir = os.path.expanduser(os.fspath(source_dir))
  shape = IMAGE_SHAPES[name]
  failures: list[str] = []
  last_exc: BaseException | None = None

  # 1. stock dataset already prepared.
  stock = None
  try:
    stock = tfds.builder(name, data_dir=data_dir)
    if _is_prepared(stock):
      return _read_builder(stock, split, shape)
    failures.append(f"stock tfds {name!r}: not prepared in {stock.data_dir}")
  except DataError:
    raise
  except Exception as e:  # e.g. tfrecord data and no TensorFlow
    failures.append(f"stock tfds {name!r} (prepared): {type(e).__name__}: {e}")
    last_exc = e

  # 2. offline builder: reuse, or prepare from the original files.
  src = source_dir if source_dir is not None else DEFAULT_SOURCE_DIRS[name]
  try:
    offline = OFFLINE_BUILDERS[name](data_dir=data_dir, source_dir=src)
    if _is_prepared(offline):
      return _read_builder(offline, split, shape)
    if not src:
      missing = "no source_dir given and no default for this dataset"
    elif not os.path.isdir(src):
      missing = f"source_dir {src!r} does not exist"
    else:
      missing = _missing_sources(name, src)
      missing = missing and f"missing {', '.join(missing)} in source_dir {src!r}"
    if not missing:
      t0 = time.perf_counter()
      offline.download_and_prepare()
      log.info("prepared %s from %s in %.1f s", offline.name, src,
               time.perf_counter() - t0)
      return _read_builder(offline, split, shape)
    failures.append(f"offline {offline.name}: {missing}")
  except DataError:
    raise
  except Exception as e:
    failures.append(f"offline jaxcert_{name} from {src!r}: {type(e).__name__}: {e}")
    last_exc = e

  # 3. stock download_and_prepare.
  try:
    stock = stock if stock is not None else tfds.builder(name, data_dir=data_dir)
    _stock_download_and_prepare(stock)
    return _read_builder(stock, split, shape)
  except DataError:
    raise
  except Exception as e:
    failures.append(f"stock tfds {name!r} download_and_prepare: "
                    f"{type(e).__name__}: {e}")
    last_exc = e

  raise DataError(_help(name, data_dir, failures)) from last_exc


# ----------------------------------------------------------- query/candidates


def load_config_split(cfg, split: str) -> Split:
  """The ``split`` of the dataset that ``config.data`` (``cfg``) names: the CBIR
  datasets through :func:`load`, the RetrievalGuard ones through
  :func:`jaxcert.retrieval_data.load_retrieval`, ``folder`` through
  :func:`jaxcert.retrieval_data.load_image_folder` (root ``cfg.source_dir``)."""
  if cfg.name in SUPPORTED:
    return load(cfg.name, split, data_dir=cfg.data_dir, source_dir=cfg.source_dir)
  from jaxcert import retrieval_data  # noqa: PLC0415
  sub = dict(image_size=cfg.image_size, max_per_class=cfg.max_per_class,
             max_classes=cfg.max_classes)
  if cfg.name == "folder":
    if not cfg.source_dir:
      raise DataError("data.name='folder' needs data.source_dir: the root of a "
                      "class-per-folder image tree")
    return retrieval_data.load_image_folder(cfg.source_dir, split,
                                            train_classes=cfg.train_classes, **sub)
  if cfg.name in retrieval_data.RETRIEVAL_DATASETS:
    return retrieval_data.load_retrieval(cfg.name, split, data_dir=cfg.data_dir, **sub)
  raise DataError(f"unknown dataset name {cfg.name!r} (data.name); supported: "
                  f"{', '.join(SUPPORTED + retrieval_data.RETRIEVAL_DATASETS)}, 'folder'")


def config_image_shape(cfg) -> tuple[int, int, int]:
  """(H, W, C) of the images :func:`load_config_split` returns for ``cfg``."""
  if cfg.name in IMAGE_SHAPES:
    return IMAGE_SHAPES[cfg.name]
  return (int(cfg.image_size), int(cfg.image_size), 3)


def query_candidate_split(labels_or_n, num_queries: int, num_candidates: int,
                          seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws disjoint query and candidate index sets from range(N), seeded.

  `labels_or_n` is N, or anything with a length (labels array, Split).
  Returns two sorted int64 arrays of sizes `num_queries`, `num_candidates`
  without common elements; the same seed gives the same arrays.
  """
  if isinstance(labels_or_n, (bool, np.bool_)):
    raise DataError(f"labels_or_n must be a count or a labels array, got {labels_or_n!r}")
  if isinstance(labels_or_n, (int, np.integer)):
    n = int(labels_or_n)
  else:
    try:
      n = len(labels_or_n)
    except TypeError as e:
      raise DataError(f"labels_or_n must be a count or a labels array, got "
                      f"{type(labels_or_n).__name__}") from e
  if n <= 0:
    raise DataError(f"labels_or_n gives N={n} examples; need N > 0")
  nq = _check_count("num_queries", num_queries)
  nc = _check_count("num_candidates", num_candidates)
  if nq + nc > n:
    raise DataError(f"num_queries + num_candidates = {nq} + {nc} = {nq + nc} "
                    f"exceeds the N={n} examples available (data.num_queries, "
                    "data.num_candidates)")
  if (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
      or seed < 0):
    raise DataError(f"seed must be a non-negative integer, got {seed!r}")
  perm = np.random.default_rng(int(seed)).permutation(n)
  return (np.sort(perm[:nq]).astype(np.int64),
          np.sort(perm[nq:nq + nc]).astype(np.int64))


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [0, 1] (x / 255)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise DataError(f"to_float expects uint8 images, got dtype {images.dtype}")
  return images.astype(np.float32) / np.float32(255)
