"""Segmentation heads: the SKD reference's PSP module and auxiliary FCN head, CIRKD's DeepLabV3 ASPP.

Each head returns ``(logits, feature)`` where ``feature`` is what pair-wise distillation taps (the
input of the 1x1 classifier, after its dropout).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from skd_jax import ops
from skd_jax.models.layers import BatchNorm, activation, channel_dropout, conv

Dtype = Any


def classifier(num_classes: int, name: str) -> nn.Conv:
  """1x1 conv with bias, the last layer of every head.

  It computes in float32 whatever the model's dtype: it is cheap, and its logits feed the losses
  and the discriminator, which are float32.
  """
  return nn.Conv(num_classes, (1, 1), use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.normal(0.01), name=name)


class PSPHead(nn.Module):
  """The SKD reference PSP module + classifier (In-Place ABN layers: BN then leaky ReLU 0.01).

  For each bin b in `bins`: adaptive average pool (PyTorch bin edges) -> 1x1 conv (no bias) -> BN
  -> leaky ReLU -> bilinear upsample (align_corners=True) back to the input size. Concatenate the
  branch outputs in bin order, then the input itself; 3x3 conv (no bias) -> BN -> leaky ReLU ->
  channel dropout (PyTorch Dropout2d, rate `dropout`, 0.1 in the reference) = the pair-wise
  feature; 1x1 classifier with bias.

  Input [N, h, w, Cin]; returns logits [N, h, w, num_classes] and feature [N, h, w, channels].
  """
  num_classes: int
  channels: int = 512
  bins: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.1
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    norm = lambda name: BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                  dtype=self.dtype, name=name)
    h, w = x.shape[1:3]
    branches = []
    for i, b in enumerate(self.bins):
      y = ops.adaptive_avg_pool(x, b)
      y = conv(self.channels, 1, dtype=self.dtype, name=f'stage{i}_conv')(y)
      y = activation(norm(f'stage{i}_bn')(y), 'leaky_relu')
      branches.append(ops.resize_bilinear(y, (h, w)))
    y = jnp.concatenate(branches + [x.astype(self.dtype)], axis=-1)
    y = conv(self.channels, 3, dtype=self.dtype, name='bottleneck_conv')(y)
    y = activation(norm('bottleneck_bn')(y), 'leaky_relu')
    feature = channel_dropout(self.dropout)(y, deterministic=not train)
    logits = classifier(self.num_classes, 'classifier')(feature)
    return logits, feature


class ASPPHead(nn.Module):
  """CIRKD's DeepLabV3 head: ASPP, projection, then a 3x3 block and the classifier (BN + ReLU).

  ASPP: a 1x1 branch, three 3x3 branches with dilation = padding = `rates`, and an image-pooling
  branch (global average, 1x1 conv, BN, ReLU, align_corners upsample); every conv without bias and
  followed by BN + ReLU. Concatenate (5 x channels) -> 1x1 projection -> BN -> ReLU -> dropout 0.5.
  Then 3x3 conv (no bias) -> BN -> ReLU -> dropout 0.1 = the pair-wise feature; 1x1 classifier.
  Both dropouts are element-wise (PyTorch ``nn.Dropout``), as in CIRKD; `project_dropout` and
  `dropout` set their rates.

  Input [N, h, w, Cin]; returns logits [N, h, w, num_classes] and feature [N, h, w, channels].
  """
  num_classes: int
  channels: int = 256
  rates: Sequence[int] = (12, 24, 36)
  dropout: float = 0.1
  project_dropout: float = 0.5
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    def conv_bn_relu(y, kernel, name, dilation=1):
      y = conv(self.channels, kernel, dilation=dilation, dtype=self.dtype, name=f'{name}_conv')(y)
      y = BatchNorm(use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype,
                    name=f'{name}_bn')(y)
      return nn.relu(y)

    h, w = x.shape[1:3]
    x = x.astype(self.dtype)
    branches = [conv_bn_relu(x, 1, 'aspp0')]
    for i, rate in enumerate(self.rates, start=1):
      branches.append(conv_bn_relu(x, 3, f'aspp{i}', dilation=rate))
    pooled = conv_bn_relu(jnp.mean(x, axis=(1, 2), keepdims=True), 1, 'aspp_pool')
    branches.append(ops.resize_bilinear(pooled, (h, w)))
    y = conv_bn_relu(jnp.concatenate(branches, axis=-1), 1, 'project')
    y = nn.Dropout(self.project_dropout)(y, deterministic=not train)
    y = conv_bn_relu(y, 3, 'block')
    feature = nn.Dropout(self.dropout)(y, deterministic=not train)
    logits = classifier(self.num_classes, 'classifier')(feature)
    return logits, feature


class AuxHead(nn.Module):
  """Auxiliary FCN head on layer3: 3x3 conv -> BN -> act -> dropout -> 1x1 classifier.

  Two flavours, each its reference's: the SKD reference (``use_bias=True`` on the 3x3 conv, leaky
  ReLU 0.01, channel dropout) and CIRKD (no bias, ReLU, element-wise dropout); both drop at rate
  `dropout` (0.1 in both references).
  Input [N, h, w, Cin]; returns logits [N, h, w, num_classes].
  """
  num_classes: int
  channels: int
  use_bias: bool = True
  activation: str = 'leaky_relu'
  channel_dropout: bool = True
  dropout: float = 0.1
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = conv(self.channels, 3, use_bias=self.use_bias, dtype=self.dtype, name='conv')(x)
    y = BatchNorm(use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype,
                  name='bn')(y)
    y = activation(y, self.activation)
    drop = channel_dropout(self.dropout) if self.channel_dropout else nn.Dropout(self.dropout)
    y = drop(y, deterministic=not train)
    return classifier(self.num_classes, 'classifier')(y)
