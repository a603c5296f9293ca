"""Building blocks shared by the backbones and heads: PyTorch-faithful BatchNorm and conv helpers.

Parameters are float32 whatever the compute `dtype`; normalisation statistics are computed and kept
in float32, so a bfloat16 model has float32 BN state.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from skd_jax import ops

Dtype = Any

# He-normal with fan-out, the initialiser of the reference ResNets' convolutions.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's semantics.

  Differences from `flax.linen.BatchNorm`, each chosen to match the reference (PyTorch):
    - the running variance is updated with the UNBIASED batch variance (``n / (n - 1)``), as
      PyTorch stores it, while normalisation uses the biased one;
    - statistics and the affine transform are computed in float32 whatever the input dtype; the
      result is cast back to `dtype` (or the input dtype).
  Under `jax.jit` with a batch-sharded input the statistics are over the global batch (the
  synchronised BN of the reference runs), without any axis name.

  Attributes:
    momentum: weight of the old running value (flax convention; PyTorch momentum 0.1 == 0.9 here).
    epsilon: added to the variance.
    unbiased_running_var: False gives flax's biased running variance instead of PyTorch's.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_running_var: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    xf = x.astype(jnp.float32)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)  # two-pass: stable in float32
      if not self.is_initializing():
        n = x.size // features
        stored_var = var * (n / max(n - 1, 1)) if self.unbiased_running_var else var
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * stored_var
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype or x.dtype)


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1,
         padding: int | None = None, use_bias: bool = False, dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Conv:
  """A 2-D convolution with PyTorch's explicit symmetric padding (default: ``dilation * (k//2)``),
  computed by `ops.conv_general_dilated` (XLA's convolution, expressed for speed on CPU)."""
  if padding is None:
    padding = dilation * (kernel // 2)
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
      kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=conv_init,
      conv_general_dilated=ops.conv_general_dilated, name=name)


def activation(x: jax.Array, kind: str) -> jax.Array:
  """'relu' (backbones, DeepLabV3) or 'leaky_relu' (slope 0.01: the reference's In-Place ABN heads)."""
  if kind == 'relu':
    return nn.relu(x)
  if kind == 'leaky_relu':
    return nn.leaky_relu(x, 0.01)
  raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {kind!r}")


def scaled(channels: int, multiplier: float) -> int:
  """Channel count times the width multiplier, at least 1."""
  return max(1, int(round(channels * multiplier)))


def channel_dropout(rate: float) -> nn.Dropout:
  """PyTorch ``Dropout2d`` on NHWC: whole channels dropped, the mask broadcast over H and W."""
  return nn.Dropout(rate, broadcast_dims=(1, 2))


__all__: Sequence[str] = ['BatchNorm', 'activation', 'channel_dropout', 'conv', 'conv_init', 'scaled']
