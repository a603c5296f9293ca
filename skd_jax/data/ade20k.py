"""ADE20K, the 150-class scene-parsing benchmark: the class table and a tfds builder.

The manual directory holds ADEChallengeData2016.zip
(http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip), extracted:

    ADEChallengeData2016/
      images/training/ADE_train_<n>.jpg        20210 images of varying sizes
      images/validation/ADE_val_<n>.jpg        2000
      annotations/{training,validation}/<id>.png    8-bit grey: 0 = other, k = class k (1..150)

Class k is train id k - 1; 0 ('other', not one of the 150) is ignored (255). Splits: 'train',
'validation' (the test images have no public labels). tfds's `scene_parse150` is not this data: it
downloads the 2017 instance release (`annotations_instance`, RGB-coded instance masks, with the
validation images as its 'test' split) and has no manual-directory mode, hence this builder.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from skd_jax.data import spec
from skd_jax.data import builder

# objectInfo150 of the challenge (first name of each class), index = train id.
CLASS_NAMES: tuple[str, ...] = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug',
    'field', 'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub',
    'railing', 'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter',
    'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs',
    'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel', 'pole',
    'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van',
    'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool',
    'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball',
    'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light',
    'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board',
    'shower', 'radiator', 'glass', 'clock', 'flag',
)
NUM_CLASSES = len(CLASS_NAMES)

# The challenge's colour table (color150), RGB, as used by CSAIL's and mmsegmentation's tools.
PALETTE = spec.frozen_palette([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
])

# [256] uint8: stored class k (1..150) -> train id k - 1; 0 ('other') and anything else ignored.
LABEL_TO_TRAIN_ID = spec.make_lut({k: k - 1 for k in range(1, NUM_CLASSES + 1)})

ADE20K = spec.DatasetInfo(name='ade20k', class_names=CLASS_NAMES, palette=PALETTE)

ROOT = 'ADEChallengeData2016'
# tfds split -> the challenge's folder name.
SPLIT_FOLDERS = {'train': 'training', 'validation': 'validation'}
HOW_TO_GET = (
    'Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ (direct: '
    'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) and extract it into '
    'the manual directory (giving ADEChallengeData2016/images and .../annotations).')


def find_examples(manual_dir: str) -> dict[str, list[builder.Pair]]:
  """{tfds split: its (image, label) files, sorted by id}; raises naming what is missing."""
  manual_dir = os.fspath(manual_dir)
  folders = [f'{ROOT}/{kind}/{folder}' for folder in SPLIT_FOLDERS.values()
             for kind in ('images', 'annotations')]
  builder.require(manual_dir, folders, dataset='ADE20K', how_to_get=HOW_TO_GET)
  return {
      split: builder.paired_files(manual_dir, f'{ROOT}/images/{folder}',
                                   f'{ROOT}/annotations/{folder}', image_ext='.jpg',
                                   label_ext='.png', dataset='ADE20K', how_to_get=HOW_TO_GET)
      for split, folder in SPLIT_FOLDERS.items()
  }



class Ade20k(builder.SegmentationBuilder):
  """ADE20K scene parsing (ADEChallengeData2016): 20210 train, 2000 validation, 150 classes."""
  name = 'ade20k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'ADEChallengeData2016 folders; raw labels 0..150 (0 = other).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET
  IMAGE_FORMAT = 'jpeg'
  HOMEPAGE = 'http://sceneparsing.csail.mit.edu/'

  find_examples = staticmethod(find_examples)


DATASET = spec.Dataset(info=ADE20K, builder_name=Ade20k.name, label_lut=LABEL_TO_TRAIN_ID,
                           check_manual_dir=find_examples, void_values=(0,))  # 'other'
