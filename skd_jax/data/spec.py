"""What every dataset declares, in NumPy only: its class table and how the pipeline reads it.

`DatasetInfo` (names, colours, ignore label) is what models, losses and metrics need to know;
`Dataset` adds the tfds builder, the label lookup table and the manual-directory check that the
pipeline needs. Each dataset module (`cityscapes`, `camvid`, `voc`, `ade20k`) defines one `DATASET`;
`skd_jax.data.datasets` is the registry of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the models, losses and metrics need to know about a segmentation dataset.

  Attributes:
    name: short name, e.g. 'cityscapes'.
    class_names: the C class names, index = train id.
    palette: [C, 3] uint8 RGB colour of each class, for visualisation.
    ignore_label: the label value that marks pixels without a class.
  """
  name: str
  class_names: tuple[str, ...]
  palette: np.ndarray
  ignore_label: int = IGNORE_LABEL

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


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


def colorize(train_ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Colours a train-id map [...] (integer) as RGB [..., 3] uint8; ignored and unknown -> black."""
  train_ids = np.asarray(train_ids)
  num_classes = palette.shape[0]
  # One extra black row catches the ignore label and anything else out of range.
  table = np.concatenate([palette.astype(np.uint8), np.zeros((1, 3), np.uint8)], axis=0)
  index = np.where((train_ids >= 0) & (train_ids < num_classes), train_ids, num_classes)
  return table[index.astype(np.intp)]
