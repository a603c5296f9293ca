"""Tests of the SAGAN-style discriminator: reference layout, and values against NumPy."""

from __future__ import annotations

import functools
import pathlib
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax.models import discriminator as disc_lib
from skd_jax.models.discriminator import Discriminator, SelfAttention, SpectralConv

_KEYS_FILE = (pathlib.Path(__file__).parent / 'data' / 'state_dict_keys' /
              'reference_discriminator.txt')
_TINY = (4, 8, 16, 16)
_EPS = 1e-5


def _parse_state_dict_keys(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
  """Parses lines of the form ``name (d0, d1, ...)`` into {name: shape}."""
  shapes = {}
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    m = re.fullmatch(r'(\S+) \(([\d, ]*)\)', line.strip())
    assert m, f'unparsable line {line!r}'
    shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(',') if d.strip())
  return shapes


def _key(seed: int) -> jax.Array:
  # XLA's RngBitGenerator: initialising with it compiles several times faster on CPU than with
  # the default threefry, which dominated this file's runtime.
  return jax.random.key(seed, impl='rbg')


def _init(model, *args, seed: int = 0, **kwargs):
  """Jitted model.init (one compilation instead of one per op)."""
  return jax.jit(functools.partial(model.init, **kwargs))(_key(seed), *args)


_JITTED = {}


def _apply(model, variables, *args, **kwargs):
  """Jitted model.apply; compiled functions are reused across calls with the same options."""
  key = (repr(model), repr(sorted(kwargs.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(functools.partial(model.apply, **kwargs))
  return _JITTED[key](variables, *args)


def _flat(tree) -> dict[str, np.ndarray]:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _reference_key_map() -> dict[str, str]:
  """Flax variable path -> reference PyTorch state_dict key (for 'params' and 'batch_stats')."""
  mapping = {}
  for i in (1, 2, 3, 4):
    mapping[f'params/l{i}/conv/kernel'] = f'l{i}.0.module.weight_bar'
    mapping[f'params/l{i}/conv/bias'] = f'l{i}.0.module.bias'
    mapping[f'batch_stats/l{i}/sn/conv/kernel/u'] = f'l{i}.0.module.weight_u'
  for i in (1, 2):
    mapping[f'params/attn{i}/gamma'] = f'attn{i}.gamma'
    for conv in ('query_conv', 'key_conv', 'value_conv'):
      mapping[f'params/attn{i}/{conv}/kernel'] = f'attn{i}.{conv}.weight'
      mapping[f'params/attn{i}/{conv}/bias'] = f'attn{i}.{conv}.bias'
  mapping['params/last/kernel'] = 'last.0.weight'
  mapping['params/last/bias'] = 'last.0.bias'
  mapping['params/preprocess_additional/scale'] = 'preprocess_additional.weight'
  mapping['params/preprocess_additional/bias'] = 'preprocess_additional.bias'
  mapping['batch_stats/preprocess_additional/mean'] = 'preprocess_additional.running_mean'
  mapping['batch_stats/preprocess_additional/var'] = 'preprocess_additional.running_var'
  return mapping


def _torch_shape_to_flax(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:  # OIHW -> HWIO.
    o, i, h, w = shape
    return (h, w, i, o)
  return shape


@pytest.fixture(scope='module')
def reference_shapes():
  model = Discriminator()
  return jax.eval_shape(
      lambda: model.init(_key(0), jnp.zeros((2, 65, 65, 19)), train=False))


# ----------------------------------------------------------------------------------------------
# Parameter layout and counts against the reference state_dict.


def test_param_count_and_shapes_match_reference(reference_shapes):
  torch_shapes = _parse_state_dict_keys(_KEYS_FILE)
  variables = _flat(reference_shapes)
  mapping = _reference_key_map()

  # (b) Every flax variable has a reference counterpart of the same (transposed) shape.
  assert set(variables) - {k for k in variables if k.endswith('/sigma')} == set(mapping)
  for flax_key, torch_key in mapping.items():
    flax_shape = variables[flax_key].shape
    torch_shape = _torch_shape_to_flax(torch_shapes[torch_key])
    if flax_key.endswith('/u'):
      torch_shape = (1,) + torch_shape  # Flax keeps u as a [1, out] row.
    assert flax_shape == torch_shape, (flax_key, torch_key)
  for flax_key, value in variables.items():
    if flax_key.endswith('/sigma'):
      assert value.shape == ()
  # The reference's weight_v (recomputed from u in every forward, so Flax keeps none) has one entry
  # per row of the flattened kernel.
  for i in (1, 2, 3, 4):
    kernel_shape = variables[f'params/l{i}/conv/kernel'].shape
    assert torch_shapes[f'l{i}.0.module.weight_v'] == (int(np.prod(kernel_shape[:-1])),)

  # (a) Trainable parameters: all reference entries but u, v and the BN buffers.
  buffers = ('weight_u', 'weight_v', 'running_mean', 'running_var', 'num_batches_tracked')
  trainable_torch = {k: s for k, s in torch_shapes.items() if not k.endswith(buffers)}
  assert set(trainable_torch) == {t for f, t in mapping.items() if f.startswith('params/')}
  torch_count = sum(int(np.prod(s)) for s in trainable_torch.values())
  flax_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(reference_shapes['params']))
  assert flax_count == torch_count == 3_191_721

  # (c) The reference's nn.Parameters (weight_bar, bias, weight_u, weight_v, gamma, BN affine).
  params_total = sum(
      int(np.prod(s)) for k, s in torch_shapes.items()
      if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
  assert params_total == 3_200_153
  assert round(params_total / 1e6, 2) == 3.20


def test_reference_width_collections(reference_shapes):
  stats = _flat(reference_shapes['batch_stats'])
  assert stats['l1/sn/conv/kernel/u'].shape == (1, 64)
  assert stats['l4/sn/conv/kernel/u'].shape == (1, 512)
  assert stats['preprocess_additional/mean'].shape == (19,)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(reference_shapes))


def test_initialisation(tiny_init):
  """PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every conv kernel (the
  spectral-norm ones stored raw, as the reference's weight_bar) and every bias; gamma 0; BN the
  identity."""
  variables = tiny_init
  flat = _flat(variables['params'])
  for path, value in flat.items():
    if not path.endswith('kernel'):
      continue
    value = np.asarray(value, np.float64)
    bound = 1.0 / np.sqrt(np.prod(value.shape[:-1]))
    bias = np.asarray(flat[path[:-len('kernel')] + 'bias'])
    assert np.abs(bias).max() <= bound, path
    # Uniform over the whole range, not a narrower normal (nor a kernel divided by its sigma).
    assert 0.5 * bound < np.abs(value).max() <= bound, path
    np.testing.assert_allclose(np.std(value), bound / np.sqrt(3), rtol=0.25, err_msg=path)
  for attn in ('attn1', 'attn2'):
    np.testing.assert_array_equal(flat[f'{attn}/gamma'], [0.0])
  np.testing.assert_array_equal(flat['preprocess_additional/scale'], np.ones(3))
  np.testing.assert_array_equal(flat['preprocess_additional/bias'], np.zeros(3))
  stats = _flat(variables['batch_stats'])
  np.testing.assert_array_equal(stats['preprocess_additional/var'], np.ones(3))
  np.testing.assert_array_equal(stats['l2/sn/conv/kernel/sigma'], 1.0)
  assert stats['l2/sn/conv/kernel/u'].shape == (1, _TINY[1])


def test_min_input_size():
  assert disc_lib.MIN_INPUT_SIZE == 64
  assert disc_lib.score_map_size(65) == 1
  assert disc_lib.score_map_size(64) == 1
  assert disc_lib.score_map_size(128) == 5
  assert disc_lib.score_map_size(63) == 0


# ----------------------------------------------------------------------------------------------
# NumPy re-implementation (float64), written from the reference's PyTorch formulas.


def np_conv(x, kernel, bias, stride, pad):
  """x [N, H, W, Ci], kernel HWIO: PyTorch Conv2d with symmetric zero padding."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  windows = windows[:, ::stride, ::stride]  # [N, Ho, Wo, Ci, kh, kw]
  return np.einsum('nhwcij,ijco->nhwo', windows, kernel) + bias


def np_spectral_normalise(kernel_hwio, u):
  """SAGAN's SpectralNorm._update_u_v: one power iteration on weight.view(out, -1)."""
  w = np.transpose(kernel_hwio, (3, 2, 0, 1))  # OIHW as in PyTorch.
  w_mat = w.reshape(w.shape[0], -1)
  v = w_mat.T @ u
  v = v / np.linalg.norm(v)
  u = w_mat @ v
  u = u / np.linalg.norm(u)
  sigma = u @ (w_mat @ v)
  return kernel_hwio / sigma, u, sigma


def np_self_attention(x_nhwc, p):
  """The SAGAN Self_Attn forward, in PyTorch's NCHW orientation."""
  x = np.transpose(x_nhwc, (0, 3, 1, 2))  # [B, C, H, W]
  b, c, h, w = x.shape

  def conv1x1(name):
    k = p[name]['kernel'][0, 0]  # [Ci, Co]
    return np.einsum('bchw,co->bohw', x, k) + p[name]['bias'][None, :, None, None]

  proj_query = conv1x1('query_conv').reshape(b, -1, h * w).transpose(0, 2, 1)  # B x N x C'
  proj_key = conv1x1('key_conv').reshape(b, -1, h * w)  # B x C' x N
  energy = proj_query @ proj_key  # B x N x N
  energy = energy - energy.max(axis=-1, keepdims=True)
  attention = np.exp(energy) / np.exp(energy).sum(axis=-1, keepdims=True)
  proj_value = conv1x1('value_conv').reshape(b, -1, h * w)  # B x C x N
  out = proj_value @ attention.transpose(0, 2, 1)  # B x C x N
  out = p['gamma'][0] * out.reshape(b, c, h, w) + x
  return np.transpose(out, (0, 2, 3, 1))


def np_leaky(x):
  return np.where(x >= 0, x, 0.1 * x)


def np_discriminator(logits, params, stats, train):
  """Returns (scores [N], new u per layer, new BN mean and var)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
  x = np.asarray(logits, np.float64)
  bn = p['preprocess_additional']
  if train:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  else:
    mean, var = s['preprocess_additional']['mean'], s['preprocess_additional']['var']
  x = (x - mean) / np.sqrt(var + _EPS) * bn['scale'] + bn['bias']
  new_u = {}
  for layer in ('l1', 'l2', 'l3', 'l4'):
    u = s[layer]['sn']['conv/kernel/u'][0]
    kernel, new_u[layer], _ = np_spectral_normalise(p[layer]['conv']['kernel'], u)
    x = np_leaky(np_conv(x, kernel, p[layer]['conv']['bias'], 2, 1))
    if layer == 'l3':
      x = np_self_attention(x, p['attn1'])
    if layer == 'l4':
      x = np_self_attention(x, p['attn2'])
  x = np_conv(x, p['last']['kernel'], p['last']['bias'], 1, 0)
  return x.mean(axis=(1, 2, 3)), new_u, (mean, var)


def _randomise(variables, seed=0):
  """Makes gammas, BN affine and BN statistics of freshly initialised variables non-trivial."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, variables['params'])
  stats = jax.tree.map(np.asarray, variables['batch_stats'])
  params['attn1']['gamma'] = np.array([0.7], np.float32)
  params['attn2']['gamma'] = np.array([-1.3], np.float32)
  c = params['preprocess_additional']['scale'].shape[0]
  params['preprocess_additional']['scale'] = rng.uniform(0.5, 1.5, c).astype(np.float32)
  params['preprocess_additional']['bias'] = rng.normal(size=c).astype(np.float32)
  stats['preprocess_additional']['mean'] = rng.normal(size=c).astype(np.float32)
  stats['preprocess_additional']['var'] = rng.uniform(0.5, 2.0, c).astype(np.float32)
  return {'params': params, 'batch_stats': stats}


@pytest.fixture(scope='module')
def tiny_init():
  """Freshly initialised variables of Discriminator(features=_TINY) for 3 input channels."""
  return jax.jit(functools.partial(disc_lib.init_variables, Discriminator(features=_TINY)))(
      _key(3), jnp.zeros((2, 64, 64, 3)))


@pytest.fixture(scope='module')
def tiny_variables(tiny_init):
  """tiny_init with non-trivial gammas and BN (the variables do not depend on H, W)."""
  return _randomise(tiny_init, seed=3)


@pytest.fixture(scope='module')
def reference_variables(reference_shapes):
  """Random variables of the reference-width Discriminator for 19 input channels.

  Filled in NumPy from the abstract shapes: a jitted init at this width compiles for several
  seconds, and initialisation itself is tested at tiny width.
  """
  rng = np.random.default_rng(8)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('kernel', 'bias'):
      bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]) if name == 'kernel' else leaf.shape[0])
      return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    if name.endswith('/u'):
      return rng.normal(size=leaf.shape).astype(np.float32)
    if name in ('scale', 'var') or name.endswith('/sigma'):
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)  # gamma, BN bias and mean.

  return jax.tree_util.tree_map_with_path(fill, reference_shapes)


@pytest.fixture(scope='module')
def attention_params():
  """SelfAttention params for 16 channels, as NumPy arrays."""
  variables = _init(SelfAttention(), jnp.zeros((2, 4, 4, 16)), seed=1)
  return jax.tree.map(np.asarray, variables['params'])


# ----------------------------------------------------------------------------------------------
# Values.


def test_self_attention_matches_sagan_formula(attention_params):
  x = np.random.default_rng(1).normal(size=(2, 5, 6, 16)).astype(np.float32)
  params = dict(attention_params)
  assert params['query_conv']['kernel'].shape == (1, 1, 16, 2)
  assert params['key_conv']['kernel'].shape == (1, 1, 16, 2)
  assert params['value_conv']['kernel'].shape == (1, 1, 16, 16)
  params['gamma'] = np.array([0.9], np.float32)
  # Larger query weights so that the softmax is far from uniform.
  params['query_conv'] = dict(params['query_conv'], kernel=params['query_conv']['kernel'] * 4)
  got = _apply(SelfAttention(), {'params': params}, x)
  want = np_self_attention(x.astype(np.float64), params)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # And it is not the identity: the attention term matters.
  assert np.abs(want - x).max() > 1e-1


def test_self_attention_is_identity_at_init(attention_params):
  x = np.random.default_rng(2).normal(size=(2, 4, 4, 16)).astype(np.float32)
  np.testing.assert_array_equal(attention_params['gamma'], [0.0])
  out = _apply(SelfAttention(), {'params': attention_params}, x)
  np.testing.assert_array_equal(np.asarray(out), x)


@pytest.mark.parametrize('train', [False, True])
def test_forward_matches_numpy(tiny_variables, train):
  model = Discriminator(features=_TINY)
  x = np.random.default_rng(3).normal(1.0, 2.0, size=(2, 64, 80, 3)).astype(np.float32)
  variables = tiny_variables
  if train:
    scores, updates = _apply(model, variables, x, train=True, mutable=['batch_stats'])
  else:
    scores = _apply(model, variables, x, train=False)
  want, new_u, (mean, var) = np_discriminator(x, variables['params'], variables['batch_stats'],
                                              train)
  assert scores.shape == (2,) and scores.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-4, atol=1e-5)
  if train:
    # u advanced by one power iteration; BN running statistics by PyTorch momentum 0.1, with
    # PyTorch's unbiased running variance.
    stats = updates['batch_stats']
    for layer, u in new_u.items():
      np.testing.assert_allclose(np.asarray(stats[layer]['sn']['conv/kernel/u'][0]), u,
                                 rtol=1e-4, atol=1e-6)
    old = variables['batch_stats']['preprocess_additional']
    n = x.size // x.shape[-1]
    np.testing.assert_allclose(np.asarray(stats['preprocess_additional']['mean']),
                               0.9 * old['mean'] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats['preprocess_additional']['var']),
                               0.9 * old['var'] + 0.1 * var * n / (n - 1), rtol=1e-5, atol=1e-6)


def test_eval_does_not_update_state(tiny_variables):
  model = Discriminator(features=_TINY)
  x = np.random.default_rng(4).normal(size=(2, 64, 64, 3)).astype(np.float32)
  _, updates = _apply(model, tiny_variables, x, train=False, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'],
               tiny_variables['batch_stats'])


def test_train_uses_statistics_of_each_call(tiny_variables):
  """In train mode the BN normalises with the batch of this call, so partners change a score."""
  model = Discriminator(features=_TINY)
  rng = np.random.default_rng(5)
  a = rng.normal(size=(1, 64, 64, 3)).astype(np.float32)
  b1 = rng.normal(size=(1, 64, 64, 3)).astype(np.float32)
  b2 = 3.0 * rng.normal(size=(1, 64, 64, 3)).astype(np.float32) + 2.0

  def score_of_a(partner, train):
    batch = np.concatenate([a, partner])
    if train:
      return _apply(model, tiny_variables, batch, train=True, mutable=['batch_stats'])[0][0]
    return _apply(model, tiny_variables, batch, train=False)[0]

  assert abs(score_of_a(b1, True) - score_of_a(b2, True)) > 1e-4
  np.testing.assert_allclose(score_of_a(b1, False), score_of_a(b2, False), rtol=1e-6)


def test_spectral_norm_converges_to_unit_singular_value(reference_variables):
  """After repeated train calls each normalised kernel, viewed as PyTorch's weight.view(out, -1),
  has largest singular value 1 (the reference model's four kernels, 19 input channels)."""
  layers = {name: SpectralConv(width) for name, width in zip(('l1', 'l2', 'l3', 'l4'),
                                                             (64, 128, 256, 512))}
  params = reference_variables['params']
  # Tiny inputs: the power iteration, not the convolution, is the work here.
  inputs = {name: jnp.ones((1, 4, 4, params[name]['conv']['kernel'].shape[2])) for name in layers}

  def step(stats):
    new = {}
    for name, layer in layers.items():
      _, updates = layer.apply({'params': params[name], 'batch_stats': stats[name]},
                               inputs[name], train=True, mutable=['batch_stats'])
      new[name] = updates['batch_stats']
    return new

  stats0 = {name: reference_variables['batch_stats'][name] for name in layers}
  run = jax.jit(lambda s: (step(s), jax.lax.fori_loop(0, 300, lambda _, s: step(s), s)))
  first, converged = run(stats0)
  for name in layers:
    kernel = np.asarray(params[name]['conv']['kernel'], np.float64)
    w_mat = np.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[-1], -1)
    # Largest singular value via the [out, out] Gram matrix (a full SVD takes seconds here).
    sigma_true = np.sqrt(np.linalg.eigvalsh(w_mat @ w_mat.T)[-1])
    top = lambda stats: sigma_true / float(stats[name]['sn']['conv/kernel/sigma'])
    # The power-iteration estimate of sigma never exceeds the true one, and approaches it; one
    # iteration from the random initial u is far from converged, so the loop did the work.
    assert 1.0 - 1e-5 <= top(converged) < 1.0 + 2e-3, name
    assert top(first) > top(converged) + 1e-2, name


# ----------------------------------------------------------------------------------------------
# Input sizes, variants, dtypes, gradients.


def _is_last(mdl, _) -> bool:
  return mdl.name == 'last'


def _final_map(model, variables, x, **kwargs):
  scores, state = _apply(model, variables, x, train=False, capture_intermediates=_is_last,
                         **kwargs)
  return scores, state['intermediates']['last']['__call__'][0]


@pytest.mark.parametrize('shape,final', [((65, 65), (1, 1)), ((64, 128), (1, 5)),
                                         ((64, 64), (1, 1)), ((79, 101), (1, 3))])
def test_input_sizes(tiny_variables, shape, final):
  model = Discriminator(features=_TINY)
  x = np.random.default_rng(7).normal(size=(2, *shape, 3)).astype(np.float32)
  scores, last = _final_map(model, tiny_variables, x)
  assert last.shape == (2, *final, 1)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(last).mean(axis=(1, 2, 3)),
                             rtol=1e-6)


@pytest.mark.parametrize('shape', [(33, 47), (63, 128), (128, 60)])
def test_too_small_inputs_raise(shape):
  model = Discriminator(features=_TINY)
  with pytest.raises(ValueError, match='at least 64x64'):
    jax.eval_shape(lambda: model.init(_key(0), jnp.zeros((1, *shape, 3)), train=False))


def test_reference_width_65x65_forward(reference_variables):
  model = Discriminator()
  x = np.random.default_rng(8).normal(size=(2, 65, 65, 19)).astype(np.float32)
  scores, _ = _apply(model, reference_variables, x, train=True, mutable=['batch_stats'])
  assert scores.shape == (2,) and np.all(np.isfinite(scores))
  eval_scores, last = _final_map(model, reference_variables, x)
  assert last.shape == (2, 1, 1, 1)
  np.testing.assert_allclose(np.asarray(eval_scores), np.asarray(last)[:, 0, 0, 0], rtol=1e-6)


def test_image_conditioned_variant():
  model = Discriminator(features=_TINY, image_conditioned=True)
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 64, 72, 5)).astype(np.float32)
  image = rng.normal(size=(2, 128, 144, 3)).astype(np.float32)
  variables = _init(model, logits, image, seed=9, train=False)
  assert variables['params']['l1']['conv']['kernel'].shape == (4, 4, 5 + 3, _TINY[0])
  assert 'preprocess_additional' not in variables['params']
  assert 'preprocess_additional' not in variables['batch_stats']

  apply = functools.partial(_apply, model, train=False)
  scores = apply(variables, logits, image)
  assert scores.shape == (2,) and scores.dtype == jnp.float32
  other = apply(variables, logits, image + rng.normal(size=image.shape).astype(np.float32))
  assert np.all(np.abs(np.asarray(scores) - np.asarray(other)) > 1e-6)
  # Only softmax(logits) enters: adding a per-pixel constant changes nothing.
  shift = rng.normal(size=(2, 64, 72, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(apply(variables, logits + shift, image)),
                             np.asarray(scores), rtol=1e-4, atol=1e-6)
  # Train mode updates only the spectral-norm state.
  _, updates = jax.eval_shape(functools.partial(model.apply, train=True, mutable=['batch_stats']),
                              variables, logits, image)
  assert set(updates['batch_stats']) == {'l1', 'l2', 'l3', 'l4'}


def test_image_argument_checked():
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match='needs the image'):
    jax.eval_shape(lambda: Discriminator(features=_TINY, image_conditioned=True).init(
        _key(0), x, train=False))
  with pytest.raises(ValueError, match='image_conditioned=False'):
    jax.eval_shape(lambda: Discriminator(features=_TINY).init(_key(0), x, x, train=False))


def test_bfloat16_computation(tiny_variables):
  x = np.random.default_rng(10).normal(size=(2, 64, 64, 3)).astype(np.float32)
  model32 = Discriminator(features=_TINY)
  model16 = Discriminator(features=_TINY, dtype=jnp.bfloat16)
  shapes16 = jax.eval_shape(lambda: model16.init(_key(0), x, train=False))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes16))
  s16, updates = jax.eval_shape(
      functools.partial(model16.apply, train=True, mutable=['batch_stats']), tiny_variables, x)
  assert s16.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(updates))
  s32 = _apply(model32, tiny_variables, x, train=False)
  s16_eval = _apply(model16, tiny_variables, x, train=False)
  assert s16_eval.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(s16_eval), np.asarray(s32), rtol=0.1, atol=0.05)


def test_gradients_for_gradient_penalty(tiny_variables):
  """Per-sample input gradients (WGAN-GP) and parameter gradients are finite under jit."""
  model = Discriminator(features=_TINY)
  x = np.random.default_rng(11).normal(size=(2, 64, 64, 3)).astype(np.float32)
  stats = tiny_variables['batch_stats']

  def score_sum(params, x):
    scores, _ = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                            mutable=['batch_stats'])
    return scores.sum()

  def penalty(params, x):
    g = jax.grad(score_sum, argnums=1)(params, x)
    return jnp.mean((jnp.sqrt(jnp.sum(g ** 2, axis=(1, 2, 3))) - 1.0) ** 2)

  gx, gp = jax.jit(lambda p, x: (jax.grad(score_sum, argnums=1)(p, x), jax.grad(penalty)(p, x)))(
      tiny_variables['params'], x)
  assert gx.shape == x.shape and np.all(np.isfinite(gx)) and np.abs(gx).max() > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gp))
  # The spectral-norm kernels receive gradients (through the normalised weight and sigma).
  assert np.abs(np.asarray(gp['l1']['conv']['kernel'])).max() > 0


def test_reference_backward_takes_sigmas_gradient_from_the_given_vectors(tiny_variables):
  """sn_backward vectors change only sigma's gradient: to ``g_sigma * u v^T`` of the given ones.

  Checked on one layer against the closed form: for y = sum(c * conv(x, W / sigma)),
  dL/dW = G / sigma - (sum(G * W) / sigma^2) * u v^T, with G the gradient with respect to the
  normalised kernel (which does not depend on u, v).
  """
  params = tiny_variables['params']['l2']
  stats = tiny_variables['batch_stats']['l2']
  layer = SpectralConv(_TINY[1])
  rng = np.random.default_rng(12)
  x = rng.normal(size=(2, 16, 16, _TINY[0])).astype(np.float32)
  c = rng.normal(size=(2, 8, 8, _TINY[1])).astype(np.float32)
  kernel = np.asarray(params['conv']['kernel'], np.float64)
  matrix = kernel.reshape(-1, kernel.shape[-1])
  # Other unit vectors than this call's own (three iterations further on).
  u0 = np.asarray(stats['sn']['conv/kernel/u'], np.float64)
  u_own, v_own = (np.asarray(a, np.float64) for a in disc_lib.power_iteration(matrix, u0))
  given = disc_lib.spectral_vectors_after(tiny_variables['params'], tiny_variables['batch_stats'],
                                         4)['l2']
  u_given, v_given = (np.asarray(given['sn'][k], np.float64) for k in ('u', 'v'))
  assert np.abs(u_given - u_own).max() > 1e-2

  def loss(p, extra):
    y, _ = layer.apply({'params': p, 'batch_stats': stats, **extra}, x, train=True,
                       mutable=['batch_stats'])
    return jnp.sum(y * c)

  grads = {}
  for name, extra in (('own', {}), ('given', {disc_lib.SN_BACKWARD: given})):
    value, grads[name] = jax.value_and_grad(loss)(params, extra)
    grads[name] = np.asarray(grads[name]['conv']['kernel'], np.float64)
    if name == 'own':
      own_value = value
    else:  # the forward is this call's
      np.testing.assert_allclose(value, own_value, rtol=1e-6)
  sigma = float((u_own @ matrix.T @ v_own.T)[0, 0])  # u . (W v), the SAGAN sigma
  # G: the gradient with respect to the normalised kernel, by autodiff of the plain conv.
  conv = lambda k: jnp.sum(jax.lax.conv_general_dilated(
      x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')) * c)
  g = np.asarray(jax.grad(conv)(jnp.asarray(kernel / sigma, jnp.float32)), np.float64)
  g_sigma = -np.sum(g * kernel) / sigma ** 2
  for name, (u, v) in (('own', (u_own, v_own)), ('given', (u_given, v_given))):
    outer = (v.T @ u).reshape(kernel.shape)  # u v^T in the flattened HWIO layout
    want = g / sigma + g_sigma * outer
    np.testing.assert_allclose(grads[name], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                               err_msg=name)
  assert np.abs(grads['own'] - grads['given']).max() > 1e-3 * np.abs(grads['own']).max()


def test_spectral_vectors_after_n_calls_are_those_of_the_nth_call(tiny_variables):
  model = Discriminator(features=_TINY)
  x = np.random.default_rng(13).normal(size=(2, 64, 64, 3)).astype(np.float32)
  variables = tiny_variables
  stats = variables['batch_stats']
  for _ in range(3):
    _, updates = _apply(model, dict(variables, batch_stats=stats), x, train=True,
                        mutable=['batch_stats'])
    stats = updates['batch_stats']
  predicted = disc_lib.spectral_vectors_after(variables['params'], variables['batch_stats'], 3)
  for layer in disc_lib.SPECTRAL_LAYERS:
    np.testing.assert_allclose(predicted[layer]['sn']['u'], stats[layer]['sn']['conv/kernel/u'],
                               rtol=1e-5, atol=1e-6)
