"""The tfds builder of the datasets written here, and the helpers that read manual directories.

Each dataset is prepared once by a tensorflow-datasets builder from its manual directory (the files
as downloaded) into ArrayRecord, then read by `skd_jax.data.pipeline` without the builder's image
features: the encoded image and label are fetched as bytes and decoded with TensorFlow, and the
label values stored on disk are mapped to train ids by the dataset's lookup table at read time.

The builders written here (`SegmentationBuilder` subclasses: `camvid`, `voc`, `ade20k`) store each
image as the bytes of the
downloaded file when TensorFlow decodes it exactly as PIL / OpenCV do (RGB or grey JPEG and PNG;
anything else is re-encoded as an RGB PNG), which keeps the prepared data as small as the download;
labels are stored as 8-bit grey PNGs of the raw values of the dataset (VOC's palette PNGs and SBD's
MATLAB files are converted; grey PNGs are kept as they are). The range of image sizes of each split
is recorded in the dataset's metadata, so that evaluation can pad images of varying sizes to one
shape without reading the split first. (Cityscapes uses tfds's own builder.)
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

# Metadata key of the per-split image sizes: {split: {'max': [H, W], 'uniform': bool}}.
IMAGE_SIZES_KEY = 'image_sizes'



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
