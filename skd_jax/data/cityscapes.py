"""Cityscapes: the class table, the label-id -> train-id map, and the manual directory's archives.

Cityscapes `*_gtFine_labelIds.png` files hold the 34 raw label ids (0..33); training and evaluation
use the 19 "train ids" of the official benchmark, every other id being ignored (255). The table is
the one in `cityscapesscripts/helpers/labels.py`, pinned in the reference doc (section 6). The
splits are prepared by tfds's own builder `cityscapes/semantic_segmentation` from the two official
archives (`check_manual_dir` checks them first).
"""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np
import tensorflow as tf

from skd_jax.data import spec
from skd_jax.data.spec import IGNORE_LABEL

CLASS_NAMES: tuple[str, ...] = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle',
)
NUM_CLASSES = len(CLASS_NAMES)

# Official Cityscapes colours of the 19 train ids (cityscapesscripts labels.py), RGB.
PALETTE = spec.frozen_palette([
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
])

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

CITYSCAPES = spec.DatasetInfo(
    name='cityscapes', class_names=CLASS_NAMES, palette=PALETTE, ignore_label=IGNORE_LABEL)


# ---------------------------------------------------------------------------------------------
# The manual directory.

# The archives the builder reads from the manual directory, and each one's top folder.
LEFT_IMAGE_ZIP = 'leftImg8bit_trainvaltest.zip'
GT_FINE_ZIP = 'gtFine_trainvaltest.zip'
CITYSCAPES_ZIPS = {LEFT_IMAGE_ZIP: 'leftImg8bit', GT_FINE_ZIP: 'gtFine'}
_SPLIT_DIRS = ('train', 'val', 'test')
# The builder's own pattern for image file names (cityscapes_dataset_builder.py); a name that does
# not match (e.g. an upper-case city folder) fails deep inside tfds, so it is checked up front.
_LEFT_IMAGE_RE = re.compile(r'leftImg8bit/(train|val|test)/([^/]+)/([a-z\-]+)_(\d+)_(\d+)'
                            r'_leftImg8bit\.png')
_HOW_TO_GET = (
    'Download leftImg8bit_trainvaltest.zip (11 GB) and gtFine_trainvaltest.zip (241 MB) from '
    'https://www.cityscapes-dataset.com/downloads/ (free registration) and put both, '
    'unextracted, in that directory; or write a small synthetic stand-in there with '
    '`python -m skd_jax.data.synthetic --out=DIR`.')


def _gfile_zip_names(path: str) -> list[str]:
  with tf.io.gfile.GFile(path, 'rb') as f:
    if not zipfile.is_zipfile(f):
      raise ValueError(f'{path} is not a zip archive (is it a partial download?). {_HOW_TO_GET}')
    f.seek(0)
    with zipfile.ZipFile(f) as archive:
      return archive.namelist()


def check_manual_dir(manual_dir: str) -> None:
  """Checks that `manual_dir` holds the two Cityscapes archives the tfds builder needs.

  Reads only the archives' directories. Raises one exception with one clear message (the missing
  or malformed file, the directory searched, what to download) instead of a traceback from inside
  tfds.

  Raises:
    FileNotFoundError: the directory or an archive is missing.
    ValueError: an archive is not a zip, lacks its top folder or a split, has a file name the
      builder cannot parse, or an image has no label file.
  """
  manual_dir = os.fspath(manual_dir)
  if not tf.io.gfile.isdir(manual_dir):
    raise FileNotFoundError(
        f'Cityscapes manual directory {manual_dir} does not exist: it must hold '
        f'{" and ".join(CITYSCAPES_ZIPS)}. {_HOW_TO_GET}')
  missing = [name for name in CITYSCAPES_ZIPS
             if not tf.io.gfile.exists(os.path.join(manual_dir, name))]
  if missing:
    raise FileNotFoundError(
        f'Cityscapes archive {" and ".join(missing)} not found in {manual_dir} (searched for '
        f'{", ".join(os.path.join(manual_dir, m) for m in missing)}). {_HOW_TO_GET}')
  names = {}
  for zip_name, top in CITYSCAPES_ZIPS.items():
    path = os.path.join(manual_dir, zip_name)
    names[top] = _gfile_zip_names(path)
    for split_dir in _SPLIT_DIRS:
      prefix = f'{top}/{split_dir}/'
      if not any(n.startswith(prefix) for n in names[top]):
        raise ValueError(
            f'{path} has no folder {prefix} (the archive must hold {top}/train, {top}/val and '
            f'{top}/test, as the official one does). {_HOW_TO_GET}')
  images = [n for n in names['leftImg8bit'] if n.endswith('_leftImg8bit.png')]
  left_path = os.path.join(manual_dir, 'leftImg8bit_trainvaltest.zip')
  for name in images:
    if not _LEFT_IMAGE_RE.fullmatch(name):
      raise ValueError(
          f'{left_path} holds {name}, which the tfds builder cannot parse: image files must be '
          'leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png with a lower-case city.')
  labels = set(names['gtFine'])
  missing_labels = [
      n for n in images
      if 'gtFine' + n[len('leftImg8bit'):-len('leftImg8bit.png')] + 'gtFine_labelIds.png'
      not in labels]
  if missing_labels:
    raise ValueError(
        f'{os.path.join(manual_dir, "gtFine_trainvaltest.zip")} lacks the label file of '
        f'{len(missing_labels)} image(s) in {left_path}, e.g. of {missing_labels[0]} (expected '
        'gtFine/<split>/<city>/<id>_gtFine_labelIds.png). Are both archives from the same '
        'release?')


def _source_files(manual_dir: str, split: str, image_id: str) -> tuple[str, str]:
  # The tfds builder's file naming: <top>/<split>/<city>/<city>_<seq>_<frame>_<suffix>.png.
  folder = {'validation': 'val'}.get(split, split)
  stem = f'{folder}/{image_id.split("_")[0]}/{image_id}'
  return (f'{os.path.join(manual_dir, LEFT_IMAGE_ZIP)}:'
          f'leftImg8bit/{stem}_leftImg8bit.png',
          f'{os.path.join(manual_dir, GT_FINE_ZIP)}:'
          f'gtFine/{stem}_gtFine_labelIds.png')


DATASET = spec.Dataset(
    info=CITYSCAPES, builder_name='cityscapes/semantic_segmentation',
    label_lut=LABEL_ID_TO_TRAIN_ID, check_manual_dir=check_manual_dir,
    image_key='image_left', label_key='segmentation_label',
    void_values=tuple(sorted(i for i in LABEL_IDS.values()
                             if i >= 0 and LABEL_ID_TO_TRAIN_ID[i] == IGNORE_LABEL)),
    source_files=_source_files)
