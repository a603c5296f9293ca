"""Array ops with PyTorch's exact semantics, shared by the models and the losses.

All functions take NHWC arrays. Where PyTorch and `jax.image` / `flax.linen` disagree (bilinear
resizing with ``align_corners=True``, adaptive average pooling bin edges, ``ceil_mode`` pooling),
these follow PyTorch, because the reference code (PyTorch) produced the published numbers.

Resizing and adaptive pooling are written as small interpolation / averaging matrices applied per
axis (built in NumPy from the static shapes), which is exact, cheap for the sizes involved and
differentiable. Under `jax.export` with symbolic image sizes (`skd_jax.export`) the same matrices
are built in JAX from the sizes' integer arithmetic instead.
"""

from __future__ import annotations

from typing import Sequence

import jax
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
  window, strides = (1, kh, kw, 1), (1, sh, sw, 1)
  # Concrete NumPy init values: JAX recognises (max, -inf) and (add, 0) as the differentiable
  # reduce_window_max / reduce_window_sum only when the init value is a known constant.
  if mode == 'max':
    init = np.array(-np.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, window, strides, pads)[:, :oh, :ow]
  summed = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, window, strides,
                                 pads)[:, :oh, :ow]
  # PyTorch divides by the window clipped to the (symmetrically) padded input.
  counts = np.outer(_window_counts(h, kh, sh, ph, oh), _window_counts(w, kw, sw, pw, ow))
  return summed / jnp.asarray(counts, x.dtype)[None, :, :, None]


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


__all__ = [
    'adaptive_avg_pool', 'adaptive_pool_matrix', 'align_corners_matrix', 'ceil_div', 'pool2d',
    'pool_output_size', 'resize_bilinear',
]
