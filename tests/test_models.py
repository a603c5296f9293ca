"""Segmentation networks: parameter layouts and counts against the reference state_dicts, output
sizes, and blocks/heads against NumPy re-implementations of the reference formulas."""

import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from np_reference import (np_adaptive_avg_pool, np_batch_norm_eval, np_conv,
                          np_resize_align_corners, parse_state_dict_keys)
from skd_jax.models import create_segmenter
from skd_jax.models.heads import ASPPHead, AuxHead, PSPHead
from skd_jax.models.layers import BatchNorm
from skd_jax.models.resnet import BasicBlock, Bottleneck
from skd_jax import experiment

KEYS = pathlib.Path(__file__).parent / 'data' / 'state_dict_keys'
BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def abstract_variables(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def torch_param_shapes(filename, exclude_prefixes=()):
  """Trainable tensor shapes of a reference state_dict, PyTorch OIHW convs turned into HWIO."""
  shapes = []
  for name, shape in parse_state_dict_keys(KEYS / filename).items():
    if name.endswith(BUFFERS) or name.startswith(exclude_prefixes):
      continue
    shapes.append(tuple(shape[2:]) + (shape[1], shape[0]) if len(shape) == 4 else shape)
  return sorted(shapes)


@pytest.mark.parametrize('name,keys_file,exclude', [
    ('pspnet_resnet18', 'reference_student_pspnet_r18.txt', ()),
    ('pspnet_resnet101', 'reference_teacher_pspnet_r101.txt', ('fc.',)),
    ('deeplabv3_resnet18', 'cirkd_deeplabv3_resnet18.txt', ()),
    ('deeplabv3_resnet101', 'cirkd_deeplabv3_resnet101.txt', ()),
])
def test_parameter_layout_equals_reference_state_dict(name, keys_file, exclude):
  variables = abstract_variables(create_segmenter(name, 19), (1, 64, 64, 3))
  ours = sorted(x.shape for x in jax.tree.leaves(variables['params']))
  assert ours == torch_param_shapes(keys_file, exclude)
  # Every BN has its running mean and variance, of the right sizes.
  running = sorted(s for n, s in parse_state_dict_keys(KEYS / keys_file).items()
                   if n.endswith(('running_mean', 'running_var')))
  assert sorted(x.shape for x in jax.tree.leaves(variables['batch_stats'])) == running


@pytest.mark.parametrize('name,with_aux,without_aux', [
    ('pspnet_resnet18', 13.07, 12.77),
    ('pspnet_resnet101', 70.44, 65.71),
    ('deeplabv3_resnet18', 13.61, None),
    ('deeplabv3_resnet101', 61.12, None),
])
def test_parameter_counts_equal_published(name, with_aux, without_aux):
  count = lambda m: sum(x.size for x in jax.tree.leaves(
      abstract_variables(m, (1, 64, 64, 3))['params']))
  assert round(count(create_segmenter(name, 19)) / 1e6, 2) == with_aux
  if without_aux is not None:
    assert round(count(create_segmenter(name, 19, aux_channels=None)) / 1e6, 2) == without_aux


@pytest.mark.parametrize('name,overrides,in_hw,out_hw', [
    ('pspnet_resnet18', {}, (512, 512), (65, 65)),
    ('pspnet_resnet101', {}, (512, 512), (65, 65)),
    ('deeplabv3_resnet18', {}, (512, 1024), (64, 128)),
    ('deeplabv3_resnet101', {}, (512, 1024), (64, 128)),
    ('pspnet_resnet18', {}, (1024, 2048), (129, 257)),
    ('pspnet_resnet18', {'output_stride': 16}, (512, 512), (33, 33)),
    ('deeplabv3_resnet18', {'stem_ceil_mode': True}, (512, 1024), (65, 129)),
    ('pspnet_resnet50', {'dilation_schedule': 'cirkd', 'stem_ceil_mode': False}, (512, 512),
     (64, 64)),
])
def test_output_sizes(name, overrides, in_hw, out_hw):
  model = create_segmenter(name, 19, **overrides)
  shape = (1, *in_hw, 3)
  variables = abstract_variables(model, shape)
  logits, aux_logits, features = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  assert logits.shape == (1, *out_hw, 19) and aux_logits.shape == (1, *out_hw, 19)
  assert features['head'].shape[1:3] == out_hw
  assert set(features) >= {'head', 'stem', 'layer1', 'layer2', 'layer3', 'layer4'}


def test_unknown_model_name_lists_known_names():
  with pytest.raises(ValueError, match='pspnet_resnet18.*pspnet_resnet101|deeplabv3_resnet101'):
    create_segmenter('pspnet_resnet152', 19)
  with pytest.raises(ValueError, match="unknown override.*'widht'"):
    create_segmenter('pspnet_resnet18', 19, widht=0.5)


def randomise(variables, seed):
  """Random params and running stats (positive variances) so every term of a formula matters."""
  leaves, treedef = jax.tree.flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    key = jax.tree_util.keystr(path)
    if key.endswith("['var']"):
      out.append(jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32))
    else:
      out.append(jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32))
  return jax.tree.unflatten(treedef, out)


def to_np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), flax.core.unfreeze(tree))


def np_conv_params(p, **kw):
  return lambda x: np_conv(x, p['kernel'], bias=p.get('bias'), **kw)


@pytest.mark.parametrize('dilation,stage_dilation,stride', [(1, 2, 1), (2, 4, 1), (1, 1, 2)])
def test_basic_block_matches_numpy(dilation, stage_dilation, stride):
  x = np.random.default_rng(0).normal(size=(2, 9, 11, 4))
  block = BasicBlock(planes=6, stride=stride, dilation=dilation, stage_dilation=stage_dilation,
                     projection=True)
  variables = randomise(block.init(jax.random.key(0), jnp.zeros(x.shape), train=False), 1)
  got = block.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  p, s = to_np(variables['params']), to_np(variables['batch_stats'])
  relu = lambda v: np.maximum(v, 0)
  y = np_conv(x, p['conv1']['kernel'], stride=stride, padding=dilation, dilation=dilation)
  y = relu(np_batch_norm_eval(y, p['bn1'], s['bn1']))
  y = np_conv(y, p['conv2']['kernel'], padding=stage_dilation, dilation=stage_dilation)
  y = np_batch_norm_eval(y, p['bn2'], s['bn2'])
  short = np_batch_norm_eval(np_conv(x, p['downsample_conv']['kernel'], stride=stride),
                             p['downsample_bn'], s['downsample_bn'])
  np.testing.assert_allclose(got, relu(y + short), rtol=1e-4, atol=1e-4)


def test_bottleneck_matches_numpy():
  x = np.random.default_rng(0).normal(size=(1, 9, 9, 8))
  block = Bottleneck(planes=3, stride=2, dilation=2, projection=True)
  variables = randomise(block.init(jax.random.key(0), jnp.zeros(x.shape), train=False), 2)
  got = block.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  p, s = to_np(variables['params']), to_np(variables['batch_stats'])
  relu = lambda v: np.maximum(v, 0)
  y = relu(np_batch_norm_eval(np_conv(x, p['conv1']['kernel']), p['bn1'], s['bn1']))
  y = relu(np_batch_norm_eval(np_conv(y, p['conv2']['kernel'], stride=2, padding=2, dilation=2),
                              p['bn2'], s['bn2']))
  y = np_batch_norm_eval(np_conv(y, p['conv3']['kernel']), p['bn3'], s['bn3'])
  short = np_batch_norm_eval(np_conv(x, p['downsample_conv']['kernel'], stride=2),
                             p['downsample_bn'], s['downsample_bn'])
  assert got.shape == (1, 5, 5, 12)
  np.testing.assert_allclose(got, relu(y + short), rtol=1e-4, atol=1e-4)


def leaky(v):
  return np.where(v >= 0, v, 0.01 * v)


def test_psp_head_matches_numpy():
  x = np.random.default_rng(3).normal(size=(2, 13, 13, 5))
  head = PSPHead(num_classes=4, channels=3)
  variables = randomise(head.init(jax.random.key(0), jnp.zeros(x.shape), train=False), 3)
  logits, feature = head.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  p, s = to_np(variables['params']), to_np(variables['batch_stats'])
  branches = []
  for i, b in enumerate((1, 2, 3, 6)):
    y = np_conv(np_adaptive_avg_pool(x, b), p[f'stage{i}_conv']['kernel'])
    y = leaky(np_batch_norm_eval(y, p[f'stage{i}_bn'], s[f'stage{i}_bn']))
    branches.append(np_resize_align_corners(y, 13, 13))
  y = np.concatenate(branches + [x], axis=-1)
  y = np_conv(y, p['bottleneck_conv']['kernel'], padding=1)
  want_feature = leaky(np_batch_norm_eval(y, p['bottleneck_bn'], s['bottleneck_bn']))
  want_logits = np_conv(want_feature, p['classifier']['kernel'], bias=p['classifier']['bias'])
  np.testing.assert_allclose(feature, want_feature, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_aspp_head_matches_numpy():
  x = np.random.default_rng(4).normal(size=(1, 7, 9, 5))
  head = ASPPHead(num_classes=4, channels=3, rates=(1, 2, 3))
  variables = randomise(head.init(jax.random.key(0), jnp.zeros(x.shape), train=False), 4)
  logits, feature = head.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  p, s = to_np(variables['params']), to_np(variables['batch_stats'])
  relu = lambda v: np.maximum(v, 0)
  cbr = lambda y, name, **kw: relu(np_batch_norm_eval(
      np_conv(y, p[f'{name}_conv']['kernel'], **kw), p[f'{name}_bn'], s[f'{name}_bn']))
  branches = [cbr(x, 'aspp0')] + [cbr(x, f'aspp{r}', padding=r, dilation=r) for r in (1, 2, 3)]
  pooled = cbr(x.mean(axis=(1, 2), keepdims=True), 'aspp_pool')
  branches.append(np.broadcast_to(pooled, branches[0].shape))
  y = cbr(np.concatenate(branches, -1), 'project')
  want_feature = cbr(y, 'block', padding=1)
  np.testing.assert_allclose(feature, want_feature, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      logits, np_conv(want_feature, p['classifier']['kernel'], bias=p['classifier']['bias']),
      rtol=1e-4, atol=1e-4)


def test_aux_head_reference_flavour_matches_numpy():
  x = np.random.default_rng(5).normal(size=(1, 6, 6, 5))
  head = AuxHead(num_classes=4, channels=3)
  variables = randomise(head.init(jax.random.key(0), jnp.zeros(x.shape), train=False), 5)
  got = head.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  p, s = to_np(variables['params']), to_np(variables['batch_stats'])
  y = np_conv(x, p['conv']['kernel'], bias=p['conv']['bias'], padding=1)
  y = leaky(np_batch_norm_eval(y, p['bn'], s['bn']))
  want = np_conv(y, p['classifier']['kernel'], bias=p['classifier']['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_batch_norm_train_mode_uses_batch_stats_and_stores_unbiased_variance():
  x = np.random.default_rng(6).normal(2.0, 3.0, size=(2, 3, 4, 5))
  bn = BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.zeros(x.shape))
  y, updates = bn.apply(variables, jnp.asarray(x, jnp.float32), mutable=['batch_stats'])
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  n = 2 * 3 * 4
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * var * n / (n - 1),
                             rtol=1e-5)


def test_tiny_model_trains_in_bfloat16_with_float32_state():
  model = create_segmenter('pspnet_resnet18', 5, width_multiplier=1 / 32, dtype='bfloat16')
  images = jax.random.normal(jax.random.key(1), (2, 24, 24, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  (logits, aux, feats), updates = model.apply(
      variables, images, train=True, mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(2)})
  # Backbone and head features in bfloat16; the 1x1 classifiers give float32 logits.
  assert feats['layer4'].dtype == jnp.bfloat16 and feats['head'].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and logits.shape == (2, 4, 4, 5)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
  assert bool(jnp.all(jnp.isfinite(logits.astype(jnp.float32))))


def test_channel_dropout_drops_whole_channels_in_train_mode_only():
  model = create_segmenter('pspnet_resnet18', 5, width_multiplier=1 / 8, aux_channels=None)
  images = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  (_, aux, feats), _ = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                   rngs={'dropout': jax.random.key(3)})
  assert aux is None
  zero = np.all(np.asarray(feats['head']) == 0, axis=(1, 2))  # [N, C]: channel entirely zero
  some = np.any(np.asarray(feats['head']) == 0, axis=(1, 2))
  assert zero.any() and np.array_equal(zero, some)
  _, _, eval_feats = model.apply(variables, images, train=False)
  assert not np.any(np.all(np.asarray(eval_feats['head']) == 0, axis=(1, 2)))


def _train_grad_fn(model, variables, images):
  """The jitted gradient of a train-mode loss w.r.t. the parameters (and the new BN state)."""
  def loss(params):
    (logits, aux, _), updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
    return jnp.sum(logits**2) + jnp.sum(aux), updates
  return jax.jit(jax.grad(loss, has_aux=True))


def test_remat_recomputes_the_blocks_with_the_same_gradients():
  # The program handed to XLA recomputes the residual blocks' forward in the backward pass
  # (every conv without a policy that keeps them; the BatchNorms with 'convs_saveable'), and the
  # gradients and BN statistics are those of the model without remat.
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  make = lambda remat: create_segmenter('pspnet_resnet18', 5, width_multiplier=1 / 32,
                                        remat=remat)
  variables = jax.jit(make('none').init, static_argnames='train')(
      jax.random.key(0), images, train=False)
  grad_fns = {r: _train_grad_fn(make(r), variables, images)
              for r in ('none', 'nothing_saveable', 'convs_saveable')}
  hlo = {r: f.lower(variables['params']).as_text() for r, f in grad_fns.items()}
  assert hlo['nothing_saveable'].count('stablehlo.convolution') > hlo['none'].count(
      'stablehlo.convolution')
  assert hlo['convs_saveable'].count('stablehlo.convolution') == hlo['none'].count(
      'stablehlo.convolution')
  assert hlo['convs_saveable'].count('stablehlo.rsqrt') > hlo['none'].count('stablehlo.rsqrt')
  # Same operations on the same values: equal up to the float32 rounding of a different
  # schedule (measured: identical on XLA:CPU, which merges the recomputation back).
  want = grad_fns['none'](variables['params'])
  got = grad_fns['nothing_saveable'](variables['params'])
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def test_unknown_remat_policy_lists_the_policies():
  model = create_segmenter('pspnet_resnet18', 5, width_multiplier=1 / 16, remat='everything')
  with pytest.raises(ValueError, match="remat must be one of .*'nothing_saveable'"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def head_outputs(seed: int, **overrides):
  """Train-mode (logits, aux logits, head feature) of one fixed tiny PSPNet under dropout `seed`."""
  model = create_segmenter('pspnet_resnet18', 5, width_multiplier=1 / 8, **overrides)
  images = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
  variables = model.init(jax.random.key(0), images, train=False)  # the same for any rate
  (logits, aux, feats), _ = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                        rngs={'dropout': jax.random.key(seed)})
  return np.asarray(logits), np.asarray(aux), np.asarray(feats['head'])


def test_dropout_rates_are_overrides():
  """head_dropout / aux_dropout set the rates; 0 makes the train-mode forward deterministic."""
  logits, aux, feature = head_outputs(3, head_dropout=0.0, aux_dropout=0.0)
  other = head_outputs(4, head_dropout=0.0, aux_dropout=0.0)
  for a, b in zip((logits, aux, feature), other):
    np.testing.assert_array_equal(a, b)
  assert not np.any(np.all(feature == 0, axis=(1, 2)))
  # The reference's 0.1 (the default) and 0.5 drop whole channels of that same feature and
  # scale the others by 1 / (1 - rate).
  for rate in (0.1, 0.5):
    _, dropped_aux, dropped = head_outputs(3, head_dropout=rate)
    kept = np.any(dropped != 0, axis=(1, 2), keepdims=True)  # [N, 1, 1, C]
    np.testing.assert_allclose(dropped, np.where(kept, feature / (1 - rate), 0), rtol=1e-5,
                               atol=1e-6)
    assert 0 < np.mean(~kept) < 2 * rate + 0.1
    assert not np.array_equal(dropped_aux, aux)  # the aux head's default 0.1


def test_dropout_is_settable_from_the_command_line(monkeypatch):
  """As skd_jax.main parses it (config_flags reads the overrides from sys.argv)."""
  from absl import flags
  from ml_collections import config_flags
  from skd_jax import train
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True)
  argv = ['main', f'--config={pathlib.Path(__file__).parents[1] / "configs" / "test.py"}',
          '--config.student.overrides.head_dropout=0', '--config.student.overrides.aux_dropout=0']
  monkeypatch.setattr('sys.argv', argv)
  flag_values(argv)
  model = experiment.build_model(flag_values.config, flag_values.config.student)
  assert (model.head_dropout, model.aux_dropout, model.width_multiplier) == (0.0, 0.0, 1 / 16)


def test_every_segmenter_field_a_config_may_set_is_declared_in_the_base_config():
  """`config_base.segmenter_overrides` lists the Segmenter's fields, each None (the preset's
  value), but those the config sets elsewhere (num_classes: data.num_classes; dtype, remat)."""
  import dataclasses
  from skd_jax import config_base
  from skd_jax.models import Segmenter
  fields = {f.name for f in dataclasses.fields(Segmenter)} - {'parent', 'name', 'num_classes',
                                                              'dtype', 'remat'}
  declared = config_base.segmenter_overrides()
  assert set(declared) == fields
  assert all(value is None for value in declared.values())
