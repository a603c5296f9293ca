r"""PyTorch checkpoints -> skd_jax variables: key maps of the reference, CIRKD and ImageNet models.

The library of `python -m skd_jax.convert` (`write_export` writes what ``config.teacher.checkpoint``
and `checkpoint.load_variables` read). Python:

    variables, overrides = load_torch_variables('teacher.pth', 'pspnet_resnet101', 19)
    model = create_segmenter('pspnet_resnet101', 19, **overrides)
    variables = load_torch_backbone('resnet18-imagenet.pth', fresh_variables)   # ImageNet init

Layouts (``layout=None`` detects them from the key names, see `detect_layout`):
  - ``skd_reference``: the SKD reference's PSPNet (student R18, teacher R101). Backbone ``conv1``..
    ``bn3``, ``layerX.Y.*``; PSP module ``pspmodule.*`` and classifier ``head.*`` (the model code's
    naming) or ``head.0.*`` / ``head.1.*`` (the teacher checkpoint's toolbox naming); aux head
    ``dsn.0`` (conv), ``dsn.1`` (BN), ``dsn.3`` (classifier); the teacher's unused ``fc.*`` is
    ignored. Every BN is In-Place ABN, whose effective scale is ``|weight| + 1e-5``: applied here.
  - ``cirkd``: CIRKD's DeepLabV3 (plain BN). Backbone under ``pretrained.``; ``head.aspp.b0.0``,
    ``head.aspp.b{1,2,3}.block.0``, ``head.aspp.b4.gap.1``, ``head.aspp.project.0``,
    ``head.block.0`` (3x3) and ``head.block.4`` (classifier), ``auxlayer.block.0`` / ``.4``; each
    conv's BN at the next index. The head and aux widths are read from the checkpoint.
  - ``csail_imagenet``: the CSAIL deep-stem ImageNet ResNets (``resnet{18,101}-imagenet.pth``),
    backbone only (``fc.*`` ignored). Plain BN.
  - ``torchvision``: torchvision's ImageNet ResNets (one 7x7 stem conv), backbone only, into a model
    built with ``stem='standard'`` (returned as an override). Plain BN.

The reference's discriminator (``l{1..4}.0.module.{weight_bar,weight_u,weight_v,bias}``,
``attn{1,2}.*``, ``last.0.*``, ``preprocess_additional.*``) converts into `Discriminator` variables
with `load_torch_discriminator` / `convert_discriminator_state_dict`, as strictly.

Conventions: conv weights OIHW -> HWIO; BN ``weight``/``bias``/``running_mean``/``running_var`` ->
``scale``/``bias``/``mean``/``var`` (both frameworks store the unbiased running variance);
``num_batches_tracked`` is dropped. Conversion is strict: every parameter of the model must be
filled and every tensor of the checkpoint used (or explicitly ignored), with matching shapes;
otherwise ONE `ConversionError` lists the missing, unexpected and misshapen keys.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from skd_jax import checkpoint
from skd_jax.models import discriminator as disc_lib
from skd_jax.models.layers import scaled
from skd_jax.models.resnet import STAGE_SIZES
from skd_jax.models.segmenter import MODEL_PRESETS, create_segmenter
from skd_jax.torch_io import load_torch_state_dict

PathLike = str | os.PathLike
Variables = dict[str, Any]

LAYOUTS = ('skd_reference', 'cirkd', 'csail_imagenet', 'torchvision')
MODEL_LAYOUTS = ('skd_reference', 'cirkd')        # whole segmentation networks
BACKBONE_LAYOUTS = ('csail_imagenet', 'torchvision')  # ImageNet classifiers: backbone only
ABN_EPS = 1e-5  # In-Place ABN's effective scale is |weight| + eps (the reference's BN eps)
BACKBONE_KEY = re.compile(r'(conv\d|bn\d|layer\d+)\.')  # a backbone tensor, reference naming
MAX_LISTED = 25  # keys listed per category in an error message


class ConversionError(ValueError):
  """The checkpoint does not fit the model (missing / unexpected / misshapen tensors)."""


# ----------------------------------------------------------------------------------------------
# Layout detection.


def detect_layout(keys: Sequence[str], path: str = '<checkpoint>') -> str:
  """The layout of a (unwrapped) state_dict, from its key names.

  Rule, first match wins:
    1. a key under ``pretrained.``, ``head.aspp.`` or ``auxlayer.`` -> ``cirkd``;
    2. a key under ``pspmodule.``, ``dsn.``, ``head.0.`` or ``head.1.`` -> ``skd_reference``;
    3. ``conv1.weight``, ``conv2.weight`` and ``conv3.weight`` (the deep stem) ->
       ``csail_imagenet``;
    4. ``conv1.weight`` and ``layer1.0.conv1.weight`` (a single stem conv) -> ``torchvision``.
  """
  keys = list(keys)
  if any(k.startswith(tuple(f'{layer}.0.module.' for layer in disc_lib.SPECTRAL_LAYERS))
         for k in keys):
    raise ConversionError(
        f'{path} holds the reference\'s discriminator ({", ".join(keys[:3])}, ...), not a '
        'segmentation network: convert it with skd_jax.torch_convert.load_torch_discriminator')
  if any(k.startswith(('pretrained.', 'head.aspp.', 'auxlayer.')) for k in keys):
    return 'cirkd'
  if any(k.startswith(('pspmodule.', 'dsn.', 'head.0.', 'head.1.')) for k in keys):
    return 'skd_reference'
  key_set = set(keys)
  if {'conv1.weight', 'conv2.weight', 'conv3.weight'} <= key_set:
    return 'csail_imagenet'
  if 'conv1.weight' in key_set and 'layer1.0.conv1.weight' in key_set:
    return 'torchvision'
  raise ConversionError(
      f'{path}: cannot tell the checkpoint layout from its keys ({", ".join(keys[:8])}, ...); '
      f'pass layout= one of {LAYOUTS}')


def _psp_naming(keys) -> tuple[str, str]:
  """(PSP module prefix, classifier prefix) of an skd_reference checkpoint."""
  if 'head.0.bottleneck.0.weight' in keys or any(k.startswith('head.0.') for k in keys):
    return 'head.0', 'head.1'  # the teacher checkpoint (a segmentation-toolbox Sequential)
  return 'pspmodule', 'head'   # the reference model code (and its student checkpoint)


# ----------------------------------------------------------------------------------------------
# Module-name maps: our module path (tuple of names) -> the PyTorch module's dotted name.


def _backbone_name(path: tuple[str, ...]) -> str | None:
  """``('layer3', ...)``-style names of the deep-stem / torchvision ResNets."""
  if len(path) == 1 and re.fullmatch(r'(conv|bn)\d', path[0]):
    return path[0]
  m = re.fullmatch(r'layer(\d)_(\d+)', path[0])
  if m and len(path) == 2:
    sub = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(path[1], path[1])
    return f'layer{m[1]}.{m[2]}.{sub}'
  return None


def _skd_name(path: tuple[str, ...], state_dict) -> str | None:
  psp, cls = _psp_naming(state_dict)
  scope, rest = path[0], path[1:]
  if scope == 'backbone':
    return _backbone_name(rest)
  if scope == 'head' and len(rest) == 1:
    m = re.fullmatch(r'stage(\d+)_(conv|bn)', rest[0])
    if m:  # stages.i = Sequential(AdaptiveAvgPool2d, Conv2d, InPlaceABN)
      return f'{psp}.stages.{m[1]}.{1 if m[2] == "conv" else 2}'
    return {'bottleneck_conv': f'{psp}.bottleneck.0', 'bottleneck_bn': f'{psp}.bottleneck.1',
            'classifier': cls}.get(rest[0])
  if scope == 'aux_head' and len(rest) == 1:  # dsn = Sequential(Conv2d, ABN, Dropout2d, Conv2d)
    return {'conv': 'dsn.0', 'bn': 'dsn.1', 'classifier': 'dsn.3'}.get(rest[0])
  return None


_CIRKD_HEAD = {
    'aspp0_conv': 'head.aspp.b0.0', 'aspp0_bn': 'head.aspp.b0.1',
    'aspp1_conv': 'head.aspp.b1.block.0', 'aspp1_bn': 'head.aspp.b1.block.1',
    'aspp2_conv': 'head.aspp.b2.block.0', 'aspp2_bn': 'head.aspp.b2.block.1',
    'aspp3_conv': 'head.aspp.b3.block.0', 'aspp3_bn': 'head.aspp.b3.block.1',
    'aspp_pool_conv': 'head.aspp.b4.gap.1', 'aspp_pool_bn': 'head.aspp.b4.gap.2',
    'project_conv': 'head.aspp.project.0', 'project_bn': 'head.aspp.project.1',
    'block_conv': 'head.block.0', 'block_bn': 'head.block.1', 'classifier': 'head.block.4',
}
_CIRKD_AUX = {'conv': 'auxlayer.block.0', 'bn': 'auxlayer.block.1',
              'classifier': 'auxlayer.block.4'}


def _cirkd_name(path: tuple[str, ...], state_dict) -> str | None:
  del state_dict
  scope, rest = path[0], path[1:]
  if scope == 'backbone':
    name = _backbone_name(rest)
    return None if name is None else f'pretrained.{name}'
  if len(rest) == 1:
    return {'head': _CIRKD_HEAD, 'aux_head': _CIRKD_AUX}.get(scope, {}).get(rest[0])
  return None


def _imagenet_name(path: tuple[str, ...], state_dict) -> str | None:
  del state_dict
  return _backbone_name(path[1:]) if path[0] == 'backbone' else None


_NAMERS: dict[str, Callable[[tuple[str, ...], Any], str | None]] = {
    'skd_reference': _skd_name, 'cirkd': _cirkd_name,
    'csail_imagenet': _imagenet_name, 'torchvision': _imagenet_name,
}


def _ignored(layout: str, key: str, backbone_only: bool) -> bool:
  """Checkpoint tensors deliberately left unused."""
  if key.endswith('.num_batches_tracked'):
    return True  # BN's step counter: not part of the function
  if layout == 'cirkd':
    return key.startswith('pretrained.fc.') or (backbone_only and not key.startswith('pretrained.'))
  if key.startswith('fc.'):
    return True  # the ImageNet classifier (also carried, unused, by the reference teacher)
  return backbone_only and layout in MODEL_LAYOUTS and not BACKBONE_KEY.match(key)


# ----------------------------------------------------------------------------------------------
# The conversion proper.


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == 'kernel' and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  return tuple(shape)


_TORCH_LEAF = {
    ('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var',
}


def _fmt(keys: Sequence[str], what: str) -> str:
  keys = list(keys)
  more = f' ... and {len(keys) - MAX_LISTED} more' if len(keys) > MAX_LISTED else ''
  return f'\n  {what} ({len(keys)}):\n    ' + '\n    '.join(keys[:MAX_LISTED]) + more


def _depth_of(state_dict: Mapping[str, np.ndarray], prefix: str) -> int | None:
  """The ResNet depth whose stage sizes the checkpoint's ``layerX.Y`` keys show, if any."""
  blocks = [0, 0, 0, 0]
  for k in state_dict:
    m = re.match(re.escape(prefix) + r'layer(\d)\.(\d+)\.', k)
    if m and 1 <= int(m[1]) <= 4:
      blocks[int(m[1]) - 1] = max(blocks[int(m[1]) - 1], int(m[2]) + 1)
  bottleneck = any(re.match(re.escape(prefix) + r'layer1\.0\.conv3\.', k) for k in state_dict)
  for depth, sizes in STAGE_SIZES.items():
    if tuple(blocks) == sizes and (depth >= 50) == bottleneck:
      return depth
  return None


def _hints(state_dict, abstract_flat, layout, misshapen_keys) -> list[str]:
  hints = []
  prefix = 'pretrained.' if layout == 'cirkd' else ''
  conv1 = state_dict.get(prefix + 'conv1.weight')
  ours = abstract_flat.get(('params', 'backbone', 'conv1', 'kernel'))
  if conv1 is not None and ours is not None and conv1.ndim == 4:
    if conv1.shape[-1] == 7 and ours.shape[0] == 3:
      hints.append("the checkpoint has a 7x7 stem conv (torchvision): build the model with "
                   "stem='standard'")
    elif conv1.shape[-1] == 3 and ours.shape[0] == 7:
      hints.append("the checkpoint has the deep 3x3 stem: build the model with stem='deep'")
    elif conv1.shape[0] != ours.shape[-1]:
      hints.append(f'stem width {conv1.shape[0]} in the checkpoint, {ours.shape[-1]} in the model: '
                   f'width_multiplier={conv1.shape[0] / 64:g}?')
  depth = _depth_of(state_dict, prefix)
  n3 = sum(1 for p in abstract_flat if p[:2] == ('params', 'backbone') and p[2].startswith(
      'layer3_') and p[3:] == ('conv1', 'kernel'))
  if depth is not None and n3 and STAGE_SIZES[depth][2] != n3:
    hints.append(f'the checkpoint holds a ResNet-{depth}: use an arch ending in resnet{depth}')
  classifiers = [k for k in misshapen_keys if k in (
      'head.weight', 'head.1.weight', 'dsn.3.weight', 'head.block.4.weight',
      'auxlayer.block.4.weight')]
  if classifiers:
    hints.append(f'the checkpoint\'s classifiers have {state_dict[classifiers[0]].shape[0]} '
                 'outputs: num_classes differs?')
  return hints


def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_variables: Mapping[str, Any],
                       layout: str, *, backbone_only: bool = False, strict: bool = True,
                       source: str = '<checkpoint>', abn_scales: bool = True) -> Variables:
  """Fills a variable tree of our model from a PyTorch state_dict of `layout`.

  Args:
    state_dict: ``{torch key: array}`` (unwrapped, no ``module.`` prefix).
    abstract_variables: ``{'params': ..., 'batch_stats': ...}`` of the target model, arrays or
      `jax.ShapeDtypeStruct`s; with `backbone_only`, only their ``'backbone'`` subtrees are filled.
    layout: one of `LAYOUTS`.
    backbone_only: fill the backbone only; the checkpoint's head tensors (if any) are ignored.
    strict: False tolerates unused checkpoint tensors (missing or misshapen ones are always errors:
      there would be nothing to put in their place).
    source: the checkpoint's name, for messages.
    abn_scales: apply In-Place ABN's ``|weight| + 1e-5`` to the ``skd_reference`` layout's BN
      weights (default). False copies them as they are: for tensors keyed like the weights that
      are not weights, e.g. a reference optimiser's SGD momentum buffers (equal to those of the
      BN scale while the weights are positive).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 NumPy arrays (only ``'backbone'`` under each
    collection when `backbone_only`).
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  if layout in BACKBONE_LAYOUTS:
    backbone_only = True
  namer = _NAMERS[layout]
  abn = layout == 'skd_reference' and abn_scales
  flat = {}
  for collection in ('params', 'batch_stats'):
    tree = abstract_variables.get(collection, {})
    if backbone_only:
      tree = {'backbone': tree['backbone']} if 'backbone' in tree else {}
    for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
      flat[(collection,) + path] = leaf
  if not flat:
    raise ValueError('abstract_variables holds no parameters' +
                     (' under backbone' if backbone_only else ''))

  out, used, missing, misshapen, unmapped = {}, set(), [], [], []
  for path, leaf in flat.items():
    collection, module, name = path[0], path[1:-1], path[-1]
    torch_module = namer(module, state_dict)
    torch_leaf = _TORCH_LEAF.get((collection, name))
    if torch_module is None or torch_leaf is None:
      unmapped.append('/'.join(path))
      continue
    key = f'{torch_module}.{torch_leaf}'
    shape = _torch_shape(name, tuple(leaf.shape))
    if key not in state_dict:
      missing.append(f'{key} {shape} (for {"/".join(path)})')
      continue
    used.add(key)
    value = state_dict[key]
    if tuple(value.shape) != shape:
      misshapen.append(f'{key}: checkpoint {tuple(value.shape)}, model expects {shape}')
      continue
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != 'bfloat16':
      misshapen.append(f'{key}: dtype {value.dtype}, expected floating point')
      continue
    value = np.asarray(value, np.float32)
    if name == 'kernel' and value.ndim == 4:
      value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif name == 'scale' and abn:
      value = np.abs(value) + np.float32(ABN_EPS)
    out[path] = np.ascontiguousarray(value)

  unexpected = sorted(k for k in state_dict
                      if k not in used and not _ignored(layout, k, backbone_only))
  if unmapped:  # a model this layout has no name for (e.g. a PSP head with the cirkd layout)
    raise ConversionError(
        f'{source}: the {layout!r} layout has no tensor for these parameters of the model '
        f'(wrong arch for this checkpoint?):' + _fmt(unmapped, 'unmapped'))
  if missing or misshapen or (unexpected and strict):
    msg = f'{source} does not fit the model ({layout} layout'
    msg += ', backbone only)' if backbone_only else ')'
    if missing:
      msg += _fmt(missing, 'missing from the checkpoint')
    if unexpected and strict:
      msg += _fmt(unexpected, 'unexpected in the checkpoint')
    if misshapen:
      msg += _fmt(misshapen, 'wrong shape')
    for hint in _hints(state_dict, flat, layout, [m.split(':')[0] for m in misshapen]):
      msg += f'\n  hint: {hint}'
    raise ConversionError(msg)
  return flax.traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------------------------
# The reference's discriminator.


def _disc_key(path: tuple[str, ...]) -> str | None:
  """The reference discriminator's key for our variable `path` (collection, module..., leaf).

  A spectral norm's ``sigma`` maps to ``weight_v``: the reference keeps no sigma, but u and v are
  those of its last forward, whose sigma is ``u . (weight_bar v)``.
  """
  collection, module, leaf = path[0], path[1:-1], path[-1]
  if module and module[0] in disc_lib.SPECTRAL_LAYERS:
    base = f'{module[0]}.0.module'
    if module[1:] == ('conv',) and collection == 'params':
      return {'kernel': f'{base}.weight_bar', 'bias': f'{base}.bias'}.get(leaf)
    if module[1:] == ('sn',) and collection == 'batch_stats':
      return {'conv/kernel/u': f'{base}.weight_u',
              'conv/kernel/sigma': f'{base}.weight_v'}.get(leaf)
    return None
  if module == ('last',):
    return {'kernel': 'last.0.weight', 'bias': 'last.0.bias'}.get(leaf)
  if len(module) == 1 and module[0].startswith('attn') and leaf == 'gamma':
    return f'{module[0]}.gamma'
  if module == ('preprocess_additional',) or (len(module) == 2 and module[0].startswith('attn')):
    torch_leaf = _TORCH_LEAF.get((collection, leaf))
    return None if torch_leaf is None else f'{".".join(module)}.{torch_leaf}'
  return None


def convert_discriminator_state_dict(state_dict: Mapping[str, np.ndarray],
                                     abstract_variables: Mapping[str, Any], *,
                                     source: str = '<checkpoint>') -> Variables:
  """Fills a `Discriminator`'s variables from the reference's discriminator state_dict, strictly.

  ``weight_bar`` (the raw kernel, OIHW) -> ``params/l*/conv/kernel`` (HWIO); ``weight_u`` [out] ->
  ``batch_stats/l*/sn/conv/kernel/u`` [1, out]; ``u . (W v)`` -> its ``sigma`` (what our
  spectral norm records of its last call; no forward reads it); the attention blocks, ``last``
  and the input BatchNorm (plain BN, PyTorch's unbiased running variance, as ours) by name;
  ``num_batches_tracked`` dropped. Every variable must be filled and every tensor used, with
  matching shapes; otherwise one `ConversionError` lists what does not fit.

  Args:
    state_dict: ``{torch key: array}`` (unwrapped).
    abstract_variables: ``{'params', 'batch_stats'}`` of the target discriminator (arrays or
      `jax.ShapeDtypeStruct`s).
    source: the checkpoint's name, for messages.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 NumPy arrays.
  """
  flat = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in flax.traverse_util.flatten_dict(
        flax.core.unfreeze(abstract_variables.get(collection, {}))).items():
      flat[(collection,) + path] = leaf
  value = lambda key: np.asarray(state_dict[key], np.float32)
  out, used, missing, misshapen, unmapped = {}, set(), [], [], []
  for path, leaf in flat.items():
    key = _disc_key(path)
    if key is None:
      unmapped.append('/'.join(path))
      continue
    shape = tuple(leaf.shape)
    if path[-1] == 'conv/kernel/sigma':
      base = key[:-len('.weight_v')]
      needed = [f'{base}.weight_u', key, f'{base}.weight_bar']
      absent = [k for k in needed if k not in state_dict]
      if absent:
        missing += [f'{k} (for {"/".join(path)})' for k in absent]
        continue
      used.update(needed)
      # In float64: for the random initial u, v of a fresh checkpoint, u . (W v) is a sum of
      # cancelling terms.
      u, v, w = (np.asarray(state_dict[k], np.float64) for k in needed)
      if v.shape != (int(np.prod(w.shape[1:])),) or u.shape != (w.shape[0],):
        misshapen.append(f'{key}: checkpoint {v.shape}, its weight_bar needs '
                         f'{(int(np.prod(w.shape[1:])),)}')
        continue
      out[path] = np.float32(u @ (w.reshape(w.shape[0], -1) @ v))
      continue
    torch_shape = shape[1:] if path[-1] == 'conv/kernel/u' else _torch_shape(path[-1], shape)
    if key not in state_dict:
      missing.append(f'{key} {torch_shape} (for {"/".join(path)})')
      continue
    used.add(key)
    array = value(key)
    if tuple(array.shape) != torch_shape:
      misshapen.append(f'{key}: checkpoint {tuple(array.shape)}, model expects {torch_shape}')
      continue
    if path[-1] == 'kernel' and array.ndim == 4:
      array = np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    out[path] = np.ascontiguousarray(array.reshape(shape))
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith('.num_batches_tracked'))
  if unmapped or missing or misshapen or unexpected:
    msg = f'{source} does not fit the discriminator (the reference discriminator layout)'
    for keys, what in ((missing, 'missing from the checkpoint'),
                       (unexpected, 'unexpected in the checkpoint'), (misshapen, 'wrong shape'),
                       (unmapped, 'variables the layout has no tensor for')):
      if keys:
        msg += _fmt(keys, what)
    raise ConversionError(msg)
  return flax.traverse_util.unflatten_dict(out)


def discriminator_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                  source: str = '<checkpoint>') -> disc_lib.Discriminator:
  """The `Discriminator` a reference discriminator state_dict was written for.

  The widths l1..l4 come from the ``weight_bar`` shapes; without ``preprocess_additional.*`` the
  checkpoint is the image-conditioned variant (the paper's, whose l1 sees C + 3 channels).
  """
  widths = []
  for layer in disc_lib.SPECTRAL_LAYERS:
    key = f'{layer}.0.module.weight_bar'
    if key not in state_dict or np.ndim(state_dict[key]) != 4:
      raise ConversionError(f'{source}: no 4-D {key}: not a reference discriminator checkpoint')
    widths.append(int(np.shape(state_dict[key])[0]))
  return disc_lib.Discriminator(
      features=tuple(widths),
      image_conditioned=not any(k.startswith('preprocess_additional.') for k in state_dict))


def load_torch_discriminator(path: PathLike) -> tuple[Variables, disc_lib.Discriminator]:
  """The reference's discriminator from a PyTorch checkpoint: (variables, module).

  ``model.apply(variables, logits, train=True, mutable=['batch_stats'])`` then gives the
  reference's scores and advances u as its forward does (tests/test_convert.py checks both
  against PyTorch).
  """
  source = os.fspath(path)
  state_dict = load_torch_state_dict(path)
  model = discriminator_from_state_dict(state_dict, source)
  channels = int(np.shape(state_dict['l1.0.module.weight_bar'])[1])
  if model.image_conditioned:
    channels -= 3
    args = (jnp.zeros((1, 65, 65, channels)), jnp.zeros((1, 65, 65, 3)))
  else:
    args = (jnp.zeros((1, 65, 65, channels)),)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, train=False))
  return convert_discriminator_state_dict(state_dict, abstract, source=source), model


# ----------------------------------------------------------------------------------------------
# Model overrides read from the checkpoint.


def _unscaled(channels: int, multiplier: float, what: str) -> int:
  """The attribute value whose `scaled` width is `channels` under `multiplier`."""
  guess = int(round(channels / multiplier))
  for candidate in sorted(range(max(1, guess - 3), guess + 4), key=lambda c: abs(c - guess)):
    if scaled(candidate, multiplier) == channels:
      return candidate
  raise ConversionError(f'no {what} gives {channels} channels at width_multiplier={multiplier}')


def infer_overrides(state_dict: Mapping[str, np.ndarray], layout: str,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Model attributes the checkpoint determines, merged under the explicit `overrides`.

  - ``stem='standard'`` for torchvision checkpoints;
  - ``width_multiplier`` = stem width / 64 when that is not 64 (reduced-width models);
  - ``head_channels`` and ``aux_channels`` (None when the checkpoint has no aux head) for the
    whole-model layouts: CIRKD's ASPP width differs between versions of its code.
  Explicit `overrides` win (a contradiction then shows up as a shape error).
  """
  out = dict(overrides or {})
  prefix = 'pretrained.' if layout == 'cirkd' else ''
  if layout == 'torchvision':
    out.setdefault('stem', 'standard')
  conv1 = state_dict.get(prefix + 'conv1.weight')
  if 'width_multiplier' not in out and conv1 is not None and conv1.shape[0] != 64:
    out['width_multiplier'] = conv1.shape[0] / 64
  w = out.get('width_multiplier', 1.0)
  if layout == 'skd_reference':
    psp, _ = _psp_naming(state_dict)
    head_key, aux_key = f'{psp}.bottleneck.0.weight', 'dsn.0.weight'
  elif layout == 'cirkd':
    head_key, aux_key = 'head.aspp.b0.0.weight', 'auxlayer.block.0.weight'
  else:
    return out
  if 'head_channels' not in out and head_key in state_dict:
    out['head_channels'] = _unscaled(state_dict[head_key].shape[0], w, 'head_channels')
  if 'aux_channels' not in out:
    out['aux_channels'] = (_unscaled(state_dict[aux_key].shape[0], w, 'aux_channels')
                           if aux_key in state_dict else None)
  return out


def _abstract_variables(arch: str, num_classes: int, overrides: Mapping[str, Any]):
  model = create_segmenter(arch, num_classes, **overrides)
  return model, jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))


def _check_arch(layout: str, model) -> None:
  want = {'skd_reference': 'psp', 'cirkd': 'aspp'}.get(layout)
  if want is not None and model.head != want:
    raise ConversionError(
        f'a {layout} checkpoint holds a {want.upper()} head but the model has a {model.head!r} '
        f'head: use a {"pspnet" if want == "psp" else "deeplabv3"}_resnet* arch')


def _layout_of(state_dict, layout: str | None, source: str) -> str:
  if layout is None:
    return detect_layout(list(state_dict), source)
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  return layout


# ----------------------------------------------------------------------------------------------
# Public entry points.


def _model_variables(state_dict, source, arch, num_classes, layout, strict, model_overrides):
  layout = _layout_of(state_dict, layout, source)
  if layout in BACKBONE_LAYOUTS:
    raise ConversionError(
        f'{source} is an ImageNet backbone ({layout} layout), not a segmentation network: use it '
        'to initialise a backbone (load_torch_backbone, config.student.pretrained)')
  overrides = infer_overrides(state_dict, layout, model_overrides)
  model, abstract = _abstract_variables(arch, num_classes, overrides)
  _check_arch(layout, model)
  variables = convert_state_dict(state_dict, abstract, layout, strict=strict, source=source)
  return variables, overrides, layout


# The classifier (output) tensors of each whole-model layout's checkpoints.
_CLASSIFIER_KEYS = ('head.weight', 'head.1.weight', 'head.block.4.weight')


def fitting_archs(state_dict, layout: str, num_classes: int,
                  model_overrides: Mapping[str, Any]) -> list[tuple[str, int]]:
  """(arch, num_classes) of the known segmenters that `state_dict` converts into, strictly.

  Tries every `MODEL_PRESETS` name with `num_classes` and with the checkpoint's own classifier
  width: what an error for a wrong ``--arch`` or ``--num_classes`` suggests.
  """
  class_counts = [num_classes] + [int(state_dict[k].shape[0]) for k in _CLASSIFIER_KEYS
                                  if k in state_dict and state_dict[k].shape[0] != num_classes]
  fits = []
  for arch in MODEL_PRESETS:
    for classes in class_counts:
      try:
        _model_variables(state_dict, '', arch, classes, layout, True, model_overrides)
      except (ConversionError, ValueError):
        continue
      fits.append((arch, classes))
      break
  return fits


def _summary(error: ConversionError, hints: bool = True) -> tuple[str, str]:
  """A conversion error on one line: (its first line, the counts of each category and hints)."""
  lines = [line.strip() for line in str(error).splitlines()]
  details = [line.rstrip(':') for line in lines[1:] if re.fullmatch(r'.+ \(\d+\):', line)]
  details += [line for line in lines if line.startswith('hint:') and hints]
  return lines[0], '; '.join(details)


def model_variables_or_suggest(state_dict, source, arch, num_classes, layout, strict,
                               model_overrides):
  """`_model_variables`, whose error for an unfitting `arch` names the arch the tensors fit."""
  try:
    return _model_variables(state_dict, source, arch, num_classes, layout, strict,
                            model_overrides)
  except ConversionError as e:
    layout = _layout_of(state_dict, layout, source)
    fits = fitting_archs(state_dict, layout, num_classes, model_overrides)
    if not fits:
      raise ConversionError('; '.join(filter(None, _summary(e))) + '; no known --arch fits it'
                            ) from e
    suggestion = ' or '.join(f'--arch={a}' + (f' --num_classes={n}' if n != num_classes else '')
                             for a, n in fits)
    first, details = _summary(e, hints=False)
    raise ConversionError(
        f'{source} ({layout} layout) does not fit --arch={arch} with --num_classes='
        f'{num_classes} ({details or first}): its tensors fit {suggestion}') from e


def _backbone_variables(state_dict, source, arch, layout, model_overrides):
  layout = _layout_of(state_dict, layout, source)
  overrides = infer_overrides(state_dict, layout, model_overrides)
  for key in ('head_channels', 'aux_channels'):  # the heads are not converted: keep the arch's
    if key not in model_overrides:
      overrides.pop(key, None)
  _, abstract = _abstract_variables(arch, 1, overrides)
  variables = convert_state_dict(state_dict, abstract, layout, backbone_only=True, source=source)
  return variables, overrides, layout


def load_torch_variables(path: PathLike, arch: str, num_classes: int, layout: str | None = None,
                         *, strict: bool = True,
                         **model_overrides: Any) -> tuple[Variables, dict[str, Any]]:
  """A whole segmentation network from a PyTorch checkpoint.

  Args:
    path: a ``.pth`` file (zip or legacy torch.save format; plain, ``{'state_dict': ...}`` /
      ``{'model': ...}``-wrapped, or with a ``module.`` prefix).
    arch: a `create_segmenter` name, e.g. ``'pspnet_resnet101'``.
    num_classes: the classifiers' output count.
    layout: ``'skd_reference'`` or ``'cirkd'``; None detects it (`detect_layout`).
    strict: see `convert_state_dict`.
    **model_overrides: `Segmenter` attributes (e.g. ``width_multiplier``).

  Returns:
    (variables, overrides): ``{'params', 'batch_stats'}`` of float32 NumPy arrays, and the
    overrides to build the model with: ``create_segmenter(arch, num_classes, **overrides)``
    (the given ones plus those read from the checkpoint, e.g. ``head_channels``).
  """
  variables, overrides, _ = _model_variables(
      load_torch_state_dict(path), os.fspath(path), arch, num_classes, layout, strict,
      model_overrides)
  return variables, overrides


def torch_backbone_variables(path: PathLike, arch: str, layout: str | None = None,
                             **model_overrides: Any) -> tuple[Variables, dict[str, Any]]:
  """The backbone of `arch` from a PyTorch checkpoint of any layout (ImageNet or segmentation).

  Returns:
    (partial variables ``{'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}}``,
    overrides to build the model with, e.g. ``stem='standard'`` for torchvision weights). Put
    them into freshly initialised variables with `merge_backbone`.
  """
  variables, overrides, _ = _backbone_variables(
      load_torch_state_dict(path), os.fspath(path), arch, layout, model_overrides)
  return variables, overrides


def merge_backbone(variables: Mapping[str, Any], backbone_variables: Mapping[str, Any]
                   ) -> Variables:
  """`variables` with their ``'backbone'`` subtrees replaced by those of `backbone_variables`.

  Strict: the two backbones must have the same parameters and statistics, of the same shapes.
  Heads (everything outside ``'backbone'``) keep their values.
  """
  problems = []
  out = {}
  for collection in ('params', 'batch_stats'):
    target = flax.core.unfreeze(variables[collection])
    if 'backbone' not in target or 'backbone' not in backbone_variables.get(collection, {}):
      raise ConversionError(f'no {collection}/backbone in both variable trees')
    ours = flax.traverse_util.flatten_dict(target['backbone'], sep='/')
    new = flax.traverse_util.flatten_dict(
        flax.core.unfreeze(backbone_variables[collection]['backbone']), sep='/')
    problems += [f'missing {collection}/backbone/{k}' for k in sorted(set(ours) - set(new))]
    problems += [f'unexpected {collection}/backbone/{k}' for k in sorted(set(new) - set(ours))]
    problems += [f'{collection}/backbone/{k}: {tuple(new[k].shape)} vs {tuple(ours[k].shape)}'
                 for k in sorted(set(ours) & set(new)) if tuple(ours[k].shape) != tuple(
                     new[k].shape)]
    target = dict(target)
    target['backbone'] = flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(v, ours[k].dtype) if k in ours else v for k, v in new.items()}, sep='/')
    out[collection] = target
  if problems:
    raise ConversionError('the pretrained backbone does not fit the model:' +
                          _fmt(problems, 'differences'))
  for collection, value in variables.items():
    out.setdefault(collection, value)
  return out


def load_torch_backbone(path: PathLike, variables: Mapping[str, Any],
                        layout: str | None = None) -> Variables:
  """Freshly initialised `variables` with their backbone loaded from `path` (ImageNet init).

  Args:
    path: a ``.pth`` (any layout: CSAIL or torchvision ImageNet ResNets, or the backbone of a
      reference / CIRKD segmentation checkpoint), or a folder written by ``python -m
      skd_jax.convert`` (or any export / run that `checkpoint.load_variables` reads).
    variables: ``{'params', 'batch_stats'}`` of the model to initialise, e.g. from ``model.init``.
      Its backbone's structure decides what is loaded: a torchvision checkpoint needs a model
      built with ``stem='standard'`` (the error says so otherwise).
    layout: None detects it.

  Returns:
    `variables` with the backbone replaced (strictly: every backbone tensor filled, shapes
    checked); the heads keep their initial values.
  """
  source = os.fspath(path)
  if os.path.isdir(source):
    loaded, _ = checkpoint.load_variables(source)
    return merge_backbone(variables, loaded)
  state_dict = load_torch_state_dict(path)
  layout = _layout_of(state_dict, layout, source)
  backbone = convert_state_dict(state_dict, variables, layout, backbone_only=True, source=source)
  return merge_backbone(variables, backbone)


# ----------------------------------------------------------------------------------------------
# Exports.


def write_export(path: PathLike, out: PathLike, arch: str, num_classes: int, *,
                 layout: str | None = None, strict: bool = True,
                 model_overrides: Mapping[str, Any] | None = None) -> str:
  """Converts the .pth at `path` for `arch` and writes it as an export to `out`; returns a line
  saying what was written. A backbone-only layout (ImageNet) writes the backbone alone."""
  source = os.fspath(path)
  state_dict = load_torch_state_dict(source)
  layout = layout or detect_layout(list(state_dict), source)
  backbone_only = layout in BACKBONE_LAYOUTS
  if backbone_only:
    variables, overrides, _ = _backbone_variables(state_dict, source, arch, layout,
                                                  dict(model_overrides or {}))
  else:
    variables, overrides, _ = model_variables_or_suggest(
        state_dict, source, arch, num_classes, layout, strict, dict(model_overrides or {}))
  metadata = {'arch': arch, 'num_classes': num_classes, 'overrides': overrides,
              'layout': layout, 'source': str(pathlib.Path(source).absolute()),
              'backbone_only': backbone_only}
  checkpoint.save_variables(out, variables, metadata=metadata)
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  return (f'{source} ({layout}) -> {out}: {count / 1e6:.2f} M parameters'
          f'{" (backbone only)" if backbone_only else ""}, arch {arch}, overrides {overrides}')
