"""Tests of skd_jax.evaluate: the inference modes, the confusion matrix, the official Cityscapes
scripts, and the test-server export.

Every inference mode is checked against a brute-force NumPy evaluation written here from the
reference code (`predict_sliding`, `predict_multiscale`: Python loops over tiles, scales and flips,
`scipy.ndimage.zoom` for the scales as the reference does), run on a fake network whose logits are
a known function of its input (so NumPy computes them too) and, once, on a real tiny PSPNet.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
from cityscapesscripts.helpers import labels as cs_labels
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import scipy.ndimage

import np_reference
from np_reference import np_resize_align_corners
from skd_jax import checkpoint as ckpt_lib
from skd_jax import config_base
from skd_jax import sharding as sharding_lib
from skd_jax.data import cityscapes
from skd_jax.data import pipeline
from skd_jax.data import synthetic
from skd_jax.models import create_segmenter
from skd_jax import inference
from skd_jax import evaluator as evaluator_lib
from skd_jax import predictions

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 5
STRIDE = 4  # the fake network's output stride
# Predictions are compared where the brute force's best logit leads the second by this much;
# closer calls can go either way between float32 (JAX) and float64 (NumPy).
TIE_GAP = 1e-3


# ---------------------------------------------------------------------------------------------
# A fake network and its NumPy twin.


class FakeSegmenter(nn.Module):
  """Logits [N, ceil(H/4), ceil(W/4), C], a known function of the whole input.

  Every 4th pixel times a matrix (local), plus the image mean times another matrix (global
  context: a tile's logits depend on the tile and on its zero padding), plus a ramp over the
  output grid (position: flipping the input changes the logits). Returns what `Segmenter` does.
  """
  num_classes: int

  @nn.compact
  def __call__(self, images, train=False):
    local = self.param('local', nn.initializers.normal(0.05), (3, self.num_classes))
    context = self.param('context', nn.initializers.normal(0.05), (3, self.num_classes))
    ramp = self.param('ramp', nn.initializers.normal(1.0), (2, self.num_classes))
    sub = images[:, ::STRIDE, ::STRIDE]
    h, w = sub.shape[1:3]
    logits = (sub @ local + (jnp.mean(images, axis=(1, 2)) @ context)[:, None, None]
              + (jnp.arange(h) / h)[:, None, None] * ramp[0]
              + (jnp.arange(w) / w)[None, :, None] * ramp[1])
    return logits, None, {}


def fake_model(seed: int = 0, num_classes: int = NUM_CLASSES):
  """(model, variables, NumPy forward [N, h, w, 3] -> [N, h', w', C] float64)."""
  model = FakeSegmenter(num_classes)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params'])

  def forward(images):
    sub = images[:, ::STRIDE, ::STRIDE]
    h, w = sub.shape[1:3]
    rows = np.arange(h)[:, None, None] / h
    cols = np.arange(w)[None, :, None] / w
    return (np.einsum('nhwc,ck->nhwk', sub, p['local'])
            + np.einsum('nc,ck->nk', images.mean(axis=(1, 2)), p['context'])[:, None, None]
            + rows * p['ramp'][0] + cols * p['ramp'][1])

  return model, variables, forward


def random_variables(model, image_shape, seed):
  """Variables of a real network drawn in NumPy: compiling flax's init takes longer than every
  check here on a 2-core CPU. Kernels ~ N(0, 1 / fan_in), BatchNorm statistics mean 0 var ~ 1."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape),
                                             train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']") or name.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
    return (rng.normal(0, 1, leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# ---------------------------------------------------------------------------------------------
# The brute-force evaluation, transcribed from the reference's predict_sliding /
# predict_multiscale (single image, NumPy, loops).


def np_sliding(forward, image, tile):
  """Reference predict_sliding on one image [H, W, 3]: logits [H, W, C]."""
  tile_h, tile_w = tile
  height, width = image.shape[:2]
  stride = math.ceil(tile_h * (1 - 1 / 3))
  rows = max(int(math.ceil((height - tile_h) / stride) + 1), 1)
  cols = max(int(math.ceil((width - tile_w) / stride) + 1), 1)
  full, count = 0.0, np.zeros((height, width, 1))
  for row in range(rows):
    for col in range(cols):
      x1, y1 = col * stride, row * stride
      x2, y2 = min(x1 + tile_w, width), min(y1 + tile_h, height)
      x1, y1 = max(x2 - tile_w, 0), max(y2 - tile_h, 0)
      crop = image[y1:y2, x1:x2]
      padded = np.pad(crop, ((0, tile_h - crop.shape[0]), (0, tile_w - crop.shape[1]), (0, 0)))
      logits = np_resize_align_corners(forward(padded[None]), tile_h, tile_w)[0]
      if isinstance(full, float):
        full = np.zeros((height, width, logits.shape[-1]))
      full[y1:y2, x1:x2] += logits[:crop.shape[0], :crop.shape[1]]
      count[y1:y2, x1:x2] += 1
  return full / count


def np_predict(forward, image, out_hw, *, sliding=False, tile=None, scales=(1.0,), flip=False):
  """Reference evaluation of one image [H, W, 3]: logits [*out_hw, C]."""

  def view(x):
    if sliding:
      return np_resize_align_corners(np_sliding(forward, x, tile)[None], *out_hw)[0]
    return np_resize_align_corners(forward(x[None]), *out_hw)[0]

  total = 0.0
  for scale in scales:
    # The reference's zoom, but mode='nearest' instead of its default 'constant': there, a last
    # row / column whose source coordinate rounds a hair past the edge (e.g. 30 -> 15 rows) reads
    # the fill value 0. Inside the image both modes are the same interpolation.
    scaled = scipy.ndimage.zoom(image, (scale, scale, 1.0), order=1, prefilter=False,
                                mode='nearest')
    logits = view(scaled)
    if flip:
      logits = 0.5 * (logits + view(scaled[:, ::-1])[:, ::-1])
    total = total + logits
  return total / len(scales)


def np_confusion(pred, label, mask, num_classes):
  want = np.zeros((num_classes, num_classes), np.int64)
  for n in range(len(label)):
    if not mask[n]:
      continue
    for y, p in zip(label[n].ravel(), pred[n].ravel()):
      if y != 255:
        want[y, p] += 1
  return want


def assert_argmax_matches(pred, logits):
  """`pred` [..] equals the argmax of float64 `logits` [.., C] wherever that is not a near-tie."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > TIE_GAP
  assert clear.mean() > 0.98
  np.testing.assert_array_equal(pred[clear], np.argmax(logits, axis=-1)[clear])


def make_batch(rng, n, height, width, num_classes=NUM_CLASSES, padded=1):
  """Normalised-looking images (per-image colour offsets), labels with 255s, the last `padded`
  examples padding (mask False, label 255, image 0), as the eval iterator yields them."""
  image = (rng.normal(0, 50, (n, height, width, 3))
           + rng.normal(0, 30, (n, 1, 1, 3))).astype(np.float32)
  label = rng.integers(0, num_classes, (n, height, width)).astype(np.int32)
  label[:, :3] = 255
  mask = np.ones((n,), bool)
  if padded:
    mask[-padded:] = False
    label[-padded:] = 255
    image[-padded:] = 0
  return {'image': image, 'label': label, 'mask': mask,
          'index': np.where(mask, np.arange(n), -1).astype(np.int32)}


def brute_force(forward, batch, options):
  """The brute-force logits [N, H, W, C] (float64) of a batch for `make_evaluator` options."""
  return np.stack([np_predict(forward, image.astype(np.float64), batch['label'].shape[1:3],
                              sliding=options.get('sliding_window', False),
                              tile=options.get('crop_size'), scales=options.get('scales', (1.0,)),
                              flip=options.get('flip', False))
                   for image in batch['image']])


def check_logits(model, variables, forward, batch, options):
  """`inference.predict` with `options` against the brute force; returns the brute force."""
  logits = jax.jit(inference.predict, static_argnums=(0, 3, 4))(
      model, variables, jnp.asarray(batch['image']), batch['label'].shape[1:3],
      inference.InferenceMode(**options))
  want = brute_force(forward, batch, options)
  assert np.isfinite(want).all() and want.std() > 0.1
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
  return want


def check_evaluator(model, variables, forward, batch, mesh, options, *, num_classes=NUM_CLASSES):
  """`make_evaluator` with `options` on one batch: predictions and the confusion matrix against
  the brute force; returns the matrix."""
  want = brute_force(forward, batch, options)
  evaluator = evaluator_lib.make_evaluator(model, mesh, num_classes=num_classes, ignore_label=255,
                                      **options)
  seen = []
  confusion = evaluator(variables, [batch], on_predictions=lambda b, p: seen.append(p))
  (pred,) = seen
  assert pred.shape == batch['label'].shape
  assert_argmax_matches(pred[batch['mask']], want[batch['mask']])
  np.testing.assert_array_equal(confusion, np_confusion(pred, batch['label'], batch['mask'],
                                                        num_classes))
  # The same matrix without the prediction output (the path training takes).
  np.testing.assert_array_equal(evaluator(variables, [batch]), confusion)
  return confusion


# ---------------------------------------------------------------------------------------------
# Inference modes.


def test_sliding_window_grid_of_a_cityscapes_image():
  # 1024 x 2048 with 512 tiles: stride ceil(512 * 2/3) = 342, 3 x 6 windows, the last of each
  # axis pushed back inside the image (reference: 18 tiles).
  assert inference.sliding_window_stride(512) == 342
  assert inference.sliding_window_starts(1024, 512, 342) == [0, 342, 512]
  assert inference.sliding_window_starts(2048, 512, 342) == [0, 342, 684, 1026, 1368, 1536]
  # A tile larger than the image: one window at 0 (the reference's formula would give none).
  assert inference.sliding_window_starts(100, 512, 342) == [0]
  # The reference's float expression: 1 - 1/3 rounds up, so 720 gets 481, not 480.
  assert inference.sliding_window_stride(720) == 481
  assert inference.sliding_window_stride(768) == 512
  # Multi-scale sizes round as scipy.ndimage.zoom does (Python round: half to even).
  assert inference.scaled_size((1024, 2048), 0.75) == (768, 1536)
  for size in ((30, 45), (29, 47), (1024, 2048)):
    for scale in (0.5, 0.75, 1.25, 1.75):
      assert inference.scaled_size(size, scale) == scipy.ndimage.zoom(
          np.zeros(size), scale, order=1, prefilter=False).shape


MODES = {
    'whole': {},
    'sliding': dict(sliding_window=True, crop_size=(16, 16)),
    'sliding_tile_taller_than_image': dict(sliding_window=True, crop_size=(36, 28)),
    'multiscale': dict(scales=(0.5, 0.75, 1.25)),
    'flip': dict(flip=True),
    'sliding_multiscale_flip': dict(sliding_window=True, crop_size=(36, 28),
                                    scales=(0.75, 1.0, 1.5), flip=True),
}


@pytest.mark.parametrize('name', list(MODES))
def test_inference_mode_matches_numpy_brute_force(name):
  model, variables, forward = fake_model()
  batch = make_batch(np.random.default_rng(1), n=3, height=30, width=46)
  check_logits(model, variables, forward, batch, MODES[name])
  check_evaluator(model, variables, forward, batch, sharding_lib.make_mesh(), MODES[name])


def test_modes_differ_from_each_other():
  # Guards the brute-force comparisons above against a fake network too simple to tell the
  # modes apart (e.g. one for which a tile's logits equal the whole image's).
  _, _, forward = fake_model()
  batch = make_batch(np.random.default_rng(1), n=1, height=30, width=46, padded=0)
  outputs = {name: brute_force(forward, batch, options) for name, options in MODES.items()}
  names = list(outputs)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert np.abs(outputs[a] - outputs[b]).max() > 1e-2, (a, b)


def test_sliding_multiscale_flip_with_a_real_pspnet():
  model = create_segmenter('pspnet_resnet18', NUM_CLASSES, width_multiplier=1 / 16)
  variables = random_variables(model, (1, 32, 32, 3), seed=3)
  apply = jax.jit(lambda x: model.apply(variables, x, train=False)[0])
  forward = lambda x: np.asarray(apply(jnp.asarray(x, jnp.float32)), np.float64)
  batch = make_batch(np.random.default_rng(2), n=2, height=40, width=72, padded=0)
  batch['image'] /= 50.0  # unit-scale inputs for a randomly initialised network
  # The logits only (the evaluator around them is checked with the fake network): compiling a
  # real network is what costs here.
  check_logits(model, variables, forward, batch,
               dict(sliding_window=True, crop_size=(32, 32), scales=(0.75, 1.25), flip=True))


def test_bad_inference_options_are_clear_errors():
  with pytest.raises(ValueError, match='eval.scales'):
    inference.InferenceMode(scales=())
  with pytest.raises(ValueError, match='eval.scales'):
    inference.InferenceMode(scales=(1.0, -0.5))
  with pytest.raises(ValueError, match='eval.crop_size'):
    inference.InferenceMode(sliding_window=True)
  with pytest.raises(ValueError, match='eval.crop_size'):
    inference.InferenceMode(sliding_window=True, crop_size=(512,))
  # Stride ceil(2/3 * 36) = 25 on both axes (the reference's) with 20-wide tiles: columns 20..24
  # of a 46-wide image would get no tile.
  model, variables, _ = fake_model()
  with pytest.raises(ValueError, match=r'eval.crop_size \(36, 20\).*at least 25 wide'):
    inference.predict_sliding(model, variables, jnp.zeros((1, 30, 46, 3)), (36, 20))
  config = config_base.base_config()
  config.eval.sliding_window = True
  options = inference.inference_options(config)
  assert options == dict(sliding_window=True, crop_size=(512, 512), scales=(1.0,), flip=False)
  assert inference.InferenceMode(**options).describe() == 'sliding window 512x512'


MULTI_DEVICE_CHECK = textwrap.dedent('''
    import sys
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    import test_evaluate as t
    from skd_jax import sharding as sharding_lib
    assert jax.device_count() == 4, jax.devices()
    model, variables, forward = t.fake_model()
    batch = t.make_batch(np.random.default_rng(5), n=8, height=30, width=46, padded=3)
    options = dict(sliding_window=True, crop_size=(16, 16), flip=True)
    mesh = sharding_lib.make_mesh()
    batch_sharding = sharding_lib.global_batch({'mask': batch['mask']}, mesh)['mask'].sharding
    assert len(batch_sharding.device_set) == 4, batch_sharding
    confusion = t.check_evaluator(model, variables, forward, batch, mesh, options)
    print('OK', int(confusion.sum()))
''')


def test_confusion_matrix_is_global_over_sharded_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', MULTI_DEVICE_CHECK], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  # 5 real images of 27 x 46 labelled pixels (3 rows are 255).
  assert f'OK {5 * 27 * 46}' in out.stdout


# ---------------------------------------------------------------------------------------------
# The official Cityscapes scripts.


def official_evaluation(pred_dir: pathlib.Path, gt_files: list[str]) -> dict:
  """cityscapesscripts' pixel-level evaluation: each ground truth's prediction found in
  `pred_dir` by its own search (`getPrediction`), then `evaluateImgLists`."""
  args = copy.copy(cs_eval.args)
  args.predictionPath = str(pred_dir)
  args.predictionWalk = None
  args.evalInstLevelScore = False  # needs *_instanceIds.png, which is not what is compared
  args.evalPixelAccuracy = False
  args.JSONOutput = False
  args.quiet = True
  predictions = [cs_eval.getPrediction(args, gt) for gt in gt_files]
  return cs_eval.evaluateImgLists(predictions, gt_files, args)


def assert_same_as_official(official: dict, metrics: dict) -> None:
  # The official mean leaves out classes absent from labels and predictions (NaN).
  assert 100 * abs(official['averageScoreClasses'] - metrics['miou']) < 0.01
  for name, value in metrics['per_class_iou'].items():
    want = official['classScores'][name]
    assert (math.isnan(want) and value == 0.0) or abs(want - value) < 1e-6, (name, want, value)


def write_official_fixture(root: pathlib.Path):
  """Four `gtFine/val` images (label ids and instance ids) under `root` and corrupted predictions
  in `root/results`, as the official scripts find them. Returns (ground-truth label-id files,
  train-id ground truths, train-id predictions)."""
  rng = np.random.default_rng(0)
  eval_ids = np.array([cs_labels.trainId2label[t].id for t in range(19)])
  absent_id = cs_labels.name2label['train'].id        # in neither labels nor predictions
  only_predicted_id = cs_labels.name2label['bus'].id  # predicted, never in the labels
  has_instances = np.array([cs_labels.id2label[i].hasInstances for i in range(34)])
  gt_files, gts, preds = [], [], []
  for i, city in enumerate(['aachen', 'bonn', 'lindau', 'munster']):
    # Blocks of any raw id 0..33 (ignored ids included), corrupted predictions.
    gt = np.kron(rng.integers(0, 34, (8, 16)), np.ones((4, 4), np.int64)).astype(np.uint8)
    gt[(gt == absent_id) | (gt == only_predicted_id)] = cs_labels.name2label['road'].id
    pred = np.where(np_reference.label_ids_to_train_ids(gt) != 255, gt,
                    rng.choice(eval_ids, gt.shape)).astype(np.uint8)
    noise = rng.random(gt.shape) < 0.3
    pred[noise] = rng.choice(eval_ids, gt.shape)[noise]
    pred[pred == absent_id] = cs_labels.name2label['car'].id
    pred[i, :5] = only_predicted_id
    stem = f'{city}_{i:06d}_000019'
    gt_path = root / 'gtFine' / 'val' / city / f'{stem}_gtFine_labelIds.png'
    gt_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gt).save(gt_path)
    # Instance ids as Cityscapes stores them: id * 1000 + k for the classes with instances (one
    # instance per 4x4 block), the label id elsewhere; a 16-bit PNG.
    block = np.kron(np.arange(8 * 16).reshape(8, 16), np.ones((4, 4), np.int64))
    instances = np.where(has_instances[gt], gt.astype(np.int64) * 1000 + block, gt)
    Image.fromarray(instances.astype(np.uint16)).save(
        str(gt_path).replace('_labelIds.png', '_instanceIds.png'))
    (root / 'results').mkdir(exist_ok=True)
    Image.fromarray(pred).save(root / 'results' / f'{stem}_leftImg8bit.png')
    gt_files.append(str(gt_path))
    gts.append(np_reference.label_ids_to_train_ids(gt))
    preds.append(np_reference.label_ids_to_train_ids(pred))
  return gt_files, gts, preds


def our_metrics(gts, preds) -> dict:
  confusion = evaluator_lib.confusion_matrix(jnp.asarray(np.stack(preds), jnp.int32),
                                             jnp.asarray(np.stack(gts), jnp.int32), None, 19)
  return evaluator_lib.metrics_from_confusion(np.asarray(confusion), cityscapes.CLASS_NAMES,
                                              ignore_absent_classes=True)


def test_metrics_agree_with_official_cityscapes_scripts(tmp_path):
  gt_files, gts, preds = write_official_fixture(tmp_path)
  official = official_evaluation(tmp_path / 'results', gt_files)
  metrics = our_metrics(gts, preds)
  assert math.isnan(official['classScores']['train'])
  assert official['classScores']['bus'] == 0.0
  assert 0.2 < metrics['miou'] < 0.9
  assert_same_as_official(official, metrics)


def test_the_readmes_official_command_agrees_with_ours(tmp_path):
  """`python -m skd_jax.cityscapes_official` as the README runs it: the official
  csEvalPixelLevelSemanticLabeling with its default options, instance-level scores on."""
  gt_files, gts, preds = write_official_fixture(tmp_path)
  env = dict(os.environ, CITYSCAPES_DATASET=str(tmp_path),
             CITYSCAPES_RESULTS=str(tmp_path / 'results'), CITYSCAPES_EXPORT_DIR=str(tmp_path))
  out = subprocess.run([sys.executable, '-m', 'skd_jax.cityscapes_official'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  official = json.loads((tmp_path / 'resultPixelLevelSemanticLabeling.json').read_text())
  # The instance-level scores were computed (not switched off) and are real IoUs.
  assert 0 < official['averageScoreInstClasses'] < 1
  official['classScores'] = {k: float('nan') if v is None else v
                             for k, v in official['classScores'].items()}
  assert_same_as_official(official, our_metrics(gts, preds))


# ---------------------------------------------------------------------------------------------
# Test-server export.

EXPORT_H, EXPORT_W = 64, 128


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """Tiny synthetic Cityscapes (1 train, 3 val, 2 test, 64x128) prepared with tfds."""
  root = tmp_path_factory.mktemp('export_data')
  manual, data_dir = str(root / 'manual'), str(root / 'tfds')
  synthetic.write_synthetic_cityscapes(manual, num_train=1, num_val=3, num_test=2,
                                       height=EXPORT_H, width=EXPORT_W, seed=3)
  pipeline.prepare_cityscapes(manual, data_dir)
  return {'manual': manual, 'data_dir': data_dir}


def zip_images(manual: str, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{image id: (RGB image, raw label ids)} of a split, read from the archives themselves."""
  out = {}
  with zipfile.ZipFile(os.path.join(manual, cityscapes.LEFT_IMAGE_ZIP)) as left, \
       zipfile.ZipFile(os.path.join(manual, cityscapes.GT_FINE_ZIP)) as gt:
    for name in left.namelist():
      if name.startswith(f'leftImg8bit/{split}/') and name.endswith('_leftImg8bit.png'):
        image_id = name.split('/')[-1][:-len('_leftImg8bit.png')]
        label_name = f'gtFine/{split}/{image_id.split("_")[0]}/{image_id}_gtFine_labelIds.png'
        out[image_id] = (np.asarray(Image.open(io.BytesIO(left.read(name)))),
                         np.asarray(Image.open(io.BytesIO(gt.read(label_name)))))
  return out


def caffe_bgr(rgb: np.ndarray) -> np.ndarray:
  return rgb[..., ::-1].astype(np.float64) - np.array([104.00698793, 116.66876762, 122.67891434])


def test_export_writes_label_id_pngs_the_official_scripts_accept(dataset, tmp_path):
  model, variables, forward = fake_model(seed=4, num_classes=19)
  export_dir = tmp_path / 'results'
  exporter = predictions.prediction_exporter(dataset['data_dir'], 'val', export_dir, color=True)
  evaluator = evaluator_lib.make_evaluator(model, sharding_lib.make_mesh(), num_classes=19)
  # 3 images in batches of 2: the last batch has a padding row, which must not be written.
  batches = pipeline.make_eval_iterator(data_dir=dataset['data_dir'], split='val', batch_size=2,
                                        normalization='caffe_bgr')
  confusion = evaluator(variables, batches, on_predictions=exporter)
  originals = zip_images(dataset['manual'], 'val')
  assert exporter.num_written == 3
  assert sorted(p.name for p in export_dir.iterdir()) == sorted(
      f'{image_id}_leftImg8bit.png' for image_id in originals)

  label_id_of_train_id = np.array([cs_labels.trainId2label[t].id for t in range(19)])
  gt_files = []
  for image_id, (rgb, gt) in originals.items():
    exported = Image.open(export_dir / f'{image_id}_leftImg8bit.png')
    assert exported.mode == 'L' and exported.size == (EXPORT_W, EXPORT_H)
    logits = np_predict(forward, caffe_bgr(rgb), (EXPORT_H, EXPORT_W))
    exported = np.asarray(exported)
    assert set(np.unique(exported)) <= set(label_id_of_train_id)
    pred_train_ids = np.array([cs_labels.id2label[i].trainId for i in exported.ravel()])
    assert_argmax_matches(pred_train_ids.reshape(exported.shape), logits)
    color = np.asarray(Image.open(tmp_path / 'results_color' / f'{image_id}_leftImg8bit.png'))
    want_color = np.array([cs_labels.id2label[i].color for i in exported.ravel()])
    np.testing.assert_array_equal(color.reshape(-1, 3), want_color)
    city = image_id.split('_')[0]
    gt_path = tmp_path / 'gtFine' / 'val' / city / f'{image_id}_gtFine_labelIds.png'
    gt_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gt).save(gt_path)
    gt_files.append(str(gt_path))

  official = official_evaluation(export_dir, gt_files)
  assert_same_as_official(official, evaluator_lib.metrics_from_confusion(
      confusion, cityscapes.CLASS_NAMES, ignore_absent_classes=True))


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_image_ids_name_the_images_the_eval_iterator_yields(dataset, tmp_path, file_format):
  data_dir = dataset['data_dir']
  if file_format == 'tfrecord':  # no random access: the pipeline reads the split in its order
    data_dir = str(tmp_path / 'tfds')
    pipeline.prepare_cityscapes(dataset['manual'], data_dir, file_format='tfrecord')
  originals = zip_images(dataset['manual'], 'val')
  image_id = pipeline.example_ids(data_dir, 'val')
  seen = []
  for batch in pipeline.make_eval_iterator(data_dir=data_dir, split='val', batch_size=2,
                                           normalization='caffe_bgr'):
    for index, raw in zip(batch['index'], batch['raw_image']):
      if index >= 0:
        np.testing.assert_array_equal(raw, originals[image_id(index)][0])
        seen.append(image_id(index))
  assert sorted(seen) == sorted(originals)


def test_export_refuses_a_non_cityscapes_class_table(tmp_path):
  with pytest.raises(ValueError, match='data.num_classes'):
    predictions.prediction_exporter('unused', 'val', tmp_path, num_classes=21)


def test_evaluate_command_exports_the_test_split(dataset, tmp_path):
  """`python -m skd_jax.evaluate ... --export_dir --export_color` on the test split, with the
  sliding window and flip set from the command line."""
  model = create_segmenter('pspnet_resnet18', 19, width_multiplier=1 / 16)
  variables = random_variables(model, (1, 64, 64, 3), seed=0)
  export = tmp_path / 'student'
  ckpt_lib.save_variables(export, variables, metadata={
      'arch': 'pspnet_resnet18', 'num_classes': 19, 'overrides': {'width_multiplier': 1 / 16}})
  out_dir = tmp_path / 'server'
  args = [sys.executable, '-m', 'skd_jax.evaluate', '--config=configs/test.py',
          f'--workdir={tmp_path / "work"}', f'--checkpoint={export}',
          f'--config.data.manual_dir={dataset["manual"]}',
          f'--config.data.tfds_data_dir={dataset["data_dir"]}', '--config.data.eval_split=test',
          '--config.eval.sliding_window=True', '--config.eval.flip=True',
          f'--export_dir={out_dir}', '--export_color']
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert 'sliding window 64x64, flip' in out.stdout and 'wrote 2 label-id PNGs' in out.stdout
  names = sorted(f'{image_id}_leftImg8bit.png' for image_id in zip_images(dataset['manual'],
                                                                          'test'))
  assert sorted(p.name for p in out_dir.iterdir()) == names
  assert sorted(p.name for p in (tmp_path / 'server_color').iterdir()) == names
  for name in names:
    ids = np.asarray(Image.open(out_dir / name))
    assert ids.shape == (EXPORT_H, EXPORT_W)
    assert set(np.unique(ids)) <= set(cityscapes.TRAIN_ID_TO_LABEL_ID.tolist())
  result = json.loads((tmp_path / 'work' / 'eval_student_test.json').read_text())
  assert result['inference'] == 'sliding window 64x64, flip'
  assert np.asarray(result['confusion_matrix']).sum() == result['num_pixels']
