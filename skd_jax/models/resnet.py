"""Deep-stem dilated ResNets (NHWC), the backbones of both the SKD reference and CIRKD.

Stem: conv3x3(3->64, stride 2) BN ReLU, conv3x3(64->64) BN ReLU, conv3x3(64->128) BN ReLU, max pool
3x3 stride 2 pad 1. Then four stages of BasicBlocks (ResNet-18/34) or Bottlenecks (ResNet-50/101,
stride and dilation on the 3x3 conv), with a projection shortcut (1x1 conv + BN) whenever the
stride or the channel count changes (so also on layer1 of ResNet-18: the stem gives 128 channels).

Output stride 8: layer3 and layer4 keep stride 1 and dilate by 2 and 4. Two dilation schedules:
  - ``'skd'`` (the SKD reference; default for PSPNet): every block of a stage uses the stage's
    dilation, and the stem pool uses ``ceil_mode=True`` (512 -> 256 -> 129 -> 65).
  - ``'cirkd'`` (CIRKD's "v1s" ResNet; default for DeepLabV3): the first block of layer3 uses
    dilation 1 and that of layer4 dilation 2 (half the stage's); in a BasicBlock the first conv uses
    the block's dilation and the second the stage's. The stem pool uses ``ceil_mode=False``
    (512x1024 -> 64x128).
Output stride 16 (option): layer3 strides by 2, layer4 dilates by 2.

Stem option ``stem='standard'``: torchvision's single 7x7 stride-2 conv (3->64) + BN + ReLU before
the same max pool (so torchvision's ImageNet weights can be loaded; the stem then gives 64 channels
and layer1 of ResNet-18/34 has no projection).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skd_jax import ops
from skd_jax.models.layers import BatchNorm, conv, scaled

Dtype = Any

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
DILATION_SCHEDULES = ('skd', 'cirkd')
STEMS = ('deep', 'standard')
# Rematerialisation of the residual blocks (`jax.checkpoint` through `nn.remat`), by policy name:
# what the backward pass keeps of each block's forward; the rest is recomputed from the block's
# input. 'convs_saveable' keeps the convolutions' outputs (`ops.CONV_OUTPUT`) and recomputes
# BatchNorm and ReLU; 'nothing_saveable' keeps only the block's input and recomputes everything.
REMAT_POLICIES = {
    'none': None,
    'convs_saveable': jax.checkpoint_policies.save_only_these_names(ops.CONV_OUTPUT),
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
}


class BasicBlock(nn.Module):
  """Two 3x3 convs. `dilation` is the first conv's, `stage_dilation` the second's."""
  planes: int
  stride: int = 1
  dilation: int = 1
  stage_dilation: int = 1
  projection: bool = False
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                  dtype=self.dtype, name=name)
    y = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
             name='conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = conv(self.planes, 3, dilation=self.stage_dilation, dtype=self.dtype, name='conv2')(y)
    y = norm('bn2')(y)
    if self.projection:
      x = conv(self.planes, 1, stride=self.stride, dtype=self.dtype, name='downsample_conv')(x)
      x = norm('downsample_bn')(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  stage_dilation: int = 1  # unused: only the 3x3 conv is dilated
  projection: bool = False
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                  dtype=self.dtype, name=name)
    y = nn.relu(norm('bn1')(conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)))
    y = conv(self.planes, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
             name='conv2')(y)
    y = nn.relu(norm('bn2')(y))
    y = norm('bn3')(conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(y))
    if self.projection:
      x = conv(self.planes * 4, 1, stride=self.stride, dtype=self.dtype,
               name='downsample_conv')(x)
      x = norm('downsample_bn')(x)
    return nn.relu(y + x)


def stage_strides_and_dilations(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(strides, dilations) of layer1..layer4 for an output stride of 8 or 16."""
  if output_stride == 8:
    return (1, 2, 1, 1), (1, 1, 2, 4)
  if output_stride == 16:
    return (1, 2, 2, 1), (1, 1, 1, 2)
  raise ValueError(f'output_stride must be 8 or 16, got {output_stride!r}')


def first_block_dilation(stage_dilation: int, schedule: str) -> int:
  """Dilation of a stage's first block: the stage's ('skd'), or CIRKD's halved one ('cirkd')."""
  if schedule == 'skd':
    return stage_dilation
  if schedule == 'cirkd':
    return 1 if stage_dilation in (1, 2) else stage_dilation // 2
  raise ValueError(f'dilation_schedule must be one of {DILATION_SCHEDULES}, got {schedule!r}')


class ResNet(nn.Module):
  """Deep-stem dilated ResNet; returns a dict of stage outputs.

  Attributes:
    depth: 18, 34, 50 or 101.
    output_stride: 8 (reference) or 16.
    dilation_schedule: 'skd' or 'cirkd' (see the module docstring).
    stem_ceil_mode: ceil mode of the stem max pool (True in the SKD reference, False in CIRKD).
    width_multiplier: scales every channel count (1.0 = the reference; small values for tests).
    stem: 'deep' (three 3x3 convs, the reference) or 'standard' (torchvision's 7x7 conv).
    remat: a `REMAT_POLICIES` name: 'none' (default), or rematerialise every residual block in
      the backward pass under that policy (less memory, one more forward of the blocks).

  Returns (from __call__ on images [N, H, W, 3]):
    {'stem': [N, H/4, W/4, 128w], 'layer1': ..., 'layer2': ..., 'layer3': [N, H/8, W/8, c3],
     'layer4': [N, H/8, W/8, c4]} (sizes for output stride 8, rounded as PyTorch rounds them).
  """
  depth: int = 18
  output_stride: int = 8
  dilation_schedule: str = 'skd'
  stem_ceil_mode: bool = True
  width_multiplier: float = 1.0
  stem: str = 'deep'
  remat: str = 'none'
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @property
  def block_cls(self):
    return BasicBlock if self.depth < 50 else Bottleneck

  def remat_block_cls(self):
    """`block_cls`, wrapped in `nn.remat` under the policy `remat` names."""
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')
    if self.remat == 'none':
      return self.block_cls
    # static_argnums counts `self` as 0: `train` (argument 2) is a Python bool.
    return nn.remat(self.block_cls, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))

  def stage_channels(self) -> tuple[int, int, int, int]:
    """Output channels of layer1..layer4."""
    planes = [scaled(c, self.width_multiplier) for c in (64, 128, 256, 512)]
    return tuple(p * self.block_cls.expansion for p in planes)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f'depth must be one of {sorted(STAGE_SIZES)}, got {self.depth!r}')
    norm = lambda name: BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                  dtype=self.dtype, name=name)
    w = self.width_multiplier
    x = x.astype(self.dtype)
    if self.stem == 'deep':
      x = nn.relu(norm('bn1')(conv(scaled(64, w), 3, stride=2, dtype=self.dtype, name='conv1')(x)))
      x = nn.relu(norm('bn2')(conv(scaled(64, w), 3, dtype=self.dtype, name='conv2')(x)))
      x = nn.relu(norm('bn3')(conv(scaled(128, w), 3, dtype=self.dtype, name='conv3')(x)))
    elif self.stem == 'standard':
      x = nn.relu(norm('bn1')(conv(scaled(64, w), 7, stride=2, dtype=self.dtype, name='conv1')(x)))
    else:
      raise ValueError(f'stem must be one of {STEMS}, got {self.stem!r}')
    x = ops.pool2d(x, 3, 2, 1, ceil_mode=self.stem_ceil_mode, mode='max')
    features = {'stem': x}

    strides, dilations = stage_strides_and_dilations(self.output_stride)
    block_cls = self.remat_block_cls()
    in_channels = x.shape[-1]
    for stage, (num_blocks, stride, dilation) in enumerate(
        zip(STAGE_SIZES[self.depth], strides, dilations), start=1):
      planes = scaled(64 * 2 ** (stage - 1), w)
      for b in range(num_blocks):
        block_stride = stride if b == 0 else 1
        out_channels = planes * self.block_cls.expansion
        x = block_cls(
            planes=planes, stride=block_stride,
            dilation=first_block_dilation(dilation, self.dilation_schedule) if b == 0 else dilation,
            stage_dilation=dilation,
            projection=(b == 0 and (block_stride != 1 or in_channels != out_channels)),
            bn_momentum=self.bn_momentum, dtype=self.dtype, name=f'layer{stage}_{b}')(x, train)
        in_channels = out_channels
      features[f'layer{stage}'] = x
    return features
