"""Tests of skd_jax.data: the class table, the synthetic archives and the tf.data pipeline.

Two tiny datasets are written and prepared once per module through the real tfds builder:
  * `street`: synthetic street scenes (6 train, 4 val, 2 test, 64x128);
  * `coded`: blocky images whose red channel encodes the label id (R = 7 * id) on 8x8 blocks,
    so that the label of every pixel can be recomputed from the augmented image alone.
"""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import time
import zipfile

import numpy as np
from PIL import Image
import pytest

import np_reference
from skd_jax.data import cityscapes
from skd_jax.data import pipeline
from skd_jax.data import synthetic
from skd_jax.data import spec
from skd_jax.data import builder as builder_lib

import tensorflow as tf  # pylint: disable=g-bad-import-order
import tensorflow_datasets as tfds  # pylint: disable=g-bad-import-order

H, W = 64, 128
ROOT = pathlib.Path(__file__).resolve().parents[1]
CODE_STEP = 7  # red value = 7 * label id: ids 0..33 -> 0..231.
CODED_IDS = (0, 1, 4, 7, 8, 11, 12, 17, 20, 21, 22, 23, 24, 26, 28, 33)


# ---------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope='module')
def street(tmp_path_factory):
  root = tmp_path_factory.mktemp('street')
  manual, data_dir = str(root / 'manual'), str(root / 'tfds')
  paths = synthetic.write_synthetic_cityscapes(
      manual, num_train=6, num_val=4, num_test=2, height=H, width=W, seed=0)
  counts = pipeline.prepare_cityscapes(manual, data_dir)
  return {'manual': manual, 'data_dir': data_dir, 'paths': paths, 'counts': counts}


def _coded_example(rng: np.random.Generator, split: str, i: int) -> synthetic.Example:
  block_ids = rng.choice(CODED_IDS, size=(H // 8, W // 8)).astype(np.uint8)
  label_ids = np.kron(block_ids, np.ones((8, 8), np.uint8))
  green_blue = rng.integers(0, 256, size=(H // 8, W // 8, 2)).astype(np.uint8)
  image = np.concatenate([(label_ids * CODE_STEP)[..., None],
                          np.kron(green_blue, np.ones((8, 8, 1), np.uint8))], axis=-1)
  city = {'train': 'bonn', 'val': 'lindau', 'test': 'berlin'}[split]
  return synthetic.Example(split=split, city=city, seq=i,
                           frame=19, image=image.astype(np.uint8), label_ids=label_ids)


# The builder's features read as stored: its image features reject any size but 1024x2048.
_ENCODED = {'image_left': tfds.decode.SkipDecoding(),
            'segmentation_label': tfds.decode.SkipDecoding()}


@pytest.fixture(scope='module')
def coded(tmp_path_factory):
  root = tmp_path_factory.mktemp('coded')
  manual, data_dir = str(root / 'manual'), str(root / 'tfds')
  rng = np.random.default_rng(123)
  examples = [_coded_example(rng, split, i)
              for split, n in (('train', 6), ('val', 3), ('test', 1)) for i in range(n)]
  synthetic.write_cityscapes_zips(manual, examples)
  pipeline.prepare_cityscapes(manual, data_dir)
  by_id = {ex.image_id: ex for ex in examples}
  # Example index in each prepared split -> the example written (tfds shuffles on preparation).
  builder = tfds.builder(cityscapes.DATASET.builder_name, data_dir=data_dir)
  originals = {}
  for split in ('train', 'validation'):
    source = builder.as_data_source(split, decoders=_ENCODED)
    originals[split] = [by_id[source[i]['image_id'].decode()] for i in range(len(source))]
  return {'manual': manual, 'data_dir': data_dir, 'originals': originals, 'root': root}


def _zip_png(zip_path: str, name: str) -> np.ndarray:
  with zipfile.ZipFile(zip_path) as archive:
    return np.asarray(Image.open(io.BytesIO(archive.read(name))))


def _caffe(image_rgb: np.ndarray) -> np.ndarray:
  return image_rgb[..., ::-1].astype(np.float32) - np.float32(pipeline.CAFFE_BGR_MEAN)


def _train(data_dir, **kwargs):
  args = dict(data_dir=data_dir, batch_size=2, crop_size=(48, 64), scales=[0.75, 1.0, 1.5],
              flip=True, normalization='caffe_bgr', seed=0, include_index=True)
  args.update(kwargs)
  return pipeline.make_train_iterator(**args)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The class table.


def test_label_id_to_train_id_matches_reference_table():
  # skd-reference.md section 6, written out.
  expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
              25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
  lut = cityscapes.LABEL_ID_TO_TRAIN_ID
  assert lut.shape == (256,) and lut.dtype == np.uint8
  for label_id in range(256):
    assert lut[label_id] == expected.get(label_id, 255), label_id
  np.testing.assert_array_equal(cityscapes.TRAIN_ID_TO_LABEL_ID,
                                sorted(expected, key=expected.get))
  np.testing.assert_array_equal(
      np_reference.label_ids_to_train_ids(np.array([[-1, 0, 7], [33, 34, 300]])),
      [[255, 255, 0], [18, 255, 255]])


def test_class_table_and_colorize():
  assert cityscapes.CLASS_NAMES[0] == 'road' and cityscapes.CLASS_NAMES[18] == 'bicycle'
  assert len(cityscapes.CLASS_NAMES) == 19 == cityscapes.CITYSCAPES.num_classes
  assert cityscapes.CITYSCAPES.ignore_label == 255
  assert cityscapes.PALETTE.shape == (19, 3) and cityscapes.PALETTE.dtype == np.uint8
  colored = spec.colorize(np.array([[0, 10], [255, 18]]), cityscapes.PALETTE)
  assert colored.dtype == np.uint8 and colored.shape == (2, 2, 3)
  np.testing.assert_array_equal(colored, [[[128, 64, 128], [70, 130, 180]],
                                          [[0, 0, 0], [119, 11, 32]]])
  for name, label_id in cityscapes.LABEL_IDS.items():
    train_id = cityscapes.LABEL_ID_TO_TRAIN_ID[label_id]
    assert (train_id == 255) == (name not in cityscapes.CLASS_NAMES), name
    if train_id != 255:
      assert cityscapes.CLASS_NAMES[train_id] == name


# ---------------------------------------------------------------------------------------------
# The synthetic archives.


def test_synthetic_zips_have_the_official_layout(street):
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.datasets.cityscapes import cityscapes_dataset_builder as builder_lib
  paths = street['paths']
  assert os.path.basename(paths.left_img_zip) == 'leftImg8bit_trainvaltest.zip'
  assert os.path.basename(paths.gt_fine_zip) == 'gtFine_trainvaltest.zip'
  with zipfile.ZipFile(paths.left_img_zip) as archive:
    left = sorted(n for n in archive.namelist() if n.endswith('.png'))
  with zipfile.ZipFile(paths.gt_fine_zip) as archive:
    gt = sorted(n for n in archive.namelist() if n.endswith('.png'))
  assert 'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png' in left
  assert 'leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png' in left
  assert 'leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png' in left
  assert 'gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png' in gt
  for split, n in (('train', 6), ('val', 4), ('test', 2)):
    assert sum(name.startswith(f'leftImg8bit/{split}/') for name in left) == n
  assert [n.replace('leftImg8bit', 'gtFine', 1).replace('leftImg8bit.png', 'gtFine_labelIds.png')
          for n in left] == gt
  for name in left:
    # The builder's own parser of file names accepts every one.
    image_id = builder_lib._get_left_image_id(os.path.basename(name))
    assert os.path.basename(name) == f'{image_id}_leftImg8bit.png'
  image = Image.open(io.BytesIO(zipfile.ZipFile(paths.left_img_zip).read(left[0])))
  label = Image.open(io.BytesIO(zipfile.ZipFile(paths.gt_fine_zip).read(gt[0])))
  assert (image.mode, image.size) == ('RGB', (W, H))
  assert (label.mode, label.size) == ('L', (W, H))
  assert street['counts'] == {'train': 6, 'validation': 4, 'test': 2}


def test_synthetic_is_deterministic_and_varied(tmp_path):
  kwargs = dict(num_train=2, num_val=1, num_test=1, height=32, width=64)
  a = synthetic.write_synthetic_cityscapes(str(tmp_path / 'a'), seed=5, **kwargs)
  b = synthetic.write_synthetic_cityscapes(str(tmp_path / 'b'), seed=5, **kwargs)
  c = synthetic.write_synthetic_cityscapes(str(tmp_path / 'c'), seed=6, **kwargs)
  read = lambda p: open(p, 'rb').read()
  assert read(a.left_img_zip) == read(b.left_img_zip)
  assert read(a.gt_fine_zip) == read(b.gt_fine_zip)
  assert read(a.left_img_zip) != read(c.left_img_zip)


def test_synthetic_scenes_are_street_like_and_not_solved_by_colour():
  examples = list(synthetic.synthetic_examples(num_train=24, num_val=0, num_test=0, height=48,
                                               width=96, seed=1))
  label_ids = np.stack([ex.label_ids for ex in examples])
  present = set(np.unique(label_ids).tolist())
  ids = cityscapes.LABEL_IDS
  for name in ('sky', 'building', 'road', 'sidewalk', 'car', 'vegetation', 'pole'):
    assert ids[name] in present, name
  ignored = cityscapes.LABEL_ID_TO_TRAIN_ID[label_ids] == 255
  assert 0.001 < ignored.mean() < 0.2
  # Sky above road: in every image, the top row has no road and the bottom row no sky.
  assert not (label_ids[:, 0] == ids['road']).any()
  assert not (label_ids[:, -1] == ids['sky']).any()
  # A nearest-class-mean colour classifier is no better than a weak baseline.
  pixels = np.concatenate([ex.image.reshape(-1, 3) for ex in examples]).astype(np.float32)
  train_ids = cityscapes.LABEL_ID_TO_TRAIN_ID[label_ids.reshape(-1)]
  valid = train_ids != 255
  pixels, train_ids = pixels[valid], train_ids[valid]
  classes = np.unique(train_ids)
  means = np.stack([pixels[train_ids == c].mean(0) for c in classes])
  predicted = classes[np.argmin(((pixels[:, None] - means[None]) ** 2).sum(-1), axis=1)]
  assert (predicted == train_ids).mean() < 0.5


def test_synthetic_cli(tmp_path):
  """`python -m skd_jax.data.synthetic` as a user runs it (absl flags, like every program)."""
  out = subprocess.run([sys.executable, '-m', 'skd_jax.data.synthetic', f'--out={tmp_path}',
                        '--num_train=1', '--num_val=1', '--num_test=1', '--height=32',
                        '--width=64'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ['gtFine_trainvaltest.zip',
                                          'leftImg8bit_trainvaltest.zip']
  assert "{'train': 1, 'val': 1, 'test': 1}" in out.stdout


# ---------------------------------------------------------------------------------------------
# Preparation errors.


def test_missing_manual_dir_names_the_missing_file(tmp_path):
  manual = tmp_path / 'manual'
  with pytest.raises(FileNotFoundError, match='does not exist') as e:
    pipeline.prepare_cityscapes(str(manual), str(tmp_path / 'tfds'))
  assert str(manual) in str(e.value) and 'leftImg8bit_trainvaltest.zip' in str(e.value)
  manual.mkdir()
  with pytest.raises(FileNotFoundError) as e:
    pipeline.prepare_cityscapes(str(manual), str(tmp_path / 'tfds'))
  message = str(e.value)
  assert 'leftImg8bit_trainvaltest.zip' in message and 'gtFine_trainvaltest.zip' in message
  assert str(manual) in message and 'cityscapes-dataset.com' in message
  assert not (tmp_path / 'tfds' / 'cityscapes').exists()


def test_bad_archives_are_named(tmp_path, street):
  manual = tmp_path / 'manual'
  manual.mkdir()
  left = os.path.join(street['manual'], 'leftImg8bit_trainvaltest.zip')
  os.symlink(left, manual / 'leftImg8bit_trainvaltest.zip')
  with pytest.raises(FileNotFoundError, match='gtFine_trainvaltest.zip not found') as e:
    cityscapes.check_manual_dir(str(manual))
  assert 'leftImg8bit_trainvaltest.zip not' not in str(e.value)
  (manual / 'gtFine_trainvaltest.zip').write_bytes(b'<html>login required</html>')
  with pytest.raises(ValueError, match='gtFine_trainvaltest.zip is not a zip archive'):
    cityscapes.check_manual_dir(str(manual))
  with zipfile.ZipFile(manual / 'gtFine_trainvaltest.zip', 'w') as archive:
    archive.writestr('gtFine_trainvaltest/gtFine/train/a.png', b'')
  with pytest.raises(ValueError, match='has no folder gtFine/train/'):
    cityscapes.check_manual_dir(str(manual))


def test_unprepared_data_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='prepare_cityscapes'):
    pipeline.num_examples(str(tmp_path), 'train')
  with pytest.raises(FileNotFoundError, match='prepare_cityscapes'):
    _train(str(tmp_path))


def test_prepare_skips_when_already_prepared(street, tmp_path):
  # The archives are not even looked at.
  counts = pipeline.prepare_cityscapes(str(tmp_path / 'nothing_here'), street['data_dir'])
  assert counts == {'train': 6, 'validation': 4, 'test': 2}
  assert pipeline.num_examples(street['data_dir'], 'val') == 4
  assert pipeline.num_examples(street['data_dir'], 'train') == 6
  assert not os.path.exists(os.path.join(street['data_dir'], 'downloads'))


# ---------------------------------------------------------------------------------------------
# Evaluation iterator.


def test_eval_reads_real_size_exact_pixels_and_labels(street):
  data_dir, paths = street['data_dir'], street['paths']
  builder = tfds.builder(cityscapes.DATASET.builder_name, data_dir=data_dir)
  ids = builder.as_data_source('validation', decoders=_ENCODED)
  batches = list(pipeline.make_eval_iterator(data_dir=data_dir, split='val', batch_size=3,
                                             normalization='caffe_bgr'))
  assert len(batches) == 2
  seen = 0
  for batch in batches:
    assert batch['image'].shape == (3, H, W, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (3, H, W) and batch['label'].dtype == np.int32
    assert batch['raw_image'].shape == (3, H, W, 3) and batch['raw_image'].dtype == np.uint8
    assert batch['mask'].dtype == np.bool_ and batch['index'].dtype == np.int32
    for b in np.flatnonzero(batch['mask']):
      image_id = ids[int(batch['index'][b])]['image_id'].decode()
      city = image_id.split('_')[0]
      image = _zip_png(paths.left_img_zip, f'leftImg8bit/val/{city}/{image_id}_leftImg8bit.png')
      label_ids = _zip_png(paths.gt_fine_zip,
                           f'gtFine/val/{city}/{image_id}_gtFine_labelIds.png')
      np.testing.assert_array_equal(batch['raw_image'][b], image)
      np.testing.assert_array_equal(batch['label'][b], cityscapes.LABEL_ID_TO_TRAIN_ID[label_ids])
      np.testing.assert_allclose(batch['image'][b], _caffe(image), rtol=0, atol=1e-4)
      seen += 1
  assert seen == 4
  # Several classes and the ignore label occur: the LUT did real work.
  labels = np.concatenate([b['label'][b['mask']].ravel() for b in batches])
  assert len(np.unique(labels)) >= 6 and (labels == 255).any()


def test_eval_covers_every_image_once_with_padding_masked(street):
  data_dir = street['data_dir']
  seen = []
  num_batches = []
  for process_index in range(3):
    batches = list(pipeline.make_eval_iterator(
        data_dir=data_dir, split='val', batch_size=1, normalization='imagenet_rgb',
        process_index=process_index, process_count=3))
    num_batches.append(len(batches))
    for batch in batches:
      for b in range(batch['mask'].shape[0]):
        if batch['mask'][b]:
          assert batch['index'][b] % 3 == process_index
          seen.append(int(batch['index'][b]))
        else:
          assert batch['index'][b] == -1
          assert (batch['label'][b] == 255).all()
          assert (batch['image'][b] == 0).all() and (batch['raw_image'][b] == 0).all()
  # 4 images over 3 processes: 2, 1, 1 -> every process yields 2 batches, 2 of them padding.
  assert num_batches == [2, 2, 2] == [pipeline.num_eval_batches(4, 1, 3)] * 3
  assert sorted(seen) == [0, 1, 2, 3]


def test_normalizations_of_a_known_pixel():
  pixel = tf.constant([[[10, 20, 30]]], tf.uint8)  # R, G, B
  np.testing.assert_allclose(
      pipeline.normalize(pixel, 'caffe_bgr').numpy()[0, 0],
      [30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434], rtol=0, atol=1e-4)
  np.testing.assert_allclose(
      pipeline.normalize(pixel, 'imagenet_rgb').numpy()[0, 0],
      [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225],
      rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match='unknown normalization'):
    pipeline.normalize(pixel, 'rgb')


# ---------------------------------------------------------------------------------------------
# Training iterator.


def _decode_code(image_caffe: np.ndarray) -> np.ndarray:
  """Label ids [h, w] from a caffe-normalised coded image [h, w, 3] (red = 7 * id)."""
  red = image_caffe[..., 2] + pipeline.CAFFE_BGR_MEAN[2]
  return np.clip(np.round(red / CODE_STEP), 0, 255).astype(np.int64)


def test_train_crop_pad_flip_are_exact_and_aligned_at_scale_1(coded):
  # Crop taller than the image (64 -> 80 rows: padded) and narrower (128 -> 96: random x).
  iterator = _train(coded['data_dir'], batch_size=3, crop_size=(80, 96), scales=[1.0], seed=7)
  originals = coded['originals']['train']
  flips, offsets = set(), set()
  for batch in _take(iterator, 6):
    assert batch['image'].shape == (3, 80, 96, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (3, 80, 96) and batch['label'].dtype == np.int32
    for image, label, index in zip(batch['image'], batch['label'], batch['index']):
      # Padding: below the image, image 0 (after normalisation) and label 255.
      assert (image[H:] == 0).all() and (label[H:] == 255).all()
      # The label is the function of the image wherever it is not padding.
      np.testing.assert_array_equal(label[:H],
                                    cityscapes.LABEL_ID_TO_TRAIN_ID[_decode_code(image[:H])])
      # And the pair is one window of one original, flipped or not.
      original = originals[int(index)]
      expected_image = _caffe(original.image)
      expected_label = cityscapes.LABEL_ID_TO_TRAIN_ID[original.label_ids]
      matches = [(x0, flip) for x0 in range(W - 96 + 1) for flip in (False, True)
                 if np.array_equal(
                     image[:H], (expected_image[:, x0:x0 + 96])[:, ::-1 if flip else 1])]
      assert len(matches) == 1, matches
      x0, flip = matches[0]
      window = expected_label[:, x0:x0 + 96]
      np.testing.assert_array_equal(label[:H], window[:, ::-1] if flip else window)
      flips.add(flip)
      offsets.add(x0)
  assert flips == {False, True} and len(offsets) > 3


def test_train_scaled_labels_stay_aligned(coded):
  iterator = _train(coded['data_dir'], batch_size=2, crop_size=(64, 64), scales=None,
                    scale_range=(1.3, 2.2), seed=3)
  for batch in _take(iterator, 4):
    for image, label in zip(batch['image'], batch['label']):
      code = image[..., 2]
      # Inside a block (all 4 neighbours equal, up to float rounding of the bilinear weights)
      # bilinear = nearest: there the label must match exactly.
      same = lambda a, b: np.abs(a - b) < 1e-3
      interior = np.zeros(code.shape, bool)
      interior[1:-1, 1:-1] = (same(code[1:-1, 1:-1], code[:-2, 1:-1]) &
                              same(code[1:-1, 1:-1], code[2:, 1:-1]) &
                              same(code[1:-1, 1:-1], code[1:-1, :-2]) &
                              same(code[1:-1, 1:-1], code[1:-1, 2:]))
      assert interior.mean() > 0.4
      expected = cityscapes.LABEL_ID_TO_TRAIN_ID[_decode_code(image)]
      np.testing.assert_array_equal(label[interior], expected[interior])
      # Blocks of 8 pixels scaled by >= 1.3 are over 10 pixels wide: the label was scaled too.
      runs = np.diff(np.flatnonzero(np.diff(label[32]) != 0))
      assert runs.size == 0 or runs.max() > 9


def test_train_downscaled_is_padded_bottom_right(coded):
  iterator = _train(coded['data_dir'], batch_size=2, crop_size=(48, 80), scales=[0.5],
                    flip=False, seed=1)
  for batch in _take(iterator, 3):
    for image, label in zip(batch['image'], batch['label']):
      # 64x128 * 0.5 = 32x64: rows 32.. and columns 64.. are padding, and nothing else is.
      assert (image[32:] == 0).all() and (label[32:] == 255).all()
      assert (image[:, 64:] == 0).all() and (label[:, 64:] == 255).all()
      assert (np.abs(image[:32, :64]).sum(-1) > 0).all()
      # Exact everywhere: halving with half-pixel centres averages pixel pairs (2i, 2i + 1), which
      # never straddle the even-aligned 8-pixel blocks, and nearest picks pixel 2i + 1.
      np.testing.assert_array_equal(
          label[:32, :64], cityscapes.LABEL_ID_TO_TRAIN_ID[_decode_code(image[:32, :64])])


def test_train_is_deterministic_per_seed(street):
  first = _take(_train(street['data_dir'], seed=11), 4)
  again = _take(_train(street['data_dir'], seed=11), 4)
  other = _take(_train(street['data_dir'], seed=12), 4)
  for a, b in zip(first, again):
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a['image'], c['image']) for a, c in zip(first, other))
  # Real content, not padding only.
  assert np.abs(first[0]['image']).mean() > 10 and (first[0]['label'] != 255).mean() > 0.5


def test_train_resumes_exactly_and_cheaply(street):
  data_dir = street['data_dir']
  fresh = _take(_train(data_dir, seed=4), 5)
  resumed = _take(_train(data_dir, seed=4, start_step=3), 2)
  for a, b in zip(fresh[3:], resumed):
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(a[key], b[key])
  # 6 examples, batch 2: 3 steps an epoch, each epoch a permutation of all 6.
  epoch0 = np.concatenate([b['index'] for b in fresh[:3]])
  epoch1 = np.concatenate([b['index'] for b in fresh[3:]])
  assert sorted(epoch0.tolist()) == list(range(6))
  np.testing.assert_array_equal(epoch0, pipeline.epoch_order(4, 0, 6))
  np.testing.assert_array_equal(epoch1, pipeline.epoch_order(4, 1, 6)[:4])
  assert not np.array_equal(epoch1, epoch0[:4])  # reshuffled (true for this seed)
  # Resuming a million steps in reads nothing before it.
  start = time.time()
  far = next(_train(data_dir, seed=4, start_step=10**6))
  assert time.time() - start < 5.0
  epoch, k = divmod(10**6, 3)
  np.testing.assert_array_equal(far['index'], pipeline.epoch_order(4, epoch, 6)[2 * k:2 * k + 2])


def test_processes_yield_their_rows_of_the_one_global_batch(street):
  """The same global batches, augmentation included, on 1 process and on 2 (any row split)."""
  one = _take(_train(street['data_dir'], batch_size=2, seed=2), 5)   # 3 steps an epoch: 6 // 2
  blocks = [_take(_train(street['data_dir'], batch_size=1, seed=2, process_index=p,
                         process_count=2), 5) for p in range(2)]
  swapped = [_take(_train(street['data_dir'], batch_size=1, seed=2, process_index=p,
                          process_count=2, rows=[1 - p]), 5) for p in range(2)]
  for t in range(5):
    for key in ('image', 'label', 'index'):
      np.testing.assert_array_equal(one[t][key], np.concatenate([b[t][key] for b in blocks]))
      np.testing.assert_array_equal(one[t][key], np.concatenate([b[t][key] for b in swapped[::-1]]))
  # Each epoch is one permutation of the split, shared by the processes.
  epoch0 = np.concatenate([b['index'] for b in one[:3]])
  assert sorted(epoch0.tolist()) == list(range(6))
  with pytest.raises(ValueError, match=r'rows must be 1 distinct positions in \[0, 2\)'):
    _train(street['data_dir'], batch_size=1, seed=2, process_count=2, rows=[2])


def test_train_rejects_bad_arguments(street):
  with pytest.raises(ValueError, match='fewer than one global batch'):
    _train(street['data_dir'], batch_size=4, process_count=2)
  with pytest.raises(ValueError, match='unknown normalization'):
    _train(street['data_dir'], normalization='bgr')
  with pytest.raises(ValueError, match='not both'):
    _train(street['data_dir'], scales=[1.0, 2.0], scale_range=(1.0, 2.0))


def test_tfrecord_preparation_reads_the_same(coded):
  data_dir = str(coded['root'] / 'tfds_tfrecord')
  pipeline.prepare_cityscapes(coded['manual'], data_dir, file_format='tfrecord')
  array_record = list(pipeline.make_eval_iterator(data_dir=coded['data_dir'], batch_size=2,
                                                   normalization='caffe_bgr'))
  tfrecord = list(pipeline.make_eval_iterator(data_dir=data_dir, batch_size=2,
                                              normalization='caffe_bgr'))
  assert len(array_record) == len(tfrecord) == 2
  for a, b in zip(array_record, tfrecord):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  a = _take(_train(coded['data_dir'], seed=9, start_step=2), 2)
  b = _take(_train(data_dir, seed=9, start_step=2), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])


def test_process_exits_cleanly_with_an_open_iterator(street):
  # A tf.data pipeline still running Python at interpreter shutdown aborts (status 134) or hangs
  # the process; the atexit hook closes open iterators first. Racy by nature, so run it twice.
  script = (
      'import sys\n'
      'from skd_jax.data import pipeline\n'
      'it = pipeline.make_train_iterator(data_dir=sys.argv[1], batch_size=2, crop_size=(48, 64),'
      ' scales=[2.0], flip=True, normalization="caffe_bgr", seed=0, prefetch=8)\n'
      'next(it)\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
  for _ in range(2):
    result = subprocess.run([sys.executable, '-c', script, street['data_dir']], env=env,
                            capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]


def test_iterator_close_and_context_manager(street):
  with _train(street['data_dir']) as iterator:
    next(iterator)
  with pytest.raises(StopIteration):
    next(iterator)
