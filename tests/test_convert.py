"""PyTorch checkpoint import: the safe .pth reader, the key maps, and output parity with PyTorch.

The fixtures in data/parity/ were written by tools/make_parity_fixtures.py (PyTorch models of each
layout at reduced width, random weights and running statistics, and their eval-mode outputs) and,
for the reference's discriminator, by tools/make_step_fixture.py; no PyTorch is needed here.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import pickle
import shlex
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import torch_convert
from skd_jax import torch_io
from skd_jax.models import create_segmenter
from skd_jax.models.resnet import ResNet

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARITY = pathlib.Path(__file__).parent / 'data' / 'parity'
MANIFEST = json.loads((PARITY / 'manifest.json').read_text())
NUM_CLASSES = MANIFEST['num_classes']
FIXTURES = {f['name']: f for f in MANIFEST['fixtures']}
MODEL_FIXTURES = [n for n, f in FIXTURES.items() if f['layout'] in torch_convert.MODEL_LAYOUTS]
BACKBONE_FIXTURES = [n for n, f in FIXTURES.items()
                     if f['layout'] in torch_convert.BACKBONE_LAYOUTS]
ATOL = 1e-4


def fixture_path(name: str) -> pathlib.Path:
  return PARITY / f'{name}.pth'


def expected_outputs(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(NHWC float32 input, reference outputs) of a fixture."""
  arrays = dict(np.load(PARITY / f'{name}.npz'))
  h, w = arrays.pop('input_hw')
  # The generator stored the input at half resolution and repeated it 2x2 (see its comment).
  x = arrays.pop('input_half_res').astype(np.float32).repeat(2, axis=1).repeat(2, axis=2)
  return np.ascontiguousarray(x[:, :h, :w]), arrays


def zeros_like_init(model, shape=(1, 64, 64, 3)):
  """Variables of `model` filled with zeros (eager init of a ResNet-101 takes half a minute)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


@functools.lru_cache(maxsize=None)
def converted(name: str):
  return torch_convert.load_torch_variables(fixture_path(name), FIXTURES[name]['arch'], NUM_CLASSES)


@functools.lru_cache(maxsize=None)
def jitted_apply(arch: str, overrides: tuple):
  model = create_segmenter(arch, NUM_CLASSES, **dict(overrides))
  return jax.jit(lambda v, x: model.apply(v, x, train=False)[:2])


# ------------------------------------------------------------------------------------------------
# The reader.


@pytest.mark.parametrize('filename', ['tensors.pth', 'tensors_legacy.pth'])
def test_reads_dtypes_views_and_containers(filename):
  obj = torch_io.read_torch_file(PARITY / filename)
  expected = dict(np.load(PARITY / 'tensors.npz'))
  tensors = obj['tensors']
  wanted = set(expected) - (set(MANIFEST['tensor_fixture']['zip_only'])
                            if 'legacy' in filename else set())
  assert set(tensors) == wanted
  assert list(tensors)[:3] == ['base', 'transposed', 'window']  # order kept (OrderedDict)
  for key in wanted:
    got = tensors[key]
    assert isinstance(got, np.ndarray), key
    want = expected[key]
    assert got.shape == want.shape, key
    if key == 'bfloat16':
      assert got.dtype.name == 'bfloat16'
      np.testing.assert_array_equal(got.astype(np.float32), want)
    else:
      assert got.dtype == want.dtype, key
      np.testing.assert_array_equal(got, want, err_msg=key)
  # Views share the storage of `base` in the file, with offsets and strides.
  np.testing.assert_array_equal(tensors['transposed'], expected['base'].T)
  np.testing.assert_array_equal(tensors['window'], expected['base'][1:3, 2:5])
  np.testing.assert_array_equal(tensors['strided'], expected['base'][::2, ::3])
  row0, (row1, inner) = obj['nested']
  np.testing.assert_array_equal(row0, expected['base'][0])
  np.testing.assert_array_equal(row1, expected['base'][1, :2])
  assert float(inner['x']) == expected['base'][2, 1]
  assert obj['meta'] == {'epoch': 3, 'name': 'fixture', 'ratio': 0.5, 'flags': {1, 2}}


def test_reads_big_endian_zip(tmp_path):
  # A big-endian machine writes 'big' in <archive>/byteorder and its storages byte-swapped.
  src = fixture_path('skd_student_r18')  # float32 storages only
  dst = tmp_path / 'big.pth'
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    for info in zin.infolist():
      data = zin.read(info)
      if info.filename.endswith('/byteorder'):
        data = b'big'
      elif '/data/' in info.filename:
        data = np.frombuffer(data, '<f4').astype('>f4').tobytes()
      zout.writestr(info, data)
  little, big = torch_io.load_torch_state_dict(src), torch_io.load_torch_state_dict(dst)
  assert list(little) == list(big)
  for k in little:
    np.testing.assert_array_equal(little[k], big[k])
    assert big[k].dtype == np.float32


def test_unwraps_state_dict_model_and_module_prefix():
  # {'state_dict': {'module.pretrained...'}, 'epoch': .., 'best_pred': ..}
  teacher = torch_io.load_torch_state_dict(fixture_path('cirkd_teacher_r101'))
  assert all(k.startswith(('pretrained.', 'head.', 'auxlayer.')) for k in teacher)
  raw = torch_io.read_torch_file(fixture_path('cirkd_teacher_r101'))
  assert raw['epoch'] == 120 and next(iter(raw['state_dict'])).startswith('module.')
  # {'model': ..., 'args': {...}}
  tv = torch_io.load_torch_state_dict(fixture_path('torchvision_r18'))
  assert 'conv1.weight' in tv and 'fc.weight' in tv
  assert 'model' in torch_io.read_torch_file(fixture_path('torchvision_r18'))
  w = np.zeros(2, np.float32)
  assert list(torch_io.unwrap_state_dict({'model': {'module.a.weight': w}, 'epoch': 1})) == [
      'a.weight']
  assert list(torch_io.unwrap_state_dict({'state_dict': {'module.module.b': w}})) == ['b']
  assert list(torch_io.unwrap_state_dict({'module.c': w, 'd': w})) == ['module.c', 'd']
  with pytest.raises(torch_io.CheckpointError, match='no tensors'):
    torch_io.unwrap_state_dict({'epoch': 3}, 'x.pth')


# ------------------------------------------------------------------------------------------------
# Refusing what is not a checkpoint, or not safe.


def torch_zip(path: pathlib.Path, data_pkl: bytes) -> None:
  """A file laid out as torch.save's zip format, around an arbitrary data.pkl."""
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', data_pkl)
    zf.writestr('archive/byteorder', 'little')
    zf.writestr('archive/version', '3\n')


class _Payload:
  """Unpickling an instance calls `func(*args)`: the classic malicious-pickle construction."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


@pytest.mark.parametrize('wrap', ['bare', 'inside_state_dict', 'legacy'])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, wrap):
  marker = tmp_path / 'pwned'
  payload = _Payload(os.system, f'touch {shlex.quote(str(marker))}')
  global_name = f'{os.system.__module__}.system'  # posix.system
  path = tmp_path / 'evil.pth'
  if wrap == 'legacy':
    data = pickle.dumps(payload, protocol=2)
    path.write_bytes(data)
  else:
    obj = payload if wrap == 'bare' else {'state_dict': {'conv1.weight': payload}}
    data = pickle.dumps(obj, protocol=2)
    torch_zip(path, data)
  with pytest.raises(torch_io.UnsafeCheckpointError) as info:
    torch_convert.load_torch_variables(path, 'pspnet_resnet18', NUM_CLASSES)
  assert global_name in str(info.value) and str(path) in str(info.value)
  assert info.value.global_name == global_name
  assert not marker.exists()
  # Control: plain pickle would have run the command, so the refusal is what protected us.
  pickle.loads(data)
  assert marker.exists()


@pytest.mark.parametrize('module,name', [('builtins', 'eval'), ('subprocess', 'Popen'),
                                         ('torch', 'load'), ('numpy', 'load')])
def test_other_globals_are_refused(tmp_path, module, name):
  # GLOBAL opcode 'c<module>\n<name>\n', then an empty tuple and REDUCE: a call of module.name().
  path = tmp_path / 'evil.pth'
  torch_zip(path, b'\x80\x02c' + f'{module}\n{name}\n'.encode() + b')R.')
  with pytest.raises(torch_io.UnsafeCheckpointError, match=f"'{module}.{name}'"):
    torch_io.read_torch_file(path)


def _tensor_pickle(numel: int, size: int, stride: int, offset: int = 0) -> bytes:
  """data.pkl of one float32 tensor, written opcode by opcode (as torch.save would, protocol 2)."""
  text = lambda s: b'X' + struct.pack('<I', len(s)) + s.encode()
  small = lambda i: b'K' + bytes([i])
  return (b'\x80\x02' + b'ctorch._utils\n_rebuild_tensor_v2\n' + b'('
          + b'(' + text('storage') + b'ctorch\nFloatStorage\n' + text('0') + text('cpu')
          + small(numel) + b'tQ'                      # persistent id -> the storage
          + small(offset) + small(size) + b'\x85' + small(stride) + b'\x85'
          + b'\x89' + b'ccollections\nOrderedDict\n)R' + b'tR.')


def test_tensor_geometry_is_bounds_checked(tmp_path):
  def write(name, numel, nbytes, size, stride, offset=0):
    path = tmp_path / name
    torch_zip(path, _tensor_pickle(numel, size, stride, offset))
    with zipfile.ZipFile(path, 'a') as zf:
      zf.writestr('archive/data/0', np.arange(nbytes // 4, dtype='<f4').tobytes())
    return path

  good = torch_io.read_torch_file(write('good.pth', 6, 24, 3, 2, offset=1))
  np.testing.assert_array_equal(good, [1, 3, 5])
  # A tensor reaching past its storage: an error, not a read of whatever memory follows.
  with pytest.raises(torch_io.CheckpointError, match='reads element 12 of a storage of 6') as info:
    torch_io.read_torch_file(write('long.pth', 6, 24, 5, 3))
  assert 'long.pth' in str(info.value)
  # A storage file shorter than its declared size.
  with pytest.raises(torch_io.CheckpointError, match='has 8 bytes, expected 24'):
    torch_io.read_torch_file(write('short.pth', 6, 8, 2, 1))


@pytest.mark.parametrize('name,fraction', [('skd_student_r18', 0.5), ('skd_student_r18', 0.999),
                                           ('csail_r18', 0.5), ('csail_r18', 0.99),
                                           ('csail_r18', 0.0005)])
def test_truncated_file_is_a_clear_error(tmp_path, name, fraction):
  data = fixture_path(name).read_bytes()
  path = tmp_path / f'truncated_{name}.pth'
  path.write_bytes(data[:int(len(data) * fraction)])
  with pytest.raises(torch_io.CheckpointError, match='truncated|corrupt') as info:
    torch_io.load_torch_state_dict(path)
  assert str(path) in str(info.value)


def test_non_checkpoint_files_are_clear_errors(tmp_path):
  text = tmp_path / 'notes.pth'
  text.write_text('these are not the weights you are looking for\n')
  npz = tmp_path / 'arrays.pth'
  np.savez(npz, a=np.zeros(3))
  os.replace(str(npz) + '.npz', npz)
  plain = tmp_path / 'plain.pth'
  plain.write_bytes(pickle.dumps({'a': 1}))
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  for path in (text, npz, plain, empty):
    with pytest.raises(torch_io.CheckpointError, match='not a PyTorch checkpoint') as info:
      torch_convert.load_torch_variables(path, 'pspnet_resnet18', NUM_CLASSES)
    assert str(path) in str(info.value)
  with pytest.raises(FileNotFoundError):
    torch_io.read_torch_file(tmp_path / 'absent.pth')


# ------------------------------------------------------------------------------------------------
# Parity with PyTorch.


@pytest.mark.parametrize('name', MODEL_FIXTURES)
def test_segmentation_model_parity(name):
  spec = FIXTURES[name]
  state_dict = torch_io.load_torch_state_dict(fixture_path(name))
  assert torch_convert.detect_layout(list(state_dict)) == spec['layout']
  if spec.get('naming') == 'toolbox':  # the teacher checkpoint's naming, with its unused fc
    assert {'head.0.bottleneck.0.weight', 'head.1.weight', 'fc.weight'} <= set(state_dict)
  variables, overrides = converted(name)
  w = spec['width']
  assert overrides == {'width_multiplier': w, 'head_channels': spec['head_channels'],
                       'aux_channels': spec['aux_channels']}
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))
  x, want = expected_outputs(name)
  logits, aux = jitted_apply(spec['arch'], tuple(sorted(overrides.items())))(variables, x)
  assert logits.shape == want['logits'].shape
  np.testing.assert_allclose(logits, want['logits'], rtol=0, atol=ATOL)
  np.testing.assert_allclose(aux, want['aux_logits'], rtol=0, atol=ATOL)


def test_in_place_abn_scale_is_applied():
  # Negative control: the reference fixtures have negative BN weights, so using `weight` instead
  # of |weight| + 1e-5 as the scale changes the output a lot (the parity test would catch it).
  name = 'skd_student_r18'
  variables, overrides = converted(name)
  raw = torch_io.load_torch_state_dict(fixture_path(name))
  np.testing.assert_allclose(variables['params']['backbone']['bn1']['scale'],
                             np.abs(raw['bn1.weight']) + 1e-5, rtol=1e-7)
  signed = jax.tree_util.tree_map_with_path(
      lambda p, v: -v if jax.tree_util.keystr(p).endswith("['scale']") else v, variables)
  x, want = expected_outputs(name)
  logits, _ = jitted_apply(FIXTURES[name]['arch'], tuple(sorted(overrides.items())))(signed, x)
  assert np.abs(logits - want['logits']).max() > 100 * ATOL


@pytest.mark.parametrize('name', BACKBONE_FIXTURES)
def test_imagenet_backbone_parity(name):
  spec = FIXTURES[name]
  state_dict = torch_io.load_torch_state_dict(fixture_path(name))
  assert torch_convert.detect_layout(list(state_dict)) == spec['layout']
  assert 'fc.weight' in state_dict  # ignored explicitly
  backbone, overrides = torch_convert.torch_backbone_variables(fixture_path(name), spec['arch'])
  expected_overrides = {'width_multiplier': spec['width']}
  if spec['layout'] == 'torchvision':
    expected_overrides['stem'] = 'standard'
  assert overrides == expected_overrides
  assert set(backbone) == {'params', 'batch_stats'}
  assert set(backbone['params']) == {'backbone'} and set(backbone['batch_stats']) == {'backbone'}
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(backbone))  # also from fp16 / bf16

  model = create_segmenter(spec['arch'], NUM_CLASSES, **overrides)
  fresh = zeros_like_init(model)
  merged = torch_convert.merge_backbone(fresh, backbone)
  for collection in ('params', 'batch_stats'):  # heads untouched
    assert all(np.all(np.asarray(v) == 0) for k, sub in merged[collection].items()
               if k != 'backbone' for v in jax.tree.leaves(sub))
  x, want = expected_outputs(name)
  resnet = ResNet(depth=model.depth, output_stride=model.output_stride,
                  dilation_schedule=model.dilation_schedule, stem_ceil_mode=model.stem_ceil_mode,
                  width_multiplier=model.width_multiplier, stem=model.stem)
  layer4 = jax.jit(lambda v, x: resnet.apply(v, x, train=False)['layer4'])(
      {c: merged[c]['backbone'] for c in ('params', 'batch_stats')}, x)
  np.testing.assert_allclose(layer4, want['layer4'], rtol=0, atol=ATOL)


def test_load_torch_backbone_into_fresh_variables(tmp_path):
  name = 'torchvision_r18'
  arch = FIXTURES[name]['arch']
  expected, overrides = torch_convert.torch_backbone_variables(fixture_path(name), arch)
  fresh = zeros_like_init(create_segmenter(arch, NUM_CLASSES, **overrides))
  merged = torch_convert.load_torch_backbone(fixture_path(name), fresh)
  jax.tree.map(np.testing.assert_array_equal, merged['params']['backbone'],
               expected['params']['backbone'])
  jax.tree.map(np.testing.assert_array_equal, merged['params']['head'], fresh['params']['head'])
  # A deep-stem model cannot take torchvision's 7x7 stem: one error, with the fix.
  deep = zeros_like_init(create_segmenter(arch, NUM_CLASSES, width_multiplier=1 / 16))
  with pytest.raises(torch_convert.ConversionError, match="stem='standard'") as info:
    torch_convert.load_torch_backbone(fixture_path(name), deep)
  message = str(info.value)
  assert 'missing from the checkpoint' in message and 'wrong shape' in message
  assert 'conv1.weight: checkpoint (4, 3, 7, 7), model expects (4, 3, 3, 3)' in message
  # The backbone of a whole reference model initialises a student too (In-Place ABN applied).
  student, student_overrides = converted('skd_student_r18')
  fresh = zeros_like_init(create_segmenter('pspnet_resnet18', NUM_CLASSES, **student_overrides))
  merged = torch_convert.load_torch_backbone(fixture_path('skd_student_r18'), fresh)
  jax.tree.map(np.testing.assert_array_equal, merged['params']['backbone'],
               student['params']['backbone'])


# ------------------------------------------------------------------------------------------------
# Strictness and error messages.


def test_mismatch_is_one_error_listing_missing_unexpected_and_misshapen():
  name = 'skd_student_r18'
  state_dict = dict(torch_io.load_torch_state_dict(fixture_path(name)))
  del state_dict['layer2.0.bn1.running_var']
  state_dict['layer2.0.extra.weight'] = np.zeros(3, np.float32)
  state_dict['dsn.0.weight'] = state_dict['dsn.0.weight'][:, :-1]
  _, overrides = converted(name)
  abstract = zeros_like_init(create_segmenter('pspnet_resnet18', NUM_CLASSES, **overrides))
  with pytest.raises(torch_convert.ConversionError) as info:
    torch_convert.convert_state_dict(state_dict, abstract, 'skd_reference', source='student.pth')
  message = str(info.value)
  assert 'missing from the checkpoint (1)' in message and 'layer2.0.bn1.running_var' in message
  assert 'batch_stats/backbone/layer2_0/bn1/var' in message
  assert 'unexpected in the checkpoint (1)' in message and 'layer2.0.extra.weight' in message
  assert 'wrong shape (1)' in message
  assert f'dsn.0.weight: checkpoint {state_dict["dsn.0.weight"].shape}, model expects' in message
  # Not strict: unused tensors are tolerated, missing ones are not.
  with pytest.raises(torch_convert.ConversionError, match='missing') as info:
    torch_convert.convert_state_dict(state_dict, abstract, 'skd_reference', strict=False)
  assert 'unexpected' not in str(info.value)


def test_wrong_arch_or_classes_errors_say_why():
  path = fixture_path('skd_student_r18')
  with pytest.raises(torch_convert.ConversionError,
                     match='ResNet-18: use an arch ending in resnet18'):
    torch_convert.load_torch_variables(path, 'pspnet_resnet34', NUM_CLASSES)
  with pytest.raises(torch_convert.ConversionError,
                     match='classifiers have 5 outputs: num_classes'):
    torch_convert.load_torch_variables(path, 'pspnet_resnet18', 19)
  with pytest.raises(torch_convert.ConversionError, match='deeplabv3_resnet'):
    torch_convert.load_torch_variables(fixture_path('cirkd_student_r18'), 'pspnet_resnet18',
                                       NUM_CLASSES)
  with pytest.raises(torch_convert.ConversionError, match='load_torch_backbone'):
    torch_convert.load_torch_variables(fixture_path('csail_r18'), 'pspnet_resnet18', NUM_CLASSES)
  with pytest.raises(torch_convert.ConversionError, match='cannot tell the checkpoint layout'):
    torch_convert.detect_layout(['encoder.weight', 'decoder.weight'])


def test_standard_stem_option():
  model = create_segmenter('pspnet_resnet50', NUM_CLASSES, stem='standard', width_multiplier=1 / 8)
  params = zeros_like_init(model)['params']['backbone']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 8) and 'conv2' not in params
  with pytest.raises(ValueError, match='stem must be one of'):
    zeros_like_init(create_segmenter('pspnet_resnet18', NUM_CLASSES, stem='7x7'))


# ------------------------------------------------------------------------------------------------
# The command line and exports.


def convert_command(*flags: str) -> None:
  """Runs `python -m skd_jax.convert` with `flags`, as a user does."""
  done = subprocess.run([sys.executable, '-m', 'skd_jax.convert', *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]


def test_command_line_writes_an_export(tmp_path):
  checkpoint = pytest.importorskip('skd_jax.checkpoint')
  out = tmp_path / 'teacher'
  convert_command(f'--checkpoint={fixture_path("skd_teacher_r101")}', '--arch=pspnet_resnet101',
                  f'--num_classes={NUM_CLASSES}', f'--out={out}')
  variables, metadata = checkpoint.load_variables(out)
  expected, overrides = converted('skd_teacher_r101')
  assert metadata['arch'] == 'pspnet_resnet101' and metadata['num_classes'] == NUM_CLASSES
  assert metadata['overrides'] == overrides and metadata['layout'] == 'skd_reference'
  jax.tree.map(np.testing.assert_array_equal, dict(variables), expected)

  # An ImageNet backbone: written alone, and usable to initialise a model's backbone.
  out = tmp_path / 'imagenet'
  convert_command(f'--checkpoint={fixture_path("csail_r18")}', '--arch=pspnet_resnet18',
                  '--layout=csail_imagenet', f'--out={out}',
                  '--config.teacher.overrides.width_multiplier=0.0625')
  variables, metadata = checkpoint.load_variables(out)
  assert metadata['backbone_only'] and set(variables['params']) == {'backbone'}
  fresh = zeros_like_init(create_segmenter('pspnet_resnet18', NUM_CLASSES,
                                           **metadata['overrides']))
  merged = torch_convert.load_torch_backbone(out, fresh)
  direct = torch_convert.load_torch_backbone(fixture_path('csail_r18'), fresh)
  jax.tree.map(np.testing.assert_array_equal, merged, direct)


# ----------------------------------------------------------------------------------------------
# The reference's discriminator (written by tools/make_step_fixture.py: its initial
# discriminator as a reference-layout checkpoint, and PyTorch's train-mode scores on an input).

DISC_PTH = PARITY / 'step_parity_disc.pth'


def disc_fixture() -> dict[str, np.ndarray]:
  with np.load(PARITY / 'step_parity.npz') as f:
    return {k: f[k] for k in f.files if k.startswith(('disc_input', 'disc_scores', 'disc_after'))}


def test_reference_discriminator_converts_and_scores_as_pytorch():
  variables, model = torch_convert.load_torch_discriminator(DISC_PTH)
  assert model.features == (8, 8, 16, 16) and not model.image_conditioned
  state_dict = torch_io.load_torch_state_dict(DISC_PTH)
  # The spectral norms' sigma is u . (weight_bar v) of the checkpoint (NumPy, OIHW).
  for layer in ('l1', 'l2', 'l3', 'l4'):
    w = state_dict[f'{layer}.0.module.weight_bar'].astype(np.float64)
    u, v = (state_dict[f'{layer}.0.module.weight_{x}'].astype(np.float64) for x in 'uv')
    np.testing.assert_allclose(variables['batch_stats'][layer]['sn']['conv/kernel/sigma'],
                               u @ w.reshape(w.shape[0], -1) @ v, rtol=1e-6)
    np.testing.assert_array_equal(variables['params'][layer]['conv']['kernel'],
                                  np.transpose(w, (2, 3, 1, 0)).astype(np.float32))
  arrays = disc_fixture()
  x = arrays['disc_input_13x13'].astype(np.float32).repeat(5, axis=1).repeat(5, axis=2)  # 65x65
  scores, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  # Scores of about 0.1 from a float32 forward (10 layers, an input BatchNorm): PyTorch's and
  # ours differ by 9e-8 here (u by 1.2e-7, the running variance by 9e-8 relative); 1e-6 leaves
  # room for other CPUs, where a wrong key map or transposition moves them by 1e-2 or more.
  np.testing.assert_allclose(scores, arrays['disc_scores'], rtol=0, atol=1e-6)
  # And the forward advanced the state as PyTorch's did: u by one power iteration, the BN's
  # running statistics (PyTorch's unbiased variance).
  stats = updates['batch_stats']
  for layer in ('l1', 'l2', 'l3', 'l4'):
    np.testing.assert_allclose(stats[layer]['sn']['conv/kernel/u'][0],
                               arrays[f'disc_after/{layer}.0.module.weight_u'], atol=1e-6)
  for ours, theirs in (('mean', 'running_mean'), ('var', 'running_var')):
    np.testing.assert_allclose(stats['preprocess_additional'][ours],
                               arrays[f'disc_after/preprocess_additional.{theirs}'], rtol=1e-6)


def test_reference_discriminator_conversion_is_strict():
  state_dict = torch_io.load_torch_state_dict(DISC_PTH)
  _, model = torch_convert.load_torch_discriminator(DISC_PTH)
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 5)),
                                             train=False))
  broken = {k: v for k, v in state_dict.items() if k != 'l2.0.module.weight_v'}
  broken['attn1.extra'] = np.zeros(3, np.float32)
  broken['last.0.weight'] = np.zeros((1, 16, 3, 3), np.float32)
  with pytest.raises(torch_convert.ConversionError) as error:
    torch_convert.convert_discriminator_state_dict(broken, target, source='d.pth')
  message = str(error.value)
  assert 'd.pth does not fit the discriminator' in message
  assert 'l2.0.module.weight_v' in message.split('unexpected')[0]  # missing
  assert 'attn1.extra' in message and 'last.0.weight: checkpoint (1, 16, 3, 3)' in message
  # A discriminator given where a segmentation network is expected says what it is.
  with pytest.raises(torch_convert.ConversionError,
                     match='discriminator.*load_torch_discriminator'):
    torch_convert.load_torch_variables(DISC_PTH, 'pspnet_resnet18', 5)
