"""Pascal VOC 2012 with the SBD augmented training set: the 21-class table and a tfds builder.

The manual directory holds the two downloads, extracted:

    VOCdevkit/VOC2012/            from VOCtrainval_11-May-2012.tar
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png      palette PNGs: class indices 0..20, 255 on object borders
      ImageSets/Segmentation/train.txt, val.txt     1464 / 1449 ids
    benchmark_RELEASE/dataset/    from SBD's benchmark.tgz (Hariharan et al. 2011)
      img/<id>.jpg
      cls/<id>.mat                    MATLAB struct GTcls, GTcls.Segmentation: indices 0..20
      train.txt, val.txt              8498 / 2857 ids

Splits: 'train' is the usual 'train_aug', (SBD train + SBD val + VOC train) minus VOC val, 10582
images; 'validation' is VOC val, 1449 images. An image of VOC train is read with VOC's own
annotation (which marks uncertain borders 255), every other training image with SBD's; each
example's image comes from the same release as its label. No test split: VOC's test labels are
not public.
"""

from __future__ import annotations

import os

import numpy as np
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds

from skd_jax.data import spec
from skd_jax.data import builder

CLASS_NAMES: tuple[str, ...] = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor',
)
NUM_CLASSES = len(CLASS_NAMES)

# The VOC devkit's colour map (VOClabelcolormap.m), RGB; the same palette the PNGs carry.
PALETTE = spec.frozen_palette([
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
    (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0),
    (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0),
    (0, 192, 0), (128, 192, 0), (0, 64, 128),
])

# [256] uint8: classes 0..20 are their own train ids; the 255 border (and anything else) ignored.
LABEL_TO_TRAIN_ID = spec.make_lut({c: c for c in range(NUM_CLASSES)})

VOC = spec.DatasetInfo(name='voc', class_names=CLASS_NAMES, palette=PALETTE)

VOC_ROOT = 'VOCdevkit/VOC2012'
SBD_ROOT = 'benchmark_RELEASE/dataset'
VOC_LISTS = {'train': f'{VOC_ROOT}/ImageSets/Segmentation/train.txt',
             'val': f'{VOC_ROOT}/ImageSets/Segmentation/val.txt'}
SBD_LISTS = {'train': f'{SBD_ROOT}/train.txt', 'val': f'{SBD_ROOT}/val.txt'}
REQUIRED = (f'{VOC_ROOT}/JPEGImages', f'{VOC_ROOT}/SegmentationClass', *VOC_LISTS.values(),
            f'{SBD_ROOT}/img', f'{SBD_ROOT}/cls', *SBD_LISTS.values())
HOW_TO_GET = (
    'Extract VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/, gives '
    'VOCdevkit/VOC2012/) and SBD\'s benchmark.tgz (http://home.bharathh.info/pubs/codes/SBD/'
    'download.html, gives benchmark_RELEASE/dataset/) into the manual directory.')


def train_aug_ids(voc_train: list[str], voc_val: list[str], sbd_train: list[str],
                  sbd_val: list[str]) -> list[str]:
  """The 'train_aug' ids, sorted: SBD train + SBD val + VOC train, minus VOC val."""
  return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def _voc_pair(manual_dir: str, image_id: str) -> builder.Pair:
  root = os.path.join(manual_dir, VOC_ROOT)
  return builder.Pair(image_id, os.path.join(root, 'JPEGImages', f'{image_id}.jpg'),
                       os.path.join(root, 'SegmentationClass', f'{image_id}.png'))


def _sbd_pair(manual_dir: str, image_id: str) -> builder.Pair:
  root = os.path.join(manual_dir, SBD_ROOT)
  return builder.Pair(image_id, os.path.join(root, 'img', f'{image_id}.jpg'),
                       os.path.join(root, 'cls', f'{image_id}.mat'))


def find_examples(manual_dir: str) -> dict[str, list[builder.Pair]]:
  """{tfds split: its (image, label) files}; raises naming the first missing file or folder."""
  manual_dir = os.fspath(manual_dir)
  builder.require(manual_dir, REQUIRED, dataset='Pascal VOC + SBD', how_to_get=HOW_TO_GET)
  voc = {k: builder.read_ids(os.path.join(manual_dir, v)) for k, v in VOC_LISTS.items()}
  sbd = {k: builder.read_ids(os.path.join(manual_dir, v)) for k, v in SBD_LISTS.items()}
  voc_train = set(voc['train'])
  splits = {
      'train': [_voc_pair(manual_dir, i) if i in voc_train else _sbd_pair(manual_dir, i)
                for i in train_aug_ids(voc['train'], voc['val'], sbd['train'], sbd['val'])],
      'validation': [_voc_pair(manual_dir, i) for i in voc['val']],
  }
  for pairs in splits.values():
    builder.require_files(manual_dir, pairs, dataset='Pascal VOC + SBD', how_to_get=HOW_TO_GET)
  return splits



def read_sbd_label(path: str) -> np.ndarray:
  """GTcls.Segmentation [H, W] uint8 (class indices 0..20) of an SBD `cls/<id>.mat` file."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    try:
      mat = scipy.io.loadmat(f, squeeze_me=True, struct_as_record=False,
                             variable_names=['GTcls'])
    except Exception as e:  # scipy raises several types for unreadable files.
      raise ValueError(f'{path} is not a MATLAB file scipy can read ({e})') from e
  if 'GTcls' not in mat or not hasattr(mat['GTcls'], 'Segmentation'):
    raise ValueError(f'{path} has no struct GTcls with a field Segmentation (SBD cls/ layout)')
  segmentation = np.asarray(mat['GTcls'].Segmentation)
  if segmentation.ndim != 2 or segmentation.min() < 0 or segmentation.max() > 255:
    raise ValueError(f'{path}: GTcls.Segmentation is not a [H, W] map of class indices')
  return segmentation.astype(np.uint8)


class Voc2012Aug(builder.SegmentationBuilder):
  """Pascal VOC 2012 segmentation with SBD: train_aug (10582) and VOC val (1449)."""
  name = 'voc2012_aug'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'train = SBD train + val + VOC train - VOC val; validation = VOC val.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET
  IMAGE_FORMAT = 'jpeg'
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'

  def read_label(self, path: str) -> tuple[bytes, tuple[int, int]]:
    if path.endswith('.mat'):
      return builder.label_png(read_sbd_label(path))
    return builder.label_png(path)

  find_examples = staticmethod(find_examples)


DATASET = spec.Dataset(info=VOC, builder_name=Voc2012Aug.name, label_lut=LABEL_TO_TRAIN_ID,
                           check_manual_dir=find_examples, void_values=(255,))  # object borders
