"""Retrieval datasets of the RetrievalGuard paper, split by class.

Deep-metric-learning convention (as in the RetrievalGuard paper): train on the
first classes, test on the remaining unseen ones.

* ``stanford_online_products``: 22,634 classes; "train" = labels 0..11317
  (the first 11,318 classes), "test" = 11318..22633;
* ``caltech_birds2011``: 200 classes; "train" = 0..99, "test" = 100..199;
* ``cars196``: 196 classes; "train" = 0..97, "test" = 98..195.

Expected sizes (from the datasets' documentation, not checked here because
the data cannot be downloaded on this machine): SOP 59,551 train / 60,502
test images, CUB-200-2011 5,864 / 5,924, Cars196 8,054 / 8,131. With no
subsampling, :func:`load_retrieval` logs a warning when the sizes differ.

What the tfds builders (tensorflow-datasets 4.9.10) define, from their source:

* ``stanford_online_products`` 1.0.0: ``image`` (``Image``, JPEG bytes as in
  the original files), ``class_id`` (``ClassLabel(num_classes=22634)``, the
  ``class_id`` column of ``Ebay_{train,test}.txt`` minus 1, so 0-based),
  ``super_class_id``, ``super_class_id/num``. tfds splits ``train`` (from
  ``Ebay_train.txt``) and ``test`` (``Ebay_test.txt``). Per the dataset's
  README (Song et al., 2016; the files cannot be checked on this offline
  machine) ``Ebay_train.txt`` holds class ids 1..11318 and ``Ebay_test.txt``
  11319..22634, so tfds' train/test already is the paper's split; labels
  outside a split's range in a prepared copy would be moved by the rule below.
* ``caltech_birds2011`` 0.2.0: ``image``, ``label``
  (``ClassLabel(num_classes=200)``, the ``NNN.`` prefix of the class folder
  minus 1, so 0-based in the original class order), ``label_name``,
  ``image/filename``, ``bbox``, ``segmentation_mask``. tfds splits ``train``
  / ``test`` follow ``train_test_split.txt``: every class is in both, NOT
  class-disjoint.
* ``cars196`` 2.1.0: ``image``, ``label`` (``ClassLabel(names=...)`` in the
  devkit's class order: original class ``c`` -> label ``c - 1``), ``bbox``,
  ``id``. tfds splits ``train`` / ``test`` (cars_train / cars_test): every
  class is in both, NOT class-disjoint.

The same rule serves all three: the examples of all tfds splits (``train``
then ``test``, each in record order) are pooled and split by label with
:func:`class_split` (for SOP this reproduces tfds' own split). Labels are then
re-indexed to ``0..C-1`` within the split, in the order of the original labels.

Reading (no TensorFlow): ``builder.as_data_source(split,
deserialize_method=RAW_BYTES)`` on a dataset prepared as array_record gives
the serialized ``tf.train.Example`` records; a first pass parses only the label
(tfds' bundled protobuf, as :mod:`jaxcert.data` does), a second pass decodes
the selected images with Pillow (the encoded JPEG/PNG bytes, not tfds'
decoder, so that CUB's segmentation masks are not decoded too). Images are
converted to RGB, the shorter side resized to ``image_size`` (bilinear,
Pillow's antialiased resize; the longer side ``int(image_size * long /
short)``) and centre-cropped to ``image_size`` x ``image_size`` (offsets
``int(round((side - image_size) / 2))``): the same as torchvision's
``Resize(image_size)`` + ``CenterCrop(image_size)``. A dataset prepared as
tfrecord cannot be read without TensorFlow and raises :class:`DataError`.

Under ``tfds.testing.mock_data`` (``is_prepared()`` is always False there;
RAW_BYTES would need TF to encode the fake images) the default decode is used:
random uint8 images of random sizes and random labels in the ClassLabel range,
identical for every tfds split (the mock seeds by index).

Memory: the result is one uint8 array. SOP "test" (60,502 images) at 224 px is
60,502 * 224 * 224 * 3 bytes = 9.1 GB, "train" 9.0 GB; CUB/Cars < 1.3 GB.
Use ``max_per_class`` / ``max_classes`` (or a smaller ``image_size``) on small
machines. Records are read in chunks, so nothing else of that size is held.

:func:`load_image_folder` is an offline alternative: ``root/<class>/<image>``
folders (e.g. an export of one of these datasets), split by class the same way.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from jaxcert import data

__all__ = [
    "IMAGE_EXTENSIONS",
    "RETRIEVAL_DATASETS",
    "RetrievalSpec",
    "SPECS",
    "class_split",
    "image_folder_classes",
    "load_image_folder",
    "load_retrieval",
    "resize_center_crop",
]

log = logging.getLogger(__name__)

RETRIEVAL_DATASETS = ("stanford_online_products", "caltech_birds2011", "cars196")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

_LABEL_CHUNK = 512  # records per read in the label pass
_IMAGE_CHUNK = 256  # records per read in the image pass
_BIG_BYTES = 4 << 30  # log a warning above this result size


@dataclasses.dataclass(frozen=True)
class RetrievalSpec:
  """A tfds retrieval dataset: feature keys and the paper's class split."""

  name: str
  image_key: str
  label_key: str
  num_classes: int
  num_train_classes: int
  tfds_splits: tuple[str, ...]
  expected_sizes: dict[str, int]  # from the literature; only logged


SPECS: dict[str, RetrievalSpec] = {
    "stanford_online_products": RetrievalSpec(
        "stanford_online_products", "image", "class_id", 22634, 11318,
        ("train", "test"), {"train": 59551, "test": 60502}),
    "caltech_birds2011": RetrievalSpec(
        "caltech_birds2011", "image", "label", 200, 100,
        ("train", "test"), {"train": 5864, "test": 5924}),
    "cars196": RetrievalSpec(
        "cars196", "image", "label", 196, 98,
        ("train", "test"), {"train": 8054, "test": 8131}),
}


# ----------------------------------------------------------------- arguments


def _optional_count(arg: str, value) -> int | None:
  return None if value is None else data._check_count(arg, value)


def _check_retrieval_name(name) -> RetrievalSpec:
  if not isinstance(name, str) or name not in SPECS:
    raise data.DataError(f"unknown retrieval dataset name {name!r}; supported: "
                         f"{', '.join(map(repr, RETRIEVAL_DATASETS))} (or "
                         "load_image_folder for class-per-folder images)")
  return SPECS[name]


# ------------------------------------------------------------- split by class


def class_split(labels, num_train_classes: int, split: str, *,
                max_classes: int | None = None,
                max_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Selects the examples of `split` by class and re-indexes their labels.

  "train" keeps the examples with label < `num_train_classes`, "test" those
  with label >= `num_train_classes`. Then, deterministically, `max_classes`
  keeps only the `max_classes` smallest labels present, and `max_per_class` the
  first `max_per_class` examples (in input order) of each class. Labels are
  re-indexed to 0..C-1 in the order of the original labels (C = number of
  classes kept; with all classes present this is label - offset).

  Args:
    labels: 1-D non-negative integer class ids.
    num_train_classes: number of leading classes that form "train" (> 0).
    split: "train" or "test".
    max_classes: None or a positive count of classes to keep.
    max_per_class: None or a positive count of examples per class to keep.

  Returns:
    (indices, new_labels): int64 indices into `labels`, ascending, and int32
    labels in 0..C-1 of the same length. Both may be empty.
  """
  data._check_split(split)
  k = data._check_count("num_train_classes", num_train_classes)
  max_classes = _optional_count("max_classes", max_classes)
  max_per_class = _optional_count("max_per_class", max_per_class)
  lab = np.asarray(labels)
  if lab.ndim != 1 or not (lab.size == 0 or np.issubdtype(lab.dtype, np.integer)):
    raise data.DataError(f"labels must be a 1-D integer array, got {lab.dtype} "
                         f"{lab.shape}")
  lab = lab.astype(np.int64)
  if lab.size and lab.min() < 0:
    raise data.DataError(f"labels must be non-negative, got {lab.min()}")
  keep = lab < k if split == "train" else lab >= k
  idx = np.flatnonzero(keep).astype(np.int64)
  classes, inverse = np.unique(lab[idx], return_inverse=True)
  if max_classes is not None and classes.size > max_classes:
    sel = inverse < max_classes
    idx, inverse = idx[sel], inverse[sel]
  if max_per_class is not None and idx.size:
    # Rank of each example within its class, in input order (stable sort).
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - np.repeat(starts, counts)
    sel = rank < max_per_class
    idx, inverse = idx[sel], inverse[sel]
  # `inverse` is still dense: max_classes keeps ranks 0..max_classes-1 and
  # max_per_class leaves every class at least one example.
  return idx, np.asarray(inverse, np.int32).reshape(-1)


# --------------------------------------------------------------------- images


def resize_center_crop(image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
  """RGB, shorter side -> `image_size` (bilinear), centre crop; uint8 [S, S, 3].

  Matches torchvision's ``Resize(image_size)`` + ``CenterCrop(image_size)`` on
  PIL images. Greyscale, palette, RGBA (alpha dropped, not composited), CMYK
  and 16-bit images are converted with ``Image.convert("RGB")``.
  """
  size = data._check_count("image_size", image_size)
  if isinstance(image, np.ndarray):
    arr = image
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    image = Image.fromarray(np.ascontiguousarray(arr))
  if image.mode != "RGB":
    image = image.convert("RGB")
  w, h = image.size
  if w <= h:
    ow, oh = size, int(size * h / w)
  else:
    ow, oh = int(size * w / h), size
  if (ow, oh) != (w, h):
    image = image.resize((ow, oh), Image.Resampling.BILINEAR)
  top = int(round((oh - size) / 2.0))
  left = int(round((ow - size) / 2.0))
  out = np.asarray(image, np.uint8)[top:top + size, left:left + size]
  if out.shape != (size, size, 3):  # cannot happen: oh, ow >= size
    raise data.DataError(f"resize_center_crop produced {out.shape}")
  return out


def _decode_file(path: str, image_size: int) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im.load()
      return resize_center_crop(im, image_size)
  except data.DataError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # UnidentifiedImageError and "image file is truncated" are OSErrors.
    raise data.DataError(f"cannot read image file {path}: {type(e).__name__}: "
                         f"{e} (corrupt or not an image?)") from e


def _decode_bytes(encoded: bytes, image_size: int, what: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(encoded)) as im:
      im.load()
      return resize_center_crop(im, image_size)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise data.DataError(f"{what}: cannot decode image: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------- tfds reading


def _help_not_prepared(spec: RetrievalSpec, builder, data_dir) -> str:
  name = spec.name
  return (
      f"retrieval dataset {name!r} is not prepared in {builder.data_dir} "
      f"(data_dir={data_dir!r}). It cannot be downloaded on this machine "
      "(offline), and preparing the stock tfds builder needs TensorFlow. "
      "Prepare it on a machine with internet and TensorFlow, in the "
      "array_record format (readable here without TensorFlow):\n"
      f"  tfds build {name} --data_dir=DIR --file_format=array_record\n"
      f"or in Python: tfds.builder({name!r}, data_dir=DIR)"
      ".download_and_prepare(file_format='array_record')\n"
      f"then copy DIR/{name}/ here and pass data_dir=DIR (the directory that "
      f"contains {name}/{builder.version}/; config key data.data_dir). A copy "
      "prepared as tfrecord can be converted there with `tfds convert_format "
      f"--dataset_dir=DIR/{name} --out_file_format=array_record`. Alternatively, "
      "export the images as root/<class_name>/*.jpg folders (classes sorted by "
      "name in the original class order) and use "
      "jaxcert.retrieval_data.load_image_folder(root, split, "
      f"train_classes={spec.num_train_classes}).")


def _data_source(builder, split: str, raw: bool):
  what = f"{builder.name} {split} in {builder.data_dir}"
  try:
    if raw:
      return builder.as_data_source(
          split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    return builder.as_data_source(split)
  except (NotImplementedError, ValueError) as e:
    raise data.DataError(
        f"{what}: cannot be read without TensorFlow ({type(e).__name__}: {e}). "
        "It must be prepared with file_format='array_record'; convert it on a "
        f"machine with TensorFlow: tfds convert_format --dataset_dir="
        f"<data_dir>/{builder.name} --out_file_format=array_record") from e


def _parse_label(rec: bytes, key: str, what: str) -> int:
  try:
    return int(tf_example_pb2.Example.FromString(rec).features.feature[key]
               .int64_list.value[0])
  except Exception as e:  # DecodeError, IndexError: not the expected layout
    raise data.DataError(f"{what}: record without int64 feature {key!r} "
                         f"({e!r})") from e


def _parse_image(rec: bytes, key: str, what: str) -> bytes:
  try:
    return tf_example_pb2.Example.FromString(rec).features.feature[key].bytes_list.value[0]
  except Exception as e:
    raise data.DataError(f"{what}: record without bytes feature {key!r} "
                         f"({e!r})") from e


def _read_labels(ds, spec: RetrievalSpec, raw: bool, what: str) -> np.ndarray:
  n = len(ds)
  labels = np.empty((n,), np.int64)
  for start in range(0, n, _LABEL_CHUNK):
    stop = min(n, start + _LABEL_CHUNK)
    exs = data._getitems(ds, list(range(start, stop)))
    if raw:
      labels[start:stop] = [_parse_label(r, spec.label_key, what) for r in exs]
    else:
      labels[start:stop] = [int(ex[spec.label_key]) for ex in exs]
  if n and (labels.min() < 0 or labels.max() >= spec.num_classes):
    raise data.DataError(f"{what}: {spec.label_key!r} values span "
                         f"{labels.min()}..{labels.max()}, expected "
                         f"0..{spec.num_classes - 1}")
  return labels


def _fill_images(out: np.ndarray, dest: np.ndarray, ds, keys: np.ndarray,
                 spec: RetrievalSpec, raw: bool, image_size: int, what: str) -> None:
  for start in range(0, keys.size, _IMAGE_CHUNK):
    chunk = keys[start:start + _IMAGE_CHUNK]
    exs = data._getitems(ds, [int(k) for k in chunk])
    for d, k, ex in zip(dest[start:start + _IMAGE_CHUNK], chunk, exs, strict=True):
      if raw:
        out[d] = _decode_bytes(_parse_image(ex, spec.image_key, what),
                               image_size, f"{what} record {k}")
      else:
        out[d] = resize_center_crop(np.asarray(ex[spec.image_key]), image_size)


def load_retrieval(name: str, split: str, *, image_size: int = 224,
                   data_dir: str | os.PathLike | None = None,
                   max_per_class: int | None = None,
                   max_classes: int | None = None) -> data.Split:
  """Loads the paper's `split` ("train" | "test") of a tfds retrieval dataset.

  Reads a copy prepared (elsewhere) as array_record in `data_dir`; never
  downloads. See the module doc for the split, the image pipeline and memory:
  SOP "test" at 224 px is 9.1 GB; use `max_per_class` / `max_classes` on CPU.

  Args:
    name: one of :data:`RETRIEVAL_DATASETS`.
    split: "train" (the first 11,318 / 100 / 98 classes) or "test" (the rest).
    image_size: output side S; images are resized + centre-cropped to S x S.
    data_dir: tfds data dir holding ``<name>/<version>/``; None: tfds default.
    max_per_class: keep at most this many images per class (the first ones in
      tfds record order, train split records before test split records).
    max_classes: keep only this many classes (the ones with smallest labels).

  Returns:
    :class:`jaxcert.data.Split`: uint8 images [N, S, S, 3], int32 labels in
    0..C-1 (re-indexed within the split, in original class order).

  Raises:
    jaxcert.data.DataError: bad arguments, dataset not prepared (with how to
      prepare it), not readable without TensorFlow, or corrupt records.
  """
  spec = _check_retrieval_name(name)
  data._check_split(split)
  image_size = data._check_count("image_size", image_size)
  max_per_class = _optional_count("max_per_class", max_per_class)
  max_classes = _optional_count("max_classes", max_classes)
  if data_dir is not None:
    data_dir = os.path.expanduser(os.fspath(data_dir))

  mocked = data._tfds_is_mocked()
  builder = tfds.builder(name, data_dir=data_dir)
  if not mocked and not data._is_prepared(builder):
    raise data.DataError(_help_not_prepared(spec, builder, data_dir))
  raw = not mocked  # RAW_BYTES under the mock would need TF to encode images
  if not mocked:
    missing = [s for s in spec.tfds_splits if s not in builder.info.splits]
    if missing:
      raise data.DataError(
          f"{name} in {builder.data_dir} has splits "
          f"{sorted(builder.info.splits)}, expected {list(spec.tfds_splits)}")

  # Pass 1: labels of every tfds split, pooled in a fixed order.
  sources, labels, origin = [], [], []
  for s in spec.tfds_splits:
    what = f"{name} tfds split {s!r} in {builder.data_dir}"
    ds = _data_source(builder, s, raw)
    lab = _read_labels(ds, spec, raw, what)
    sources.append((ds, what))
    labels.append(lab)
    origin.append(np.full(lab.shape, len(sources) - 1, np.int64))
  pooled = np.concatenate(labels)
  src = np.concatenate(origin)
  pos = np.concatenate([np.arange(lab.size, dtype=np.int64) for lab in labels])
  idx, new_labels = class_split(pooled, spec.num_train_classes, split,
                                max_classes=max_classes, max_per_class=max_per_class)
  if idx.size == 0:
    raise data.DataError(f"{name} {split!r}: no examples (from "
                         f"{pooled.size} records in {builder.data_dir}) "
                         f"with max_classes={max_classes}")
  expected = spec.expected_sizes[split]
  if not mocked and max_classes is None and max_per_class is None and idx.size != expected:
    log.warning("%s %s: %d images, the dataset's documentation says %d",
                name, split, idx.size, expected)
  nbytes = idx.size * image_size * image_size * 3
  if nbytes > _BIG_BYTES:
    log.warning("%s %s: allocating %.1f GB for %d images at %d px (use "
                "max_per_class / max_classes / image_size to reduce)",
                name, split, nbytes / 1e9, idx.size, image_size)

  # Pass 2: decode the selected images, one tfds split at a time, in chunks.
  images = np.empty((idx.size, image_size, image_size, 3), np.uint8)
  for j, (ds, what) in enumerate(sources):
    dest = np.flatnonzero(src[idx] == j)
    _fill_images(images, dest, ds, pos[idx[dest]], spec, raw, image_size, what)
  return data.Split(images, new_labels)


# ------------------------------------------------------------- folder source


def _scan_folder(root: str) -> tuple[list[str], list[list[str]]]:
  """Class names (sorted) and, per class, its image files (sorted by name)."""
  if not os.path.exists(root):
    raise data.DataError(f"root {root!r} does not exist (expected "
                         "root/<class_name>/<image files>)")
  if not os.path.isdir(root):
    raise data.DataError(f"root {root!r} is not a directory")
  classes = sorted(e.name for e in os.scandir(root)
                   if e.is_dir() and not e.name.startswith("."))
  if not classes:
    raise data.DataError(f"root {root!r} has no class folders (expected "
                         f"root/<class_name>/*{{{','.join(IMAGE_EXTENSIONS)}}})")
  files = []
  for c in classes:
    d = os.path.join(root, c)
    found = sorted(e.name for e in os.scandir(d)
                   if e.is_file() and not e.name.startswith(".")
                   and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    if not found:
      raise data.DataError(f"class folder {d!r} has no images (allowed "
                           f"extensions, any case: {', '.join(IMAGE_EXTENSIONS)})")
    files.append([os.path.join(d, f) for f in found])
  return classes, files


def image_folder_classes(root: str | os.PathLike) -> list[str]:
  """The class names of a :func:`load_image_folder` tree, in label order."""
  return _scan_folder(os.path.expanduser(os.fspath(root)))[0]


def load_image_folder(root: str | os.PathLike, split: str, *, image_size: int = 224,
                      train_classes: int | None = None,
                      max_per_class: int | None = None,
                      max_classes: int | None = None) -> data.Split:
  """Loads `split` of a class-per-folder image tree, split by class.

  Layout: ``root/<class_name>/*.{jpg,jpeg,png,bmp}`` (extensions in any case;
  sub-folders, other files and names starting with "." are ignored). Classes
  are sorted by folder name (Python string order) and numbered 0..K-1; files
  within a class are sorted by name. The first `train_classes` classes form
  "train", the others "test" (the paper's convention); labels are re-indexed
  to 0..C-1 within the split. Images: RGB (greyscale, palette and RGBA
  converted, alpha dropped), resized + centre-cropped as in
  :func:`resize_center_crop`. Only the images of the split are decoded.

  Args:
    root: the folder holding one sub-folder per class.
    split: "train" or "test".
    image_size: output side S.
    train_classes: number of leading classes in "train", 1..K-1; None: K // 2.
    max_per_class: keep at most this many images per class (first by name).
    max_classes: keep only the first this many classes of the split.

  Returns:
    :class:`jaxcert.data.Split`: uint8 [N, S, S, 3], int32 labels [N].

  Raises:
    jaxcert.data.DataError: missing root, no class folders, a class without
      images, a corrupt image (named), `train_classes` out of range, or other
      bad arguments.
  """
  data._check_split(split)
  image_size = data._check_count("image_size", image_size)
  max_per_class = _optional_count("max_per_class", max_per_class)
  max_classes = _optional_count("max_classes", max_classes)
  root = os.path.expanduser(os.fspath(root))
  classes, files = _scan_folder(root)
  k = len(classes)
  if k < 2:
    raise data.DataError(f"root {root!r} has {k} class folder ({classes[0]!r}); "
                         "a split by class needs at least 2")
  if train_classes is None:
    train_classes = k // 2
  elif (isinstance(train_classes, (bool, np.bool_))
        or not isinstance(train_classes, (int, np.integer))
        or not 1 <= train_classes <= k - 1):
    raise data.DataError(f"train_classes must be an integer in [1, {k - 1}] for "
                         f"the {k} class folders in {root!r}, got {train_classes!r}")
  paths = [p for ps in files for p in ps]
  labels = np.repeat(np.arange(k), [len(ps) for ps in files])
  idx, new_labels = class_split(labels, int(train_classes), split,
                                max_classes=max_classes, max_per_class=max_per_class)
  images = np.empty((idx.size, image_size, image_size, 3), np.uint8)
  for i, j in enumerate(idx):
    images[i] = _decode_file(paths[j], image_size)
  return data.Split(images, new_labels)
