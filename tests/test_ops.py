"""skd_jax.ops against brute-force NumPy versions of PyTorch's definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from np_reference import (np_adaptive_avg_pool, np_conv, np_conv_grads, np_max_pool_grad, np_pool,
                          np_resize_align_corners)
from skd_jax import ops


@pytest.mark.parametrize('in_hw,out_hw', [((5, 7), (13, 9)), ((65, 65), (129, 130)), ((1, 1), (4, 3)),
                                          ((6, 6), (1, 1)), ((9, 4), (4, 9))])
def test_resize_bilinear_matches_pytorch_definition(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3))
  got = ops.resize_bilinear(jnp.asarray(x, jnp.float32), out_hw)
  np.testing.assert_allclose(got, np_resize_align_corners(x, *out_hw), rtol=1e-5, atol=1e-5)


def test_resize_bilinear_is_not_half_pixel():
  # align_corners=True keeps the corner values; jax.image.resize (half-pixel) does not.
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  got = ops.resize_bilinear(x, (7, 7))
  assert float(got[0, 0, 0, 0]) == 0.0 and float(got[0, -1, -1, 0]) == 15.0
  half_pixel = jax.image.resize(x, (1, 7, 7, 1), 'bilinear')
  assert not np.allclose(got, half_pixel)


@pytest.mark.parametrize('size,bins', [(65, 1), (65, 2), (65, 3), (65, 6), (12, 6), (5, 3), (4, 6)])
def test_adaptive_avg_pool_matches_pytorch_bins(size, bins):
  x = np.random.default_rng(1).normal(size=(2, size, size, 3))
  got = ops.adaptive_avg_pool(jnp.asarray(x, jnp.float32), bins)
  np.testing.assert_allclose(got, np_adaptive_avg_pool(x, bins), rtol=1e-5, atol=1e-5)


def test_adaptive_bins_overlap_when_not_divisible():
  # 65 into 2 bins: [0, 33) and [32, 65) share row 32.
  m = ops.adaptive_pool_matrix(65, 2)
  assert m[0, 32] > 0 and m[1, 32] > 0 and m[0, 33] == 0 and m[1, 31] == 0


@pytest.mark.parametrize('shape,k,s,p,ceil_mode,mode', [
    ((2, 256, 256, 2), 3, 2, 1, True, 'max'),    # SKD stem pool: 256 -> 129
    ((1, 256, 256, 2), 3, 2, 1, False, 'max'),   # CIRKD stem pool: 256 -> 128
    ((2, 65, 65, 3), 32, 32, 0, True, 'max'),    # SKD node pooling: 65 -> 3 nodes
    ((2, 65, 65, 3), 32, 32, 0, True, 'avg'),
    ((1, 7, 9, 2), 2, 2, 0, True, 'max'),        # CIRKD 2x2 node kernel on odd sizes
    ((1, 7, 9, 2), 2, 2, 0, True, 'avg'),
    ((1, 8, 8, 2), 3, 2, 1, True, 'avg'),
])
def test_pool2d_matches_pytorch_definition(shape, k, s, p, ceil_mode, mode):
  x = np.random.default_rng(2).normal(size=shape)
  got = ops.pool2d(jnp.asarray(x, jnp.float32), k, s, p, ceil_mode=ceil_mode, mode=mode)
  want = np_pool(x, k, s, p, ceil_mode, mode)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pool_output_sizes():
  assert ops.pool_output_size(256, 3, 2, 1, True) == 129
  assert ops.pool_output_size(256, 3, 2, 1, False) == 128
  assert ops.pool_output_size(65, 32, 32, 0, True) == 3
  assert ops.pool_output_size(64, 32, 32, 0, True) == 2
  # ceil mode never starts a window past the input: 5 with k=2, s=2, p=1 gives 3, not 4.
  assert ops.pool_output_size(5, 2, 2, 1, True) == 3


def test_pool2d_rejects_bad_mode():
  with pytest.raises(ValueError, match="mode must be 'max' or 'avg'"):
    ops.pool2d(jnp.zeros((1, 4, 4, 1)), 2, mode='median')


def test_pool2d_gradients_match_pytorch_definition():
  # d(sum of max pool)/dx counts the windows whose maximum each (distinct-valued) element is;
  # d(sum of avg pool)/dx sums 1/pool_size over the windows covering it.
  x = np.random.default_rng(3).permutation(49).astype(np.float64).reshape(1, 7, 7, 1)
  k, s, p = 3, 2, 1
  want_max = np.zeros_like(x)
  want_avg = np.zeros_like(x)
  out = np_pool(x, k, s, p, True, 'max')
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      hs, ws = i * s - p, j * s - p
      window = (slice(max(hs, 0), min(hs + k, 7)), slice(max(ws, 0), min(ws + k, 7)))
      sub = x[0, window[0], window[1], 0]
      r, c = np.unravel_index(np.argmax(sub), sub.shape)
      want_max[0, window[0].start + r, window[1].start + c, 0] += 1
      he, we = min(hs + k, 7 + p), min(ws + k, 7 + p)
      want_avg[0, window[0], window[1], 0] += 1.0 / ((he - hs) * (we - ws))
  xj = jnp.asarray(x, jnp.float32)
  for mode, want in (('max', want_max), ('avg', want_avg)):
    grad = jax.jit(jax.grad(lambda v: ops.pool2d(v, k, s, p, ceil_mode=True, mode=mode).sum()))(xj)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


# Convolutions: `ops.conv_general_dilated` (what every backbone and head conv runs) against the
# tap-by-tap NumPy definition, forward and both gradients, through each of its forms on CPU:
# a 1x1 kernel (matrix product), a small batch with >= 128 output channels (kernel gradient by
# rows), and XLA's own convolution otherwise.
@pytest.mark.parametrize('n,hw,cin,cout,k,stride,pad,dilation', [
    (1, (9, 11), 5, 128, 3, 1, 2, 2),     # rows, dilated (layer3)
    (1, (13, 12), 4, 128, 3, 1, 4, 4),    # rows, dilation 4 (layer4)
    (2, (11, 10), 3, 128, 3, 2, 1, 1),    # rows, strided (layer2_0)
    (1, (15, 14), 3, 128, 7, 2, 3, 1),    # rows, 7x7 stride 2 (torchvision stem)
    (1, (9, 9), 6, 128, 1, 2, 0, 1),      # 1x1 stride 2 (projection)
    (2, (7, 8), 6, 5, 1, 1, 0, 1),        # 1x1
    (8, (6, 7), 3, 4, 3, 1, 2, 2),        # XLA's convolution (batch 8)
])
def test_conv_general_dilated_matches_numpy_definition(n, hw, cin, cout, k, stride, pad, dilation):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(n, *hw, cin))
  kernel = rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)
  want = np_conv(x, kernel, stride=stride, padding=pad, dilation=dilation)
  grad = rng.normal(size=want.shape)
  want_dx, want_dk = np_conv_grads(x, kernel, grad, stride=stride, padding=pad,
                                   dilation=dilation)

  def conv(v, kern):
    return ops.conv_general_dilated(v, kern, (stride, stride), ((pad, pad), (pad, pad)),
                                    rhs_dilation=(dilation, dilation),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got, vjp = jax.vjp(jax.jit(conv), f32(x), f32(kernel))
  got_dx, got_dk = vjp(f32(grad))
  # float32 against float64: measured error at most 5e-7 of the largest value (Intel Xeon,
  # XLA:CPU); 1e-5 leaves a 20x margin for other CPUs' summation orders.
  for g, w in ((got, want), (got_dx, want_dx), (got_dk, want_dk)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_conv_kernel_grad_by_rows_matches_numpy_definition():
  # Non-square strides, dilations and paddings, directly (whatever the dispatch rule picks).
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 10, 9, 3))
  kernel = rng.normal(size=(3, 2, 3, 4))
  strides, pads, dilation = (2, 1), ((1, 2), (0, 1)), (1, 2)
  out = jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                                     strides, pads, rhs_dilation=dilation,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  grad = rng.normal(size=out.shape)
  xp = np.pad(x, ((0, 0), *pads, (0, 0)))
  want = np.zeros(kernel.shape)
  _, oh, ow, _ = grad.shape
  for i in range(3):
    for j in range(2):
      patch = xp[:, dilation[0] * i:dilation[0] * i + strides[0] * (oh - 1) + 1:strides[0],
                 dilation[1] * j:dilation[1] * j + strides[1] * (ow - 1) + 1:strides[1]]
      want[i, j] = np.einsum('nhwc,nhwo->co', patch, grad)
  got = ops.conv_kernel_grad_by_rows(jnp.asarray(x, jnp.float32), jnp.asarray(grad, jnp.float32),
                                     kernel.shape, strides, pads, dilation)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())  # as above


def test_max_pool_gradient_inside_a_fused_program_is_xlas(monkeypatch):
  """Max pooling of a jitted BatchNorm + ReLU, as in the stem: XLA may fuse the normalisation
  into the forward pooling and round it otherwise than the pooled input it keeps, so a gradient
  that routed each window by equality with the forward's output lost windows (3-9% of a step's
  stem update, on 1 and 8 devices). The gradient equals XLA's own select-and-scatter's."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 8)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, size=(8,)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(4, 17, 17, 8)), jnp.float32)

  def stem_grad():
    def pooled(x, scale):
      mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
      y = jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + 0.1)
      return jnp.sum(ops.pool2d(y, 3, 2, 1, ceil_mode=True, mode='max') * grad)
    return jax.jit(jax.grad(pooled, argnums=(0, 1)))(x, scale)

  ours = stem_grad()
  monkeypatch.setattr(ops, '_MAX_POOL_OFFSETS', 0)   # every window through XLA's gradient
  xla = stem_grad()
  for a, b in zip(ours, xla):
    # Measured: 1e-6 of the largest entry (the sums of up to 4 overlapping windows' gradients
    # taken in another order); routing by equality with the forward's output was off by 1e-1.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))


def test_max_pool_gradient_gives_ties_to_the_first_maximum():
  # After a ReLU whole windows are 0: PyTorch (and XLA's select-and-scatter) send each window's
  # gradient to its first maximum in row-major order, not split among the ties.
  rng = np.random.default_rng(6)
  x = np.maximum(rng.normal(size=(2, 9, 10, 3)), 0.0)
  x[0, :5, :5, 0] = 0.0
  x[1, 2:6, 3:8, 1] = 0.5
  grad = rng.normal(size=np_pool(x, 3, 2, 1, True, 'max').shape)
  _, vjp = jax.vjp(lambda v: ops.pool2d(v, 3, 2, 1, ceil_mode=True, mode='max'),
                   jnp.asarray(x, jnp.float32))
  got, = vjp(jnp.asarray(grad, jnp.float32))
  np.testing.assert_allclose(got, np_max_pool_grad(x, grad, 3, 2, 1, True), rtol=1e-6, atol=1e-6)
