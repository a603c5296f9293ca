"""Backbone + head -> (logits, aux_logits, features), and the model factory.

    model = create_segmenter('pspnet_resnet18', num_classes=19)
    variables = model.init({'params': key}, images, train=False)
    logits, aux_logits, features = model.apply(variables, images, train=False)

Outputs are at the backbone's resolution (1/8 of the input: 65x65 for a 512x512 crop with the SKD
reference settings, 64x128 for 512x1024 with CIRKD's); the losses upsample them to label size.
Training mode needs ``mutable=['batch_stats']`` and a ``'dropout'`` rng.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skd_jax.models.heads import ASPPHead, AuxHead, PSPHead
from skd_jax.models.layers import scaled
from skd_jax.models.resnet import ResNet

Dtype = Any
HEADS = ('psp', 'aspp')


class Segmenter(nn.Module):
  """A segmentation network: deep-stem dilated ResNet, PSP or ASPP head, optional aux FCN head.

  Attributes:
    num_classes: output channels of the classifiers.
    depth, output_stride, dilation_schedule, stem_ceil_mode, width_multiplier, stem: of the
      `ResNet` ('standard' stem: torchvision's 7x7 conv, for its ImageNet weights).
    head: 'psp' (SKD reference) or 'aspp' (CIRKD's DeepLabV3).
    head_channels: PSP / ASPP width before the width multiplier (reference: 512 / 128 for PSPNet
      R101 / R18; CIRKD: 256 / 128 for DeepLabV3 R101 / R18).
    aux_channels: aux head width before the multiplier; None = no aux head.
    head_dropout: rate of the dropout before the head's classifier, on the pair-wise feature (both
      references: 0.1; channel-wise in the PSP head, element-wise in the ASPP head).
    aspp_dropout: rate of the ASPP head's dropout after its projection (CIRKD: 0.5).
    aux_dropout: rate of the aux head's dropout (both references: 0.1). A parity check of
      training against another implementation sets the three to 0
      (``--config.student.overrides.head_dropout=0``, ...).
    dtype: compute dtype of convolutions and activations (params and BN statistics stay float32).
    remat: rematerialisation policy of the backbone's residual blocks (`resnet.REMAT_POLICIES`:
      'none', 'convs_saveable', 'nothing_saveable'); the parameters are the same.

  __call__(images [N, H, W, 3], train) returns:
    logits [N, h, w, C], aux_logits [N, h, w, C] or None, and features: a dict holding 'head' (the
    pair-wise feature, [N, h, w, head_channels]) and the backbone stages 'stem', 'layer1'..'layer4'.
  """
  num_classes: int
  depth: int = 18
  head: str = 'psp'
  head_channels: int = 128
  aux_channels: int | None = 128
  head_dropout: float = 0.1
  aspp_dropout: float = 0.5
  aux_dropout: float = 0.1
  output_stride: int = 8
  dilation_schedule: str = 'skd'
  stem_ceil_mode: bool = True
  width_multiplier: float = 1.0
  stem: str = 'deep'
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    if self.head not in HEADS:
      raise ValueError(f'head must be one of {HEADS}, got {self.head!r}')
    w = self.width_multiplier
    features = ResNet(
        depth=self.depth, output_stride=self.output_stride,
        dilation_schedule=self.dilation_schedule, stem_ceil_mode=self.stem_ceil_mode,
        width_multiplier=w, stem=self.stem, remat=self.remat, bn_momentum=self.bn_momentum,
        dtype=self.dtype, name='backbone')(images, train)
    if self.head == 'psp':
      head = PSPHead(num_classes=self.num_classes, channels=scaled(self.head_channels, w),
                     dropout=self.head_dropout, bn_momentum=self.bn_momentum, dtype=self.dtype,
                     name='head')
    else:
      head = ASPPHead(num_classes=self.num_classes, channels=scaled(self.head_channels, w),
                      dropout=self.head_dropout, project_dropout=self.aspp_dropout,
                      bn_momentum=self.bn_momentum, dtype=self.dtype, name='head')
    logits, head_feature = head(features['layer4'], train)
    aux_logits = None
    if self.aux_channels is not None:
      psp = self.head == 'psp'
      aux_logits = AuxHead(
          num_classes=self.num_classes, channels=scaled(self.aux_channels, w), use_bias=psp,
          activation='leaky_relu' if psp else 'relu', channel_dropout=psp,
          dropout=self.aux_dropout, bn_momentum=self.bn_momentum, dtype=self.dtype,
          name='aux_head')(features['layer3'], train)
    features = dict(features, head=head_feature)
    return logits, aux_logits, features


def _preset(depth: int, head: str) -> dict[str, Any]:
  bottleneck = depth >= 50
  if head == 'psp':
    # SKD reference: PSP 512 wide on a Bottleneck backbone, shrunk to 128 for the BasicBlock student.
    width = 512 if bottleneck else 128
    return dict(depth=depth, head='psp', head_channels=width, aux_channels=width,
                dilation_schedule='skd', stem_ceil_mode=True)
  # CIRKD: ASPP 256 (R101) / 128 (R18); aux head width = layer3 channels / 4.
  return dict(depth=depth, head='aspp', head_channels=256 if bottleneck else 128,
              aux_channels=(1024 if bottleneck else 256) // 4,
              dilation_schedule='cirkd', stem_ceil_mode=False)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    f'{arch}_resnet{depth}': _preset(depth, head)
    for arch, head in (('pspnet', 'psp'), ('deeplabv3', 'aspp'))
    for depth in (18, 34, 50, 101)
}


def create_segmenter(name: str, num_classes: int, **overrides: Any) -> Segmenter:
  """Builds a named segmenter; `overrides` replace any `Segmenter` attribute.

  Names: pspnet_resnet{18,34,50,101} (SKD reference: PSP head, uniform dilations, ceil-mode stem
  pool) and deeplabv3_resnet{18,34,50,101} (CIRKD: ASPP head, halved first-block dilations,
  floor-mode stem pool). E.g. ``create_segmenter('pspnet_resnet18', 19, width_multiplier=0.125,
  aux_channels=None, dtype=jnp.bfloat16)``.
  """
  if name not in MODEL_PRESETS:
    raise ValueError(f'unknown model name {name!r}; known names: {", ".join(sorted(MODEL_PRESETS))}')
  fields = {f.name for f in dataclasses.fields(Segmenter)} - {'parent', 'name', 'num_classes'}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown override(s) {unknown} for model {name!r}; valid: {sorted(fields)}')
  kwargs = dict(MODEL_PRESETS[name], **overrides)
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return Segmenter(num_classes=num_classes, **kwargs)
