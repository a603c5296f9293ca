"""Array ops with PyTorch's exact semantics, shared by the models and the losses.

All functions take NHWC arrays. Where PyTorch and `jax.image` / `flax.linen` disagree (bilinear
resizing with ``align_corners=True``, adaptive average pooling bin edges, ``ceil_mode`` pooling),
these follow PyTorch, because the reference code (PyTorch) produced the published numbers.

Resizing and adaptive pooling are written as small interpolation / averaging matrices applied per
axis (built in NumPy from the static shapes), which is exact, cheap for the sizes involved and
differentiable. Under `jax.export` with symbolic image sizes (`skd_jax.export`) the same matrices
are built in JAX from the sizes' integer arithmetic instead.

`conv_general_dilated` (every backbone and head convolution) and the max pooling's gradient are
the same functions as XLA's, expressed so that XLA:CPU runs them fast (see the README's
performance section): 1x1 convolutions as matrix products, small-batch kernel gradients by rows,
a max-pool gradient without select-and-scatter. GPUs and TPUs keep XLA's own convolutions.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(x) if _is_static(x) else x for x in v)   # symbolic sizes stay as they are
  if len(v) != 2:
    raise ValueError(f'expected an int or a pair of ints, got {v!r}')
  return v


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Linear interpolation matrix [out_size, in_size] of PyTorch's ``align_corners=True``.

  Output pixel ``i`` samples the input at ``src = i * (in_size - 1) / (out_size - 1)`` (``0`` when
  ``out_size == 1``), interpolating linearly between ``floor(src)`` and ``floor(src) + 1``.
  """
  m = np.zeros((out_size, in_size), np.float64)
  if out_size == 1 or in_size == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(out_size) * (in_size - 1) / (out_size - 1)
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def _is_static(*sizes) -> bool:
  """True unless a size is a `jax.export` symbolic dimension."""
  return not any(jax.export.is_symbolic_dim(s) for s in sizes)


def _symbolic_align_corners_matrix(in_size, out_size, dtype) -> jax.Array:
  """`align_corners_matrix` for symbolic sizes, in JAX: [out_size, in_size] of `dtype`.

  ``src = i * (in - 1) / (out - 1)`` is split in integers, ``lo = floor``, ``frac = remainder /
  (out - 1)``, so the weights are one rounding away from the exact ones (the NumPy matrix cast
  to float32 is too).
  """
  numerator = jnp.arange(out_size, dtype=jnp.int32) * (jnp.asarray(in_size, jnp.int32) - 1)
  denominator = jnp.maximum(jnp.asarray(out_size, jnp.int32) - 1, 1)
  lo = numerator // denominator
  frac = ((numerator - lo * denominator) / denominator).astype(dtype)
  hi = jnp.minimum(lo + 1, jnp.asarray(in_size, jnp.int32) - 1)
  columns = jnp.arange(in_size, dtype=jnp.int32)[None, :]
  return ((1 - frac)[:, None] * (lo[:, None] == columns).astype(dtype)
          + frac[:, None] * (hi[:, None] == columns).astype(dtype))


def _interpolation_matrix(in_size, out_size, dtype) -> jax.Array:
  if _is_static(in_size, out_size):
    return jnp.asarray(align_corners_matrix(in_size, out_size), dtype)
  return _symbolic_align_corners_matrix(in_size, out_size, dtype)


def resize_bilinear(x: jax.Array, size: int | Sequence[int]) -> jax.Array:
  """Bilinear resize with ``align_corners=True`` (PyTorch ``F.interpolate`` / ``F.upsample``).

  This is not `jax.image.resize`, which uses half-pixel centres (``align_corners=False``).

  Args:
    x: [N, H, W, C] array, any float dtype (the result has the same dtype).
    size: output (h, w), or one int for both.

  Returns:
    [N, h, w, C] array.
  """
  out_h, out_w = _pair(size)
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):   # symbolic sizes compare equal only when identical
    return x
  mh = _interpolation_matrix(in_h, out_h, x.dtype)
  mw = _interpolation_matrix(in_w, out_w, x.dtype)
  x = jnp.einsum('oh,nhwc->nowc', mh, x)
  return jnp.einsum('pw,nowc->nopc', mw, x)


def adaptive_pool_matrix(in_size: int, bins: int) -> np.ndarray:
  """Averaging matrix [bins, in_size] with PyTorch's adaptive pooling bin edges.

  Bin ``i`` covers ``[floor(i * L / b), ceil((i + 1) * L / b))``; bins overlap when ``L`` is not
  divisible by ``b``.
  """
  m = np.zeros((bins, in_size), np.float64)
  for i in range(bins):
    start = (i * in_size) // bins
    end = -((-(i + 1) * in_size) // bins)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def _symbolic_adaptive_pool_matrix(in_size, bins: int, dtype) -> jax.Array:
  """`adaptive_pool_matrix` for a symbolic `in_size`, in JAX: [bins, in_size] of `dtype`."""
  size = jnp.asarray(in_size, jnp.int32)
  index = jnp.arange(bins, dtype=jnp.int32)
  start = (index * size) // bins
  end = -((-(index + 1) * size) // bins)  # ceil
  rows = jnp.arange(in_size, dtype=jnp.int32)[None, :]
  inside = (rows >= start[:, None]) & (rows < end[:, None])
  return inside.astype(dtype) / (end - start).astype(dtype)[:, None]


def _pooling_matrix(in_size, bins: int, dtype) -> jax.Array:
  if _is_static(in_size):
    return jnp.asarray(adaptive_pool_matrix(in_size, bins), dtype)
  return _symbolic_adaptive_pool_matrix(in_size, bins, dtype)


def adaptive_avg_pool(x: jax.Array, bins: int | Sequence[int]) -> jax.Array:
  """PyTorch ``nn.AdaptiveAvgPool2d(bins)`` on [N, H, W, C]; returns [N, bh, bw, C]."""
  bh, bw = _pair(bins)
  _, in_h, in_w, _ = x.shape
  mh = _pooling_matrix(in_h, bh, x.dtype)
  mw = _pooling_matrix(in_w, bw, x.dtype)
  x = jnp.einsum('oh,nhwc->nowc', mh, x)
  return jnp.einsum('pw,nowc->nopc', mw, x)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
  """PyTorch's pooling output length, including its ceil-mode rule.

  With ``ceil_mode`` the length is rounded up, but the last window must start inside the input or
  the left padding (``(out - 1) * stride < size + padding``), else it is dropped.
  """
  span = size + 2 * padding - kernel
  if span < 0:
    raise ValueError(f'pooling kernel {kernel} is larger than the padded input {size + 2 * padding}')
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  # (out - 1) * stride - span is below the stride, so the last window can only start past the
  # input when kernel - padding < stride. Testing that first keeps the size a closed form for
  # symbolic sizes, where the second comparison cannot be decided.
  if ceil_mode and kernel - padding < stride and (out - 1) * stride >= size + padding:
    out -= 1
  return out


def pool2d(x: jax.Array, kernel: int | Sequence[int], stride: int | Sequence[int] | None = None,
           padding: int | Sequence[int] = 0, *, ceil_mode: bool = False,
           mode: str = 'max') -> jax.Array:
  """PyTorch ``max_pool2d`` / ``avg_pool2d`` (``count_include_pad=True``) on [N, H, W, C].

  Windows that run past the input because of ``ceil_mode`` see only the real input (max), or are
  averaged over the elements inside the padded input (avg), exactly as PyTorch does.

  Args:
    x: [N, H, W, C].
    kernel, stride, padding: per axis or one int for both; ``stride`` defaults to ``kernel``.
    ceil_mode: round the output size up (PyTorch ``ceil_mode=True``).
    mode: 'max' or 'avg'.

  Returns:
    [N, h, w, C] with h, w from `pool_output_size`.
  """
  if mode not in ('max', 'avg'):
    raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
  kh, kw = _pair(kernel)
  sh, sw = _pair(kernel if stride is None else stride)
  ph, pw = _pair(padding)
  _, h, w, _ = x.shape
  oh = pool_output_size(h, kh, sh, ph, ceil_mode)
  ow = pool_output_size(w, kw, sw, pw, ceil_mode)
  pads = ((0, 0), (ph, ph + _extra_padding(h, kh, sh, ph, oh)),
          (pw, pw + _extra_padding(w, kw, sw, pw, ow)), (0, 0))
  if mode == 'max':
    if kh * kw <= _MAX_POOL_OFFSETS and _is_static(h, w):
      return _max_pool(x, (kh, kw), (sh, sw), pads)
    return _reduce_window_max(x, (kh, kw), (sh, sw), pads)[:, :oh, :ow]
  # A concrete NumPy init value: JAX recognises (add, 0) as the differentiable reduce_window_sum
  # only when the init value is a known constant.
  window, strides = (1, kh, kw, 1), (1, sh, sw, 1)
  summed = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, window, strides,
                                 pads)[:, :oh, :ow]
  # PyTorch divides by the window clipped to the (symmetrically) padded input.
  counts = np.outer(_window_counts(h, kh, sh, ph, oh), _window_counts(w, kw, sw, pw, ow))
  return summed / jnp.asarray(counts, x.dtype)[None, :, :, None]


# Windows up to this many elements take `_max_pool`'s gradient (one masked pass per offset);
# larger ones (the pair-wise nodes' 32x32 windows) keep XLA's select-and-scatter.
_MAX_POOL_OFFSETS = 16


def _reduce_window_max(x, window, strides, pads):
  # A concrete NumPy init value: JAX recognises (max, -inf) as the differentiable
  # reduce_window_max only when the init value is a known constant.
  return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, *window, 1),
                               (1, *strides, 1), pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  """Max pooling whose gradient goes to the first maximum of each window in row-major order,
  PyTorch's rule and that of XLA's select-and-scatter, without the select-and-scatter.

  XLA:CPU lowers select-and-scatter to a variadic reduce-window over (value, index) pairs and a
  scatter, which cost as much as the stem's convolutions (profile in the README); here the
  gradient is one compare-and-mask per window offset, each placed back by a strided pad.
  """
  return _reduce_window_max(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
  return _reduce_window_max(x, window, strides, pads), x


def _max_pool_bwd(window, strides, pads, x, grad):
  (kh, kw), (sh, sw) = window, strides
  xpad = jnp.pad(x, pads, constant_values=-np.inf)
  n, hp, wp, c = xpad.shape
  _, oh, ow, _ = grad.shape
  candidates = {}
  for i in range(kh):
    for j in range(kw):
      end_h, end_w = i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1
      candidates[i, j] = (end_h, end_w, jax.lax.slice(xpad, (0, i, j, 0), (n, end_h, end_w, c),
                                                      (1, sh, sw, 1)))
  # Each window's maximum taken again here from the same values, not the forward's output: XLA
  # may compute that output in a fusion whose rounding differs from the residual `x`'s (measured:
  # 3-9% of the stem's update lost on CPU when windows found no value equal to it).
  window_max = functools.reduce(jnp.maximum, [v for _, _, v in candidates.values()])
  zero = np.array(0, grad.dtype)
  taken = jnp.zeros(grad.shape, bool)
  grad_xpad = jnp.zeros(xpad.shape, grad.dtype)
  for (i, j), (end_h, end_w, candidate) in candidates.items():   # row-major order of offsets
    first = (candidate == window_max) & ~taken   # ties: the earliest offset wins
    taken = taken | first
    grad_xpad = grad_xpad + jax.lax.pad(
        jnp.where(first, grad, zero), zero,
        ((0, 0, 0), (i, hp - end_h, sh - 1), (j, wp - end_w, sw - 1), (0, 0, 0)))
  (top, _), (left, _) = pads[1], pads[2]
  return (grad_xpad[:, top:top + x.shape[1], left:left + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _extra_padding(size, kernel: int, stride: int, padding: int, out) -> int:
  """Right padding beyond `padding` that makes each of the `out` windows fit.

  For a symbolic size (`jax.export`), whose ``max(0, ...)`` cannot be decided, a stride's worth:
  enough for every window, and the windows past `out` it adds are cut off by the caller.
  """
  if not _is_static(size, out):
    return stride - 1
  return max(0, (out - 1) * stride + kernel - (size + 2 * padding))


def _window_counts(size: int, kernel: int, stride: int, padding: int, out: int) -> np.ndarray:
  starts = np.arange(out) * stride - padding
  ends = np.minimum(starts + kernel, size + padding)
  return (ends - starts).astype(np.float64)


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Convolution with a CPU-friendly kernel gradient.

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# The name `conv_general_dilated` gives its outputs (`jax.ad_checkpoint.checkpoint_name`), for
# rematerialisation policies that keep them.
CONV_OUTPUT = 'conv_output'


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, **kwargs) -> jax.Array:
  """`jax.lax.conv_general_dilated`, the same function, expressed for speed on XLA:CPU.

  A drop-in for ``flax.linen.Conv(conv_general_dilated=...)``. For an NHWC x HWIO 2-D
  convolution with explicit padding, on CPU (bench/conv_kernels.py times both choices):
    - a 1x1 kernel without padding is a matrix product over the channels (`pointwise_conv`):
      XLA:CPU runs it about 2x faster forward and 4-8x faster backward than the convolution;
    - otherwise, where `_kernel_grad_by_rows_pays`, the kernel gradient is
      `conv_kernel_grad_by_rows` (at batch 1 XLA:CPU computes it as a convolution whose only
      contracted feature is the batch, 3-5x slower than the forward pass); the forward pass and
      the input gradient stay XLA's.
  Elsewhere (other layouts, groups, input dilation; GPUs and TPUs) it is XLA's convolution. The
  sums are the same, taken in another order. The output is named `CONV_OUTPUT` for
  rematerialisation policies.
  """
  if kwargs.get('preferred_element_type') is not None:
    raise ValueError('preferred_element_type is not supported')
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  plain = (lhs.ndim == 4 and dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
           and feature_group_count == 1 and not isinstance(padding, str)
           and all(d == 1 for d in (lhs_dilation or (1, 1))))
  strides = tuple(window_strides)
  if not plain:
    out = jax.lax.conv_general_dilated(
        lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision)
  else:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    dilation = tuple(rhs_dilation or (1, 1))
    # Symbolic sizes (`jax.export`) keep XLA's convolution: the two branches' output sizes of a
    # strided 1x1 convolution are equal but written differently, which `platform_dependent`
    # cannot prove.
    if rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)) and _is_static(*lhs.shape):
      out = jax.lax.platform_dependent(
          lhs, rhs, cpu=functools.partial(pointwise_conv, strides=strides, precision=precision),
          default=functools.partial(_xla_conv, strides=strides, pads=pads, dilation=dilation,
                                    precision=precision))
    elif _kernel_grad_by_rows_pays(lhs.shape, rhs.shape):
      out = _conv_nhwc(lhs, rhs, strides, pads, dilation, precision)
    else:
      out = _xla_conv(lhs, rhs, strides, pads, dilation, precision)
  return checkpoint_name(out, CONV_OUTPUT)


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                   precision: Any = None) -> jax.Array:
  """A 1x1 convolution without padding as a matrix product: x [N, H, W, C], kernel [1, 1, C, O]
  -> [N, ceil(H / s_h), ceil(W / s_w), O]."""
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw]
  return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())), precision=precision)


def _kernel_grad_by_rows_pays(lhs_shape: Sequence[int], rhs_shape: Sequence[int]) -> bool:
  """Whether, on CPU, `conv_kernel_grad_by_rows` beats XLA's kernel gradient.

  Measured on XLA:CPU, JAX 0.10.2 (bench/conv_kernels.py and the README's table of speedups):
  3x faster for the 512-channel layer4 convolutions at batch 1, 2x for the stem's 64 -> 128,
  but slower for 64 output channels (layer1) and at batch 8 (XLA's own is adequate there).
  """
  batch = lhs_shape[0]
  out_features = rhs_shape[-1]
  # A symbolic batch (`jax.export`, inference only) has no kernel gradient to speed up.
  return _is_static(batch) and batch < 8 and out_features >= 128


def _xla_conv(x, kernel, strides, pads, dilation, precision):
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                      dimension_numbers=_NHWC, precision=precision)


def conv_kernel_grad_by_rows(x: jax.Array, grad: jax.Array, kernel_shape: Sequence[int],
                             strides: Sequence[int], pads: Sequence[tuple[int, int]],
                             dilation: Sequence[int], precision: Any = None) -> jax.Array:
  """The kernel gradient of an NHWC x HWIO convolution, as one 1-D convolution over the width.

      dK[i, j, c, o] = sum_{n, p, q} xpad[n, s_h p + d_h i, s_w q + d_w j, c] g[n, p, q, o]

  The kh kernel rows are gathered (row i: ``xpad[:, d_h i :: s_h]`` over the output rows) and
  stacked on the channel axis, and the sum over (n, p) becomes the contracted feature axis of a
  1-D convolution over the width whose window is g's width: [N*Ho, Wp, kh*C] * [N*Ho, Wo, O]
  -> [kh*C, kw, O]. XLA's own kernel gradient contracts over the batch alone as its feature axis,
  which vectorises badly on CPU when the batch is small.

  Args:
    x: [N, H, W, C] the convolution's input.
    grad: [N, Ho, Wo, O] the gradient of its output.
    kernel_shape: (kh, kw, C, O).
    strides, pads, dilation: of the convolution (pads: ((top, bottom), (left, right))).

  Returns:
    [kh, kw, C, O] in x's dtype.
  """
  kh, kw, c, o = kernel_shape
  (sh, sw), (dh, dw) = strides, dilation
  n, ho, wo, _ = grad.shape
  xpad = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  width = sw * (wo - 1) + dw * (kw - 1) + 1
  rows = [jax.lax.slice(xpad, (0, dh * i, 0, 0), (n, dh * i + sh * (ho - 1) + 1, width, c),
                        (1, sh, 1, 1)) for i in range(kh)]
  lhs = jnp.stack(rows, axis=3).reshape(n * ho, width, kh * c)
  dn = jax.lax.ConvDimensionNumbers(lhs_spec=(2, 0, 1), rhs_spec=(2, 0, 1), out_spec=(0, 2, 1))
  out = jax.lax.conv_general_dilated(lhs, grad.reshape(n * ho, wo, o), (dw,), ((0, 0),),
                                     rhs_dilation=(sw,), dimension_numbers=dn,
                                     precision=precision)            # [kh*C, kw, O]
  return out.reshape(kh, c, kw, o).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_nhwc(x, kernel, strides, pads, dilation, precision):
  return _xla_conv(x, kernel, strides, pads, dilation, precision)


def _conv_nhwc_fwd(x, kernel, strides, pads, dilation, precision):
  return _xla_conv(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _conv_nhwc_bwd(strides, pads, dilation, precision, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel, strides, pads, dilation, precision), x)
  grad_x, = input_vjp(grad)

  def by_rows(x, grad):
    return conv_kernel_grad_by_rows(x, grad, kernel.shape, strides, pads, dilation,
                                    precision).astype(kernel.dtype)

  def by_xla(x, grad):
    _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x, k, strides, pads, dilation, precision), kernel)
    return kernel_vjp(grad)[0]

  # Lowered per platform: the rows form only where it was measured to pay (XLA:CPU).
  grad_kernel = jax.lax.platform_dependent(x, grad, cpu=by_rows, default=by_xla)
  return grad_x, grad_kernel


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


__all__ = [
    'adaptive_avg_pool', 'adaptive_pool_matrix', 'align_corners_matrix', 'ceil_div',
    'conv_general_dilated', 'conv_kernel_grad_by_rows', 'pointwise_conv', 'pool2d',
    'pool_output_size',
    'resize_bilinear',
]
