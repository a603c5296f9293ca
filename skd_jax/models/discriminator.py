"""Holistic-distillation discriminator of Structured Knowledge Distillation (SAGAN style).

The discriminator scores a whole segmentation map (teacher or student logits) with one number per
image; the student is trained to make its maps score like the teacher's (Wasserstein or hinge
adversarial loss, see the reference notes, section 4). Layout for an input of C channels (NHWC),
widths ``features = (64, 128, 256, 512)`` in the reference:

  ``preprocess_additional``  BatchNorm over the C channels (reference variant only)
  ``l1``    spectral-norm conv 4x4 stride 2 pad 1, C -> 64,    LeakyReLU 0.1
  ``l2``    spectral-norm conv 4x4 stride 2 pad 1, 64 -> 128,  LeakyReLU 0.1
  ``l3``    spectral-norm conv 4x4 stride 2 pad 1, 128 -> 256, LeakyReLU 0.1
  ``attn1`` self-attention(256)
  ``l4``    spectral-norm conv 4x4 stride 2 pad 1, 256 -> 512, LeakyReLU 0.1
  ``attn2`` self-attention(512)
  ``last``  conv 4x4 stride 1 pad 0, 512 -> 1 (plain, with bias)
  global mean of the final map -> one score per image.

A 65x65 input (the logits of a 512x512 crop) gives maps of 32, 16, 8, 4 and 1 pixels, so the mean is
the reference's single output exactly. The reference builds ``l4`` only for 65x65 inputs and fails
on anything else; averaging the final map (as the paper describes, and as the CIRKD benchmark does
for its 64x128 logits, whose final map is 1x5) makes every input of at least `MIN_INPUT_SIZE` pixels
per side work.

Variable names follow the reference's PyTorch ``state_dict`` (``l1.0.module.weight_bar`` ->
``params/l1/conv/kernel``, ``attn1.query_conv.weight`` -> ``params/attn1/query_conv/kernel``, ...),
kernels transposed from OIHW to HWIO (`skd_jax.torch_convert.convert_discriminator_state_dict` maps
them). Spectral normalisation (`SpectralConv`) keeps the power-iteration vector ``u`` ([1, out],
the reference's ``weight_u``) and the last ``sigma`` in the ``batch_stats`` collection, beside the
BatchNorm statistics, under the names Flax's `nn.SpectralNorm` gives them. The reference also
stores ``weight_v``, but every forward recomputes v from u before using it, so u alone carries the
state and loading ``weight_u`` reproduces the reference exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from skd_jax import ops
from skd_jax.models.layers import BatchNorm

Dtype = Any

# PyTorch's BatchNorm defaults (momentum 0.1 in PyTorch's convention is 0.9 in Flax's).
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5
_LEAKY_SLOPE = 0.1
_SN_EPS = 1e-12  # SAGAN's l2normalize: v / (||v|| + eps)

# The collection of `SpectralConv`'s optional backward vectors (see there).
SN_BACKWARD = 'sn_backward'

# The four downsampling convs and the final conv, as (kernel, stride, padding) per spatial axis.
_DOWN = (4, 2, 1)
_LAST = (4, 1, 0)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
  """PyTorch's conv output length (may be <= 0 when the kernel does not fit)."""
  return (size + 2 * padding - kernel) // stride + 1


def score_map_size(size: int) -> int:
  """Length, along one axis, of the final map the discriminator averages, for an input length."""
  for _ in range(4):
    size = _conv_out(size, *_DOWN)
  return _conv_out(size, *_LAST)


def _min_input_size() -> int:
  size = 1
  while score_map_size(size) < 1:
    size += 1
  return size


# Smallest input height and width the discriminator accepts (64: the fourth downsampling conv must
# leave at least a 4x4 map for the last 4x4 conv).
MIN_INPUT_SIZE = _min_input_size()


def torch_kernel_init() -> Callable[..., jax.Array]:
  """PyTorch's default conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = kh*kw*in.

  (``kaiming_uniform_(a=sqrt(5))``; the reference keeps PyTorch's defaults everywhere.)
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(features: int, kernel: int, stride: int, padding: int, fan_in: int, dtype: Dtype,
          name: str) -> nn.Conv:
  # Explicit symmetric padding as in PyTorch: for odd sizes (65) 'SAME' would pad (1, 2) and give
  # ceil(H / 2) outputs instead of floor(H / 2).
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=True, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=torch_kernel_init(),
                 bias_init=torch_bias_init(fan_in), name=name)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / (jnp.linalg.norm(x) + _SN_EPS)


def power_iteration(matrix: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One power iteration of SAGAN's ``SpectralNorm._update_u_v``: ``v = W^T u``, ``u = W v``.

  Args:
    matrix: [kh*kw*in, out] the flattened HWIO kernel (the transpose, up to a row permutation,
      of PyTorch's ``weight.view(out, -1)``; sigma, u and the normalised kernel are the same).
    u: [1, out] the current estimate of the left singular vector (need not be normalised).

  Returns:
    (u, v): [1, out] and [1, kh*kw*in], unit vectors (``x / (||x|| + 1e-12)``, as SAGAN's).
  """
  v = _l2_normalize(u @ matrix.T)
  return _l2_normalize(v @ matrix), v


def _sigma(matrix: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
  """SAGAN's ``sigma = u . (W v)``, a scalar."""
  return (v @ matrix @ u.T)[0, 0]


class _ConvWeights(nn.Module):
  """A conv's kernel [k, k, in, out] and bias [out], PyTorch's default init (nn.Conv's names)."""

  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    k = self.kernel_size
    fan_in = k * k * in_features
    kernel = self.param('kernel', torch_kernel_init(), (k, k, in_features, self.features),
                        jnp.float32)
    bias = self.param('bias', torch_bias_init(fan_in), (self.features,), jnp.float32)
    return kernel, bias


class _SpectralNorm(nn.Module):
  """``kernel / sigma(kernel)``, sigma from one power iteration per call; its state in batch_stats.

  The variable names are those of Flax's ``nn.SpectralNorm`` around a layer named ``conv``.
  """

  @nn.compact
  def __call__(self, kernel: jax.Array, update_stats: bool) -> jax.Array:
    matrix = kernel.reshape(-1, kernel.shape[-1])
    u_var = self.variable('batch_stats', 'conv/kernel/u', lambda: jax.random.normal(
        self.make_rng('params'), (1, matrix.shape[-1]), jnp.float32))
    sigma_var = self.variable('batch_stats', 'conv/kernel/sigma', jnp.ones, (), jnp.float32)
    u, v = jax.lax.stop_gradient(power_iteration(matrix, u_var.value))
    sigma = _sigma(matrix, u, v)
    if self.has_variable(SN_BACKWARD, 'u'):
      # The reference's backward: sigma's value from this call's vectors, its gradient
      # (u v^T) from the given ones.
      backward_sigma = _sigma(matrix, jax.lax.stop_gradient(self.get_variable(SN_BACKWARD, 'u')),
                              jax.lax.stop_gradient(self.get_variable(SN_BACKWARD, 'v')))
      sigma = jax.lax.stop_gradient(sigma - backward_sigma) + backward_sigma
    if update_stats:
      u_var.value, sigma_var.value = u, sigma
    return kernel / jnp.where(sigma != 0, sigma, 1.0)


class SpectralConv(nn.Module):
  """Spectral-norm conv 4x4 stride 2 pad 1 with bias (the reference's ``SpectralNorm(Conv2d)``).

  The kernel is divided by its largest singular value, estimated by one power iteration per call
  from the stored vector ``u`` (`power_iteration`, SAGAN's formulas); the bias is not normalised.
  Gradients flow through sigma but not through u and v, as in the reference.

  With ``train=True`` the new u (and sigma) are written to ``batch_stats`` (apply with
  ``mutable=['batch_stats']``). With ``train=False`` the iteration still runs from the stored u but
  is not written back, so evaluation is deterministic; the reference advances u on every forward,
  evaluation included.

  The gradient through sigma is ``u v^T`` of this call's vectors: the intended gradient, and the
  default. The reference's ``SpectralNorm`` reassigns u and v in place, on the very tensors that
  earlier forwards saved for their backward, so every backward of its step uses the step's LAST
  u, v instead (README, faithfulness notes). Given a collection `SN_BACKWARD` holding ``u`` [1,
  out] and ``v`` [1, kh*kw*in] for this layer (`spectral_vectors_after` computes them), sigma's
  gradient uses those: the reference's behaviour, ``disc.sn_backward='last'``.

  Attributes:
    features: output channels.
    dtype: computation dtype of the convolution (the power iteration runs in float32).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[N, H, W, Cin] -> [N, floor(H / 2), floor(W / 2), features]."""
    kernel_size, stride, padding = _DOWN
    kernel, bias = _ConvWeights(self.features, kernel_size, name='conv')(x.shape[-1])
    kernel = _SpectralNorm(name='sn')(kernel, update_stats=train)
    # Explicit symmetric padding as in PyTorch (see `_conv`).
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (stride, stride),
        ((padding, padding), (padding, padding)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
  """SAGAN self-attention block (the reference's ``Self_Attn``).

  For pixels i, j of the flattened map: ``q = W_q x + b_q``, ``k = W_k x + b_k`` (C -> C/8),
  ``v = W_v x + b_v`` (C -> C), ``energy[i, j] = q_i . k_j`` (no scaling), attention = softmax over
  j, ``out_i = gamma * sum_j attn[i, j] v_j + x_i``. ``gamma`` (shape [1], as in the reference) is
  initialised to 0, so the block is the identity at initialisation. The softmax runs in float32.

  Attributes:
    reduction: channel reduction of the query and key projections (8 in SAGAN; at least 1 channel
      is kept, so tiny test widths work).
    dtype: computation dtype.
  """

  reduction: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, H, W, C]."""
    n, h, w, c = x.shape
    qk = max(1, c // self.reduction)
    q = _conv(qk, 1, 1, 0, c, self.dtype, name='query_conv')(x).reshape(n, h * w, qk)
    k = _conv(qk, 1, 1, 0, c, self.dtype, name='key_conv')(x).reshape(n, h * w, qk)
    v = _conv(c, 1, 1, 0, c, self.dtype, name='value_conv')(x).reshape(n, h * w, c)
    energy = jnp.einsum('nic,njc->nij', q, k).astype(jnp.float32)
    attention = jax.nn.softmax(energy, axis=-1)  # Over the keys j.
    out = jnp.einsum('nij,njc->nic', attention.astype(v.dtype), v).reshape(n, h, w, c)
    gamma = self.param('gamma', nn.initializers.zeros, (1,), jnp.float32)
    return (gamma.astype(out.dtype) * out + x).astype(self.dtype)


class Discriminator(nn.Module):
  """SAGAN-style discriminator scoring a segmentation map with one number per image.

  Two input variants:

  - ``image_conditioned=False`` (default, the reference code that produced the published numbers):
    the raw logits [N, H, W, C] go through a BatchNorm over the C channels
    (``preprocess_additional``; eps 1e-5, PyTorch momentum 0.1). In train mode it normalises with
    the statistics of the batch given to this call, so scoring the student's and the teacher's
    maps in separate calls normalises each with its own statistics, as the reference does. Its
    running statistics are PyTorch's (unbiased running variance, as every BatchNorm here), so a
    reference checkpoint's ``running_var`` means the same; only eval mode reads them, and neither
    the reference's training nor ours runs the discriminator in eval mode.
  - ``image_conditioned=True`` (the paper, and the CVPR branch of the reference code): the input is
    ``concat([softmax(logits), resize(image)])`` over channels, C + 3 of them, the image resized
    bilinearly (align_corners=True) to the logits' H x W. The logits are NOT batch-normalised in
    this variant: the softmax already bounds them. The image is used as passed (the reference data
    pipeline gives BGR minus the Caffe mean on the 0..255 scale), so any rescaling is the caller's.

  Any H, W >= `MIN_INPUT_SIZE` (64) works; the final map, [N, (H//16) - 3, (W//16) - 3, 1], is
  averaged to one score (65x65 -> 1x1, exactly the reference; 64x128 -> 1x5, as in CIRKD).

  Spectral normalisation and BatchNorm keep state in ``batch_stats``: call ``apply`` with
  ``mutable=['batch_stats']`` when ``train=True``. Parameters are float32; the computation runs in
  ``dtype`` and the scores are float32.

  Attributes:
    features: widths of l1..l4 (attention blocks follow l3 and l4); the reference is
      (64, 128, 256, 512).
    image_conditioned: use the paper's image-conditioned input (see above); default False.
    min_input_size: 0 (default, the reference) rejects maps smaller than `MIN_INPUT_SIZE`; a
      positive value first upsamples (bilinear, align_corners=True) any map smaller than it along
      an axis to that size: not in any reference, it lets tiny CPU test and demo crops use D.
    dtype: computation dtype (default float32; the adversarial losses should stay in float32).
  """

  features: Sequence[int] = (64, 128, 256, 512)
  image_conditioned: bool = False
  min_input_size: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, logits: jax.Array, image: jax.Array | None = None, *,
               train: bool) -> jax.Array:
    """Scores segmentation maps.

    Args:
      logits: [N, H, W, C] logits (teacher, student, or an interpolation of both for the gradient
        penalty), H, W >= `MIN_INPUT_SIZE`.
      image: [N, Hi, Wi, 3] input image; required iff ``image_conditioned``.
      train: batch statistics in the BatchNorm and u / sigma / running statistics updated
        (needs ``mutable=['batch_stats']``); otherwise running statistics and stored u.

    Returns:
      [N] float32 scores.
    """
    if len(self.features) != 4:
      raise ValueError(f'features must have 4 widths (l1..l4), got {tuple(self.features)}')
    if logits.ndim != 4:
      raise ValueError(f'logits must be [N, H, W, C], got shape {logits.shape}')
    if self.min_input_size and min(logits.shape[1:3]) < self.min_input_size:
      logits = ops.resize_bilinear(
          logits, tuple(max(d, self.min_input_size) for d in logits.shape[1:3]))
    n, h, w, _ = logits.shape
    out_h, out_w = score_map_size(h), score_map_size(w)
    if out_h < 1 or out_w < 1:
      raise ValueError(
          f'Discriminator needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got '
          f'{h}x{w}: its last 4x4 conv would see a map smaller than its kernel.')

    if self.image_conditioned:
      if image is None:
        raise ValueError('image_conditioned=True needs the image')
      if image.ndim != 4 or image.shape[0] != n:
        raise ValueError(f'image must be [N={n}, H, W, 3], got shape {image.shape}')
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      image = ops.resize_bilinear(image.astype(jnp.float32), (h, w))
      x = jnp.concatenate([probs, image], axis=-1).astype(self.dtype)
    else:
      if image is not None:
        raise ValueError('image given but image_conditioned=False')
      x = BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS,
                    dtype=self.dtype, name='preprocess_additional')(logits)

    f1, f2, f3, f4 = self.features
    x = nn.leaky_relu(SpectralConv(f1, self.dtype, name='l1')(x, train=train), _LEAKY_SLOPE)
    x = nn.leaky_relu(SpectralConv(f2, self.dtype, name='l2')(x, train=train), _LEAKY_SLOPE)
    x = nn.leaky_relu(SpectralConv(f3, self.dtype, name='l3')(x, train=train), _LEAKY_SLOPE)
    x = SelfAttention(dtype=self.dtype, name='attn1')(x)
    x = nn.leaky_relu(SpectralConv(f4, self.dtype, name='l4')(x, train=train), _LEAKY_SLOPE)
    x = SelfAttention(dtype=self.dtype, name='attn2')(x)
    kernel, stride, padding = _LAST
    x = _conv(1, kernel, stride, padding, kernel * kernel * f4, self.dtype, name='last')(x)
    # x: [N, out_h, out_w, 1]; the mean over the map is the reference's output for 65x65 inputs.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))


SPECTRAL_LAYERS = ('l1', 'l2', 'l3', 'l4')


def spectral_vectors_after(params: dict[str, Any], batch_stats: dict[str, Any],
                           num_calls: int) -> dict[str, Any]:
  """The `SN_BACKWARD` collection of the reference's backward: every layer's (u, v) after
  `num_calls` more train-mode calls from the ``u`` in `batch_stats`, with `params` fixed.

  The power iteration depends on the kernel and the previous u only, so the vectors of a step's
  last discriminator call are known before its first. Returns ``{layer: {'sn': {'u', 'v'}}}``
  (gradient stopped).
  """
  if num_calls < 1:
    raise ValueError(f'num_calls must be at least 1, got {num_calls}')
  vectors = {}
  for layer in SPECTRAL_LAYERS:
    kernel = params[layer]['conv']['kernel']
    matrix = kernel.reshape(-1, kernel.shape[-1])
    u = batch_stats[layer]['sn']['conv/kernel/u']
    for _ in range(num_calls):
      u, v = power_iteration(matrix, u)
    vectors[layer] = {'sn': {'u': u, 'v': v}}
  return jax.lax.stop_gradient(vectors)


def init_variables(model: Discriminator, rng: jax.Array, logits: jax.Array,
                   image: jax.Array | None = None) -> dict[str, Any]:
  """``model.init``, its spectral-norm kernels drawn from their own key.

  The reference (SAGAN's ``SpectralNorm``) keeps the raw PyTorch-initialised weight
  (``weight_bar``, U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and a random ``u``, as ``model.init``
  does. Each l1..l4 kernel is drawn again here from `rng`'s second half, as since the first
  version (Flax's ``nn.SpectralNorm``, used then, stored the kernels divided by sigma at init,
  which made the first SGD steps smaller than the reference's), so that runs keep their
  initial kernels.

  Args:
    model: the discriminator.
    rng: a PRNG key.
    logits: [N, H, W, C] example logits (only the shapes matter).
    image: [N, Hi, Wi, 3] example image, for an image-conditioned model.

  Returns:
    {'params', 'batch_stats'}, as ``model.init``.
  """
  init_rng, kernel_rng = jax.random.split(rng)
  variables = model.init(init_rng, logits, image, train=False)
  params = dict(variables['params'])
  for layer, key in zip(SPECTRAL_LAYERS, jax.random.split(kernel_rng, len(SPECTRAL_LAYERS))):
    conv = dict(params[layer]['conv'])
    conv['kernel'] = torch_kernel_init()(key, conv['kernel'].shape, jnp.float32)
    params[layer] = dict(params[layer], conv=conv)
  return dict(variables, params=params)


__all__ = [
    'Discriminator', 'MIN_INPUT_SIZE', 'SN_BACKWARD', 'SPECTRAL_LAYERS', 'SelfAttention',
    'SpectralConv', 'init_variables', 'power_iteration', 'score_map_size',
    'spectral_vectors_after', 'torch_bias_init', 'torch_kernel_init',
]
