"""The datasets the input pipeline reads: name -> class table, tfds builder, label map, checks.

Each dataset is prepared once by a tensorflow-datasets builder from its manual directory (the files
as downloaded) into ArrayRecord, then read by `skd_jax.data.pipeline` without the builder's image
features: the encoded image and label are fetched as bytes and decoded with TensorFlow, and the
label values stored on disk are mapped to train ids by the dataset's lookup table at read time.

    name          tfds builder                       manual directory
    cityscapes    cityscapes/semantic_segmentation   the two official zips (tfds's own builder)
    camvid        camvid                             SegNet's CamVid folders (skd_jax.data.camvid)
    voc           voc2012_aug                        VOCdevkit + SBD (skd_jax.data.voc)
    ade20k        ade20k                             ADEChallengeData2016 (skd_jax.data.ade20k)

The builders written here (`SegmentationBuilder` subclasses) store each image as the bytes of the
downloaded file when TensorFlow decodes it exactly as PIL / OpenCV do (RGB or grey JPEG and PNG;
anything else is re-encoded as an RGB PNG), which keeps the prepared data as small as the download;
labels are stored as 8-bit grey PNGs of the raw values of the dataset (VOC's palette PNGs and SBD's
MATLAB files are converted; grey PNGs are kept as they are). The range of image sizes of each split
is recorded in the dataset's metadata, so that evaluation can pad images of varying sizes to one
shape without reading the split first.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from skd_jax.data import cityscapes

DatasetInfo = cityscapes.DatasetInfo
IGNORE_LABEL = cityscapes.IGNORE_LABEL
# Metadata key of the per-split image sizes: {split: {'max': [H, W], 'uniform': bool}}.
IMAGE_SIZES_KEY = 'image_sizes'


@dataclasses.dataclass(frozen=True)
class Dataset:
  """How the pipeline prepares and reads one dataset.

  Attributes:
    info: the class table (names, colours, ignore label).
    builder_name: the tfds builder, e.g. 'camvid'.
    label_lut: [256] uint8, the train id of each stored label value (255 = ignored).
    check_manual_dir: raises FileNotFoundError / ValueError naming what is missing or malformed
      in a manual directory, and where it was searched (its return value is ignored).
    image_key, label_key, id_key: feature names of the encoded image, the encoded label map and
      the image id in the builder's examples.
    void_values: stored label values that the dataset's table lists and ignores on purpose
      (Cityscapes' void classes, VOC's 255 borders, ...); with those of `label_lut`'s classes
      they are the values its labels may hold (`known_values`).
    source_files: (manual directory, tfds split, image id) -> where the image and the label map
      of an example came from (a file, or ``archive.zip:member``), for messages; None: the
      paths of the pairs that `check_manual_dir` returns.
  """
  info: DatasetInfo
  builder_name: str
  label_lut: np.ndarray
  check_manual_dir: Callable[[str], Any]
  image_key: str = 'image'
  label_key: str = 'label'
  id_key: str = 'image_id'
  void_values: tuple[int, ...] = ()
  source_files: Callable[[str, str, str], tuple[str, str]] | None = None

  def known_values(self) -> np.ndarray:
    """[256] bool: the stored label values of the dataset's table (classes and void)."""
    known = self.label_lut != IGNORE_LABEL
    known[list(self.void_values)] = True
    return known

  def sources(self, manual_dir: str) -> Callable[[str, str], tuple[str, str]]:
    """(tfds split, image id) -> (image source, label source); the id itself if not found."""
    if self.source_files is not None:
      return functools.partial(self.source_files, manual_dir)
    try:
      by_split = self.check_manual_dir(manual_dir) or {}
      pairs = {(split, pair.image_id): (pair.image_path, pair.label_path)
               for split, split_pairs in by_split.items() for pair in split_pairs}
    except (OSError, ValueError):   # the downloads have moved since preparation
      pairs = {}
    unknown = lambda split, image_id: (f'image {image_id} of split {split}',
                                       f'label map of {image_id} of split {split}')
    return lambda split, image_id: pairs.get((split, image_id)) or unknown(split, image_id)


# ---------------------------------------------------------------------------------------------
# Class tables.


def make_lut(train_id_of: dict[int, int]) -> np.ndarray:
  """[256] uint8 read-only lookup table: stored value -> train id; values not given -> 255."""
  lut = np.full((256,), IGNORE_LABEL, np.uint8)
  for value, train_id in train_id_of.items():
    lut[value] = train_id
  lut.flags.writeable = False
  return lut


def frozen_palette(colours: Sequence[Sequence[int]]) -> np.ndarray:
  """[C, 3] uint8 read-only RGB palette."""
  palette = np.array(colours, dtype=np.uint8)
  if palette.ndim != 2 or palette.shape[1] != 3:
    raise ValueError(f'a palette is [C, 3] RGB, got shape {palette.shape}')
  palette.flags.writeable = False
  return palette


# ---------------------------------------------------------------------------------------------
# Manual directories.


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example's files: absolute paths of its image and label map."""
  image_id: str
  image_path: str
  label_path: str


def require(manual_dir: str, relative_paths: Sequence[str], *, dataset: str,
            how_to_get: str) -> None:
  """Raises FileNotFoundError unless every path (file or folder) exists under `manual_dir`.

  The message names the first missing path, how many are missing, the directory searched and
  what to download.
  """
  manual_dir = os.fspath(manual_dir)
  if not tf.io.gfile.isdir(manual_dir):
    raise FileNotFoundError(
        f'{dataset} manual directory {manual_dir} does not exist: it must hold '
        f'{", ".join(relative_paths)}. {how_to_get}')
  missing = [p for p in relative_paths if not tf.io.gfile.exists(os.path.join(manual_dir, p))]
  if missing:
    others = f' (and {len(missing) - 1} more: {", ".join(missing[1:4])}...)' if missing[1:] else ''
    raise FileNotFoundError(
        f'{dataset}: {missing[0]} not found in the manual directory {manual_dir} (searched for '
        f'{os.path.join(manual_dir, missing[0])}){others}. {how_to_get}')


def require_files(manual_dir: str, pairs: Sequence[Pair], *, dataset: str,
                  how_to_get: str) -> None:
  """Raises FileNotFoundError unless the image and label of every pair exist."""
  paths = [p for pair in pairs for p in (pair.image_path, pair.label_path)]
  require(manual_dir, [os.path.relpath(p, manual_dir) for p in paths], dataset=dataset,
          how_to_get=how_to_get)


def read_ids(path: str) -> list[str]:
  """The image ids of a split list (one id a line, as in VOC and SBD), in file order."""
  with tf.io.gfile.GFile(path, 'r') as f:
    return [line.strip() for line in f if line.strip()]


def paired_files(manual_dir: str, image_dir: str, label_dir: str, *, image_ext: str,
                 label_ext: str, dataset: str, how_to_get: str) -> list[Pair]:
  """Every `image_dir/<id><image_ext>` with its `label_dir/<id><label_ext>`, sorted by id.

  Both directories are relative to `manual_dir`. Raises FileNotFoundError when `image_dir` has no
  image or an image has no label file.
  """
  image_root = os.path.join(manual_dir, image_dir)
  label_root = os.path.join(manual_dir, label_dir)
  ids = sorted(name[:-len(image_ext)] for name in tf.io.gfile.listdir(image_root)
               if name.endswith(image_ext))
  if not ids:
    raise FileNotFoundError(f'{dataset}: no *{image_ext} image in {image_root}. {how_to_get}')
  labels = set(tf.io.gfile.listdir(label_root))
  missing = [i for i in ids if i + label_ext not in labels]
  if missing:
    raise FileNotFoundError(
        f'{dataset}: {len(missing)} image(s) of {image_root} have no label file in {label_root}, '
        f'e.g. {missing[0]}{image_ext} (searched for '
        f'{os.path.join(label_root, missing[0] + label_ext)}). {how_to_get}')
  return [Pair(i, os.path.join(image_root, i + image_ext), os.path.join(label_root, i + label_ext))
          for i in ids]


# ---------------------------------------------------------------------------------------------
# Encoding for the builders.


def _read_bytes(path: str) -> bytes:
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def image_bytes(path: str) -> tuple[bytes, tuple[int, int]]:
  """(encoded image, (height, width)): the file's own bytes when TensorFlow decodes them exactly
  (RGB or grey JPEG / PNG), else an RGB PNG of what PIL decodes (CMYK JPEGs, palettes, alpha)."""
  data = _read_bytes(path)
  try:
    image = Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises several types for unreadable files.
    raise ValueError(f'{path} is not an image PIL can read ({e}); is it a partial download?') from e
  width, height = image.size
  if image.format in ('JPEG', 'PNG') and image.mode in ('RGB', 'L'):
    return data, (height, width)
  return _png(np.asarray(image.convert('RGB'))), (height, width)


def label_png(label: np.ndarray | str) -> tuple[bytes, tuple[int, int]]:
  """(grey PNG of the raw label values, (height, width)) from a [H, W] array or a PNG file.

  An 8-bit grey PNG file is kept as it is; a palette PNG (VOC) becomes the grey PNG of its
  indices. Anything else (RGB, 16-bit) is an error: such a file holds colours, not label values.
  """
  if isinstance(label, str):
    data = _read_bytes(label)
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if image.format == 'PNG' and image.mode == 'L':
      return data, (height, width)
    if image.mode not in ('L', 'P'):
      raise ValueError(
          f'{label} is a {image.mode} image: a label map must be an 8-bit grey or palette PNG of '
          'class indices (is this a colour visualisation instead of the annotation?).')
    label = np.asarray(image)
  label = np.asarray(label)
  if label.ndim != 2 or label.dtype != np.uint8:
    raise ValueError(f'a label map is [H, W] uint8, got {label.dtype} {label.shape}')
  return _png(label), label.shape


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder of (image, label map) pairs read from a manual directory.

  Features: 'image' (encoded RGB or grey image, see `image_bytes`), 'label' (grey PNG of the raw
  label values), 'image_id' (file name without extension). Subclasses set `name`, VERSION,
  RELEASE_NOTES, MANUAL_DOWNLOAD_INSTRUCTIONS, IMAGE_FORMAT and HOMEPAGE, and `find_examples`
  (a staticmethod: manual directory -> {tfds split: its pairs}, raising FileNotFoundError naming
  what is missing; the same function serves as the dataset's `Dataset.check_manual_dir`);
  `read_label` reads one label file (default: a PNG).
  """
  IMAGE_FORMAT = 'png'
  HOMEPAGE = ''
  find_examples: Callable[[str], dict[str, list[Pair]]]

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, pairs)
            for split, pairs in self.find_examples(os.fspath(dl_manager.manual_dir)).items()}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.MANUAL_DOWNLOAD_INSTRUCTIONS,
        homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=self.IMAGE_FORMAT),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'image_id': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def read_label(self, path: str) -> tuple[bytes, tuple[int, int]]:
    """(grey PNG of the raw label values, (height, width)) of one label file."""
    return label_png(path)

  def _generate_examples(self, split: str, pairs: Sequence[Pair]) -> Iterator[tuple[str, dict]]:
    max_size = np.zeros((2,), np.int64)
    sizes = set()
    for pair in pairs:
      image, image_size = image_bytes(pair.image_path)
      label, label_size = self.read_label(pair.label_path)
      if tuple(image_size) != tuple(label_size):
        raise ValueError(
            f'{pair.label_path} is {label_size[0]}x{label_size[1]} but its image '
            f'{pair.image_path} is {image_size[0]}x{image_size[1]} (height x width): a label map '
            'must have the size of its image.')
      max_size = np.maximum(max_size, image_size)
      sizes.add(tuple(image_size))
      yield pair.image_id, {'image': image, 'label': label, 'image_id': pair.image_id}
    # Written with dataset_info.json once every split has been generated.
    self.info.metadata.setdefault(IMAGE_SIZES_KEY, {})[split] = {
        'max': [int(s) for s in max_size], 'uniform': len(sizes) <= 1}


# ---------------------------------------------------------------------------------------------
# The registry.


def _check_cityscapes(manual_dir: str) -> None:
  # The Cityscapes check lives with its tfds plumbing; imported here, since pipeline imports this.
  from skd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.check_manual_dir(manual_dir)


def _cityscapes_sources(manual_dir: str, split: str, image_id: str) -> tuple[str, str]:
  # The tfds builder's file naming: <top>/<split>/<city>/<city>_<seq>_<frame>_<suffix>.png.
  folder = {'validation': 'val'}.get(split, split)
  stem = f'{folder}/{image_id.split("_")[0]}/{image_id}'
  return (f'{os.path.join(manual_dir, "leftImg8bit_trainvaltest.zip")}:'
          f'leftImg8bit/{stem}_leftImg8bit.png',
          f'{os.path.join(manual_dir, "gtFine_trainvaltest.zip")}:'
          f'gtFine/{stem}_gtFine_labelIds.png')


@functools.cache
def _registry() -> dict[str, Dataset]:
  # Imported on first use: those modules build on the helpers above.
  # pylint: disable-next=g-import-not-at-top
  from skd_jax.data import ade20k, camvid, voc
  citys = Dataset(
      info=cityscapes.CITYSCAPES, builder_name='cityscapes/semantic_segmentation',
      label_lut=cityscapes.LABEL_ID_TO_TRAIN_ID, check_manual_dir=_check_cityscapes,
      image_key='image_left', label_key='segmentation_label',
      void_values=tuple(sorted(i for i in cityscapes.LABEL_IDS.values()
                               if i >= 0 and cityscapes.LABEL_ID_TO_TRAIN_ID[i] == IGNORE_LABEL)),
      source_files=_cityscapes_sources)
  return {spec.info.name: spec for spec in (citys, camvid.DATASET, voc.DATASET, ade20k.DATASET)}


def names() -> tuple[str, ...]:
  """The registered dataset names."""
  return tuple(_registry())


def get(name: str) -> Dataset:
  """The registered dataset `name` (config.data.dataset); its tfds builder is then registered."""
  registry = _registry()
  if name not in registry:
    raise ValueError(f'unknown dataset {name!r} (config.data.dataset): expected one of '
                     f'{", ".join(registry)}')
  return registry[name]
