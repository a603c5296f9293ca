"""Learned adapters that map student features onto the teacher's channels for feature distillation.

`ChannelAdapter` is the 1x1 convolution of CIRKD's channel-wise distillation (``CriterionCWD.conv``:
``nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)``), applied to the student's
pre-classifier features when their channel count differs from the teacher's (CIRKD protocol:
student 128, teacher 256) before `losses.channel_wise_loss`. In CIRKD its weight is in the
student's SGD parameter list (same learning rate, momentum and weight decay) and it is never
applied to the logits (equal channel counts there). Its parameters train with the student and are
checkpointed with it; the teacher never sees it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skd_jax.models.discriminator import torch_kernel_init

Dtype = Any


class ChannelAdapter(nn.Module):
  """1x1 convolution without bias, [N, H, W, Cs] -> [N, H, W, features].

  The kernel is stored as ``params/conv/kernel`` with shape [1, 1, Cs, features] (HWIO; CIRKD's
  ``conv.weight`` [features, Cs, 1, 1] transposed), float32 whatever the compute dtype, and
  initialised as PyTorch initialises a fresh ``nn.Conv2d`` (CIRKD does not re-initialise it):
  U(-1/sqrt(Cs), 1/sqrt(Cs)).

  Attributes:
    features: output channels (the teacher's channel count).
    dtype: computation dtype (the CWD loss casts its inputs to float32 in any case).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=torch_kernel_init(), name='conv')(x)


__all__ = ['ChannelAdapter']
