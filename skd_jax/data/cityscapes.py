"""The Cityscapes class table: names, colours, and the label-id -> train-id map.

Cityscapes `*_gtFine_labelIds.png` files hold the 34 raw label ids (0..33); training and evaluation
use the 19 "train ids" of the official benchmark, every other id being ignored (255). The table is
the one in `cityscapesscripts/helpers/labels.py`, pinned in the reference doc (section 6).
"""

from __future__ import annotations

import dataclasses

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


CLASS_NAMES: tuple[str, ...] = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle',
)
NUM_CLASSES = len(CLASS_NAMES)

# Official Cityscapes colours of the 19 train ids (cityscapesscripts labels.py), RGB.
PALETTE = np.array([
    (128, 64, 128),   # road
    (244, 35, 232),   # sidewalk
    (70, 70, 70),     # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),   # traffic light
    (220, 220, 0),    # traffic sign
    (107, 142, 35),   # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),   # sky
    (220, 20, 60),    # person
    (255, 0, 0),      # rider
    (0, 0, 142),      # car
    (0, 0, 70),       # truck
    (0, 60, 100),     # bus
    (0, 80, 100),     # train
    (0, 0, 230),      # motorcycle
    (119, 11, 32),    # bicycle
], dtype=np.uint8)
PALETTE.flags.writeable = False

# Raw Cityscapes label ids, by name (cityscapesscripts labels.py); the synthetic generator draws
# its scenes over these, ignored ids included, so that the real id -> train-id map is exercised.
LABEL_IDS: dict[str, int] = {
    'unlabeled': 0, 'ego vehicle': 1, 'rectification border': 2, 'out of roi': 3, 'static': 4,
    'dynamic': 5, 'ground': 6, 'road': 7, 'sidewalk': 8, 'parking': 9, 'rail track': 10,
    'building': 11, 'wall': 12, 'fence': 13, 'guard rail': 14, 'bridge': 15, 'tunnel': 16,
    'pole': 17, 'polegroup': 18, 'traffic light': 19, 'traffic sign': 20, 'vegetation': 21,
    'terrain': 22, 'sky': 23, 'person': 24, 'rider': 25, 'car': 26, 'truck': 27, 'bus': 28,
    'caravan': 29, 'trailer': 30, 'train': 31, 'motorcycle': 32, 'bicycle': 33,
}

# [19] int: the label id of each train id (for writing test-server PNGs).
TRAIN_ID_TO_LABEL_ID = np.array(
    [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], dtype=np.uint8)
TRAIN_ID_TO_LABEL_ID.flags.writeable = False


def _make_label_id_to_train_id() -> np.ndarray:
  # 256 entries so that any uint8 PNG value indexes it; everything not in the table is ignored.
  lut = np.full((256,), IGNORE_LABEL, dtype=np.uint8)
  lut[TRAIN_ID_TO_LABEL_ID] = np.arange(NUM_CLASSES, dtype=np.uint8)
  lut.flags.writeable = False
  return lut


# [256] uint8 lookup table: train id of each raw label id, 255 for ignored ids.
LABEL_ID_TO_TRAIN_ID = _make_label_id_to_train_id()

CITYSCAPES = DatasetInfo(
    name='cityscapes', class_names=CLASS_NAMES, palette=PALETTE, ignore_label=IGNORE_LABEL)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps raw label ids [...] (any integer dtype) to train ids [...] uint8 (255 = ignored).

  Values outside 0..255 (impossible in a uint8 PNG, but cheap to guard) are ignored too.
  """
  label_ids = np.asarray(label_ids)
  valid = (label_ids >= 0) & (label_ids <= 255)
  train_ids = LABEL_ID_TO_TRAIN_ID[np.where(valid, label_ids, 0).astype(np.intp)]
  return np.where(valid, train_ids, np.uint8(IGNORE_LABEL)).astype(np.uint8)


def colorize(train_ids: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
  """Colours a train-id map [...] (integer) as RGB [..., 3] uint8; ignored and unknown -> black."""
  train_ids = np.asarray(train_ids)
  num_classes = palette.shape[0]
  # One extra black row catches the ignore label and anything else out of range.
  table = np.concatenate([palette.astype(np.uint8), np.zeros((1, 3), np.uint8)], axis=0)
  index = np.where((train_ids >= 0) & (train_ids < num_classes), train_ids, num_classes)
  return table[index.astype(np.intp)]
