"""skd_jax.export: the artefacts, reloaded where skd_jax and Flax cannot be imported, against Flax.

The reference is computed here without the export code: the image normalised by the input
pipeline's TensorFlow `normalize`, the Flax model's logits at 1/8, upsampled by the pixel-by-pixel
NumPy align_corners resize of np_reference, then NumPy's argmax.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from np_reference import np_adaptive_avg_pool, np_pool, np_resize_align_corners
from skd_jax import checkpoint as ckpt_lib
from skd_jax import export
from skd_jax import ops
from skd_jax import train
from skd_jax.data import pipeline
from skd_jax import experiment
from test_train import ROOT, load_test_config

# Logits: measured max |export - reference| / max |reference| is ~1e-7 (float32 rounding of the
# same convolutions in another order, and of the float64 NumPy resize); the bar is the issue's.
LOGITS_RTOL = 1e-4
# Images of each exported shape: the symbolic export is called at two sizes (one odd), the fixed
# one at its own.
SYMBOLIC_BATCHES = {'wide': (2, 64, 128), 'odd': (1, 37, 70)}
FIXED_SHAPE = (1, 48, 64)

# Runs in a fresh interpreter, in a folder without the repository, with skd_jax and flax blocked:
# loads each artefact with JAX or TensorFlow alone and saves its outputs.
LOADER = textwrap.dedent('''
    import json, sys

    class Blocker:
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('skd_jax', 'flax'):
          raise ImportError(f'{name} must not be needed to run an export')
        return None

    sys.meta_path.insert(0, Blocker())
    import numpy as np
    import jax
    import tensorflow as tf

    jobs = json.loads(sys.argv[1])
    results = {}
    for job in jobs:
      images = np.load(job['images'])
      if job['format'] == 'tflite':
        converter = tf.lite.TFLiteConverter.from_saved_model(job['path'])
        interpreter = tf.lite.Interpreter(model_content=converter.convert())
        outputs = interpreter.get_signature_runner('serving_default')(images=images)
      elif job['format'] == 'jax':
        with open(job['path'], 'rb') as f:
          exported = jax.export.deserialize(bytearray(f.read()))
        outputs = exported.call(images)
        if job.get('wrong_shape'):
          try:
            exported.call(np.zeros(job['wrong_shape'], np.uint8))
            results[job['name'] + '/wrong_shape'] = np.array('accepted')
          except (TypeError, ValueError) as e:
            results[job['name'] + '/wrong_shape'] = np.array(str(e)[:200])
      else:
        model = tf.saved_model.load(job['path'])
        outputs = model.signatures['serving_default'](images=tf.constant(images))
      for key, value in outputs.items():
        results[f"{job['name']}/{key}"] = np.asarray(value)
    assert not any(m.split('.')[0] in ('skd_jax', 'flax') for m in sys.modules)
    np.savez(sys.argv[2], **results)
''')


def random_student(config, seed: int = 0):
  """The config's student with random weights and non-trivial BatchNorm statistics."""
  model = experiment.build_model(config, config.student)
  variables = jax.jit(lambda: model.init(jax.random.key(seed, impl='rbg'),
                                         jnp.zeros((1, 64, 64, 3)), train=False))()
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda x: np.asarray(x) + rng.uniform(0.0, 0.5, x.shape).astype(x.dtype),
                       variables['batch_stats'])
  return model, {'params': variables['params'], 'batch_stats': stats}


def reference(model, variables, images: np.ndarray, normalization: str, flip: bool):
  """(labels [N, H, W], logits [N, H, W, C] float64) of the Flax model, as described above."""
  x = pipeline.normalize(images, normalization).numpy()
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  h, w = images.shape[1:3]
  logits = np_resize_align_corners(np.asarray(apply(variables, x), np.float64), h, w)
  if flip:
    flipped = np_resize_align_corners(
        np.asarray(apply(variables, x[:, :, ::-1]), np.float64), h, w)[:, :, ::-1]
    logits = 0.5 * (logits + flipped)
  return logits.argmax(-1), logits


def assert_matches(labels, logits, want_labels, want_logits):
  scale = np.abs(want_logits).max()
  np.testing.assert_allclose(logits, want_logits, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * scale)
  # A pixel whose two best classes are closer than the logits' tolerance may flip either way
  # (none did when measured); every other pixel must agree.
  top2 = np.sort(want_logits, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 2 * LOGITS_RTOL * scale
  assert decided.mean() > 0.99
  np.testing.assert_array_equal(labels[decided], want_labels[decided])
  assert labels.dtype == np.int32 and labels.shape == want_labels.shape


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """Two exports of one random student, and what a fresh process computes with each.

  symbolic: any N, H, W, Caffe BGR normalisation, both formats, lowered for cpu, cuda, tpu.
  fixed: N, H, W = FIXED_SHAPE, ImageNet RGB normalisation, flip inference, both formats for
    the cpu, and the SavedModel converted to TFLite (which needs a fixed shape) by the loader.
  """
  root = tmp_path_factory.mktemp('export')
  config = load_test_config()
  model, variables = random_student(config)
  checkpoint = root / 'checkpoint'
  ckpt_lib.save_variables(checkpoint, variables, metadata=experiment.model_metadata(config))
  export.export_model(config, str(root / 'symbolic'), checkpoint=str(checkpoint))
  fixed_config = load_test_config()
  fixed_config.data.normalization = 'imagenet_rgb'
  fixed_config.eval.flip = True
  export.export_model(fixed_config, str(root / 'fixed'), checkpoint=str(checkpoint),
                      input_shape=','.join(map(str, FIXED_SHAPE)), platforms=('cpu',))

  rng = np.random.default_rng(1)
  images = {name: rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            for name, shape in dict(SYMBOLIC_BATCHES, fixed=FIXED_SHAPE).items()}
  for name, batch in images.items():
    np.save(root / f'{name}.npy', batch)
  jobs = [{'name': f'{fmt}/{name}', 'format': fmt, 'images': str(root / f'{name}.npy'),
           'path': str(root / 'symbolic' / (export.JAX_FILE if fmt == 'jax'
                                             else export.SAVED_MODEL_DIR))}
          for fmt in export.FORMATS for name in SYMBOLIC_BATCHES]
  jobs.append({'name': 'fixed/jax', 'format': 'jax', 'images': str(root / 'fixed.npy'),
               'path': str(root / 'fixed' / export.JAX_FILE), 'wrong_shape': [1, 64, 64, 3]})
  jobs.append({'name': 'fixed/tflite', 'format': 'tflite', 'images': str(root / 'fixed.npy'),
               'path': str(root / 'fixed' / export.SAVED_MODEL_DIR)})
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  run = subprocess.run([sys.executable, '-c', LOADER, json.dumps(jobs), str(root / 'out.npz')],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  outputs = dict(np.load(root / 'out.npz'))
  return {'root': root, 'model': model, 'variables': variables, 'images': images,
          'outputs': outputs}


@pytest.mark.parametrize('fmt', export.FORMATS)
@pytest.mark.parametrize('batch', list(SYMBOLIC_BATCHES))
def test_symbolic_export_reproduces_flax_model(exported, fmt, batch):
  want_labels, want_logits = reference(exported['model'], exported['variables'],
                                       exported['images'][batch], 'caffe_bgr', flip=False)
  out = exported['outputs']
  assert_matches(out[f'{fmt}/{batch}/labels'], out[f'{fmt}/{batch}/logits'], want_labels,
                 want_logits)


@pytest.mark.parametrize('fmt', ['jax', 'tflite'])
def test_fixed_export_with_flip_and_imagenet_normalization(exported, fmt):
  want_labels, want_logits = reference(exported['model'], exported['variables'],
                                       exported['images']['fixed'], 'imagenet_rgb', flip=True)
  out = exported['outputs']
  assert_matches(out[f'fixed/{fmt}/labels'], out[f'fixed/{fmt}/logits'], want_labels,
                 want_logits)
  if fmt == 'jax':   # its input size is part of the artefact: another is refused
    assert 'expected (1, 48, 64, 3)' in str(out['fixed/jax/wrong_shape'])


def test_metadata_describes_input_and_classes(exported):
  meta = json.loads((exported['root'] / 'symbolic' / export.METADATA_FILE).read_text())
  assert meta['input']['shape'] == ['b', 'h', 'w', 3] and meta['input']['dtype'] == 'uint8'
  assert meta['outputs']['logits']['shape'] == ['b', 'h', 'w', 19]
  assert meta['class_names'][0] == 'road' and len(meta['class_names']) == 19
  assert meta['palette'][0] == [128, 64, 128]
  assert meta['normalization'] == 'caffe_bgr' and meta['inference'] == 'whole image'
  assert meta['network']['depth'] == 18 and meta['network']['width_multiplier'] == 1 / 16
  assert meta['files'] == {'jax': export.JAX_FILE, 'saved_model': export.SAVED_MODEL_DIR}
  assert meta['platforms'] == ['cpu', 'cuda', 'tpu']
  fixed = json.loads((exported['root'] / 'fixed' / export.METADATA_FILE).read_text())
  assert fixed['input']['shape'] == [*FIXED_SHAPE, 3] and fixed['inference'] == 'whole image, flip'


def symbolic_call(fn, shapes, channels=2):
  """`fn` exported for images [n, h, w, channels] of symbolic n, h, w; called at each shape."""
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'n, h, w, {channels}'), jnp.float32)
  exported = jax.export.deserialize(jax.export.export(jax.jit(fn), platforms=('cpu',))(
      spec).serialize())
  rng = np.random.default_rng(3)
  for shape in shapes:
    x = rng.normal(size=(*shape, channels)).astype(np.float32)
    yield x, jax.tree.map(np.asarray, exported.call(x))


SYMBOLIC_TEST_SHAPES = [(1, 5, 7), (2, 65, 33), (1, 1, 4), (1, 9, 2)]


def test_symbolic_resize_matches_pytorch_definition():
  # Up to a size computed from the symbolic input's, and down to a fixed one.
  def fn(x):
    h, w = x.shape[1:3]
    return ops.resize_bilinear(x, (2 * h + 1, w)), ops.resize_bilinear(x, (3, 4))
  for x, (up, down) in symbolic_call(fn, SYMBOLIC_TEST_SHAPES):
    np.testing.assert_allclose(up, np_resize_align_corners(x, 2 * x.shape[1] + 1, x.shape[2]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(down, np_resize_align_corners(x, 3, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bins', [1, 2, 3, 6])
def test_symbolic_adaptive_pool_matches_pytorch_bins(bins):
  for x, got in symbolic_call(lambda x: ops.adaptive_avg_pool(x, bins), SYMBOLIC_TEST_SHAPES):
    np.testing.assert_allclose(got, np_adaptive_avg_pool(x, bins), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('ceil_mode', [True, False])
def test_symbolic_stem_pool_matches_pytorch_definition(ceil_mode):
  fn = lambda x: ops.pool2d(x, 3, 2, 1, ceil_mode=ceil_mode, mode='max')
  for x, got in symbolic_call(fn, SYMBOLIC_TEST_SHAPES):
    want = np_pool(x, 3, 2, 1, ceil_mode, 'max')
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize('normalization', pipeline.NORMALIZATIONS)
def test_normalize_matches_input_pipeline(normalization):
  images = np.random.default_rng(2).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  np.testing.assert_allclose(export.normalize(jnp.asarray(images), normalization),
                             pipeline.normalize(images, normalization).numpy(), rtol=1e-6,
                             atol=1e-5)


@pytest.mark.parametrize('changes,flags,message', [
    ({}, dict(formats=('onnx',)), r"--formats=onnx: unknown format\(s\) \['onnx'\]"),
    ({}, dict(platforms=('cuda', 'metal')), r"--platforms=cuda,metal: unknown platform"),
    ({}, dict(input_shape='b,h'), r"--input_shape='b,h': give N,H,W"),
    ({}, dict(input_shape='b,0,w'), r"--input_shape='b,0,w'"),
    ({'eval.scales': (0.75, 1.0)}, {}, r'needs a fixed image size'),
    ({'eval.sliding_window': True}, dict(input_shape='1,h,512'), r'needs a fixed image size'),
    ({'data.normalization': 'zca'}, {}, r"unknown data.normalization 'zca'"),
    ({}, dict(checkpoint=''), r'give the network to export: --checkpoint='),
])
def test_bad_arguments_are_named_before_anything_is_read(tmp_path, changes, flags, message):
  config = load_test_config()
  for key, value in changes.items():
    section, name = key.split('.')
    config[section][name] = value
  flags = dict(dict(checkpoint=str(tmp_path / 'never_read')), **flags)
  with pytest.raises(ValueError, match=message):
    export.export_model(config, str(tmp_path / 'out'), **flags)
  assert not (tmp_path / 'out').exists()


def test_unwritable_out_is_named(tmp_path):
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ValueError, match=r'--out=.*a_file/out: cannot write there'):
    export.export_model(load_test_config(), str(tmp_path / 'a_file' / 'out'),
                        checkpoint=str(tmp_path))


def test_missing_checkpoint_is_one_error_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'skd_jax.export', '--config=configs/test.py',
       f'--checkpoint={tmp_path / "no_such_run"}', f'--out={tmp_path / "out"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: checkpoint') and 'no_such_run' in last and 'does not exist' in last
  assert 'Traceback' not in out.stderr
