"""Tests of skd_jax.losses against independent float64 NumPy computations written here."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from np_reference import np_conv
from skd_jax import losses
from skd_jax.models.adapters import ChannelAdapter

RTOL = 1e-5


def _rng(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# NumPy references (float64), written independently of skd_jax.
# --------------------------------------------------------------------------------------------------


def np_resize_align_corners(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize with align_corners=True, four-corner form. x: [N, h, w, C]."""
  _, h, w, _ = x.shape
  ys = np.arange(out_h) * ((h - 1) / (out_h - 1) if out_h > 1 else 0.0)
  xs = np.arange(out_w) * ((w - 1) / (out_w - 1) if out_w > 1 else 0.0)
  y0 = np.minimum(np.floor(ys).astype(int), h - 1)
  x0 = np.minimum(np.floor(xs).astype(int), w - 1)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
  top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
  bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
  return top * (1 - fy) + bottom * fy


def np_log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits, labels, ignore_label=255, ohem=False, thresh=0.7, min_kept=100000):
  """The reference code's CE / OhemCrossEntropy2d, ported line by line (argsort version)."""
  logits = np.asarray(logits, np.float64)
  n, h_out, w_out = labels.shape
  c = logits.shape[-1]
  up = np_resize_align_corners(logits, h_out, w_out)
  input_label = labels.ravel().astype(np.int64)
  logp = np_log_softmax(up.reshape(-1, c))
  prob = np.exp(logp)
  valid_flag = input_label != ignore_label
  valid_inds = np.where(valid_flag)[0]
  label = input_label[valid_flag]
  num_valid = valid_flag.sum()
  if ohem:
    if min_kept >= num_valid:
      pass
    elif num_valid > 0:
      pred = prob[valid_flag][np.arange(len(label)), label]
      threshold = thresh
      if min_kept > 0:
        index = pred.argsort()
        threshold_index = index[min(len(index), min_kept) - 1]
        if pred[threshold_index] > thresh:
          threshold = pred[threshold_index]
      valid_inds = valid_inds[pred <= threshold]
  if len(valid_inds) == 0:
    return 0.0
  return float(-logp[valid_inds, input_label[valid_inds]].mean())


def np_soft_ce(zs, zt, temperature):
  """Per-batch sum of -p_T log p_S: returns (sum, teacher entropy sum)."""
  log_ps = np_log_softmax(np.asarray(zs, np.float64) / temperature)
  log_pt = np_log_softmax(np.asarray(zt, np.float64) / temperature)
  pt = np.exp(log_pt)
  return -(pt * log_ps).sum(), -(pt * log_pt).sum()


def np_pool_bruteforce(f: np.ndarray, kh: int, kw: int, mode: str) -> np.ndarray:
  """Kernel = stride, ceil mode, no padding: windows clipped to the map. f: [N, H, W, C]."""
  n, h, w, c = f.shape
  oh, ow = math.ceil(h / kh), math.ceil(w / kw)
  out = np.zeros((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      win = f[:, i * kh:min((i + 1) * kh, h), j * kw:min((j + 1) * kw, w)]
      out[:, i, j] = win.max(axis=(1, 2)) if mode == 'max' else win.mean(axis=(1, 2))
  return out


def np_normalise(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  norm = np.sqrt((nodes**2).sum(-1, keepdims=True)) + 1e-8
  return nodes / norm, norm


def np_similarity(nodes: np.ndarray) -> np.ndarray:
  """[N, h, w, C] -> explicit [N, M, M] similarity matrices."""
  s, _ = np_normalise(nodes.reshape(nodes.shape[0], -1, nodes.shape[-1]))
  return np.einsum('nic,njc->nij', s, s)


def np_pair_global(s_nodes, t_nodes) -> float:
  n, h, w, _ = s_nodes.shape
  m = h * w
  return float(((np_similarity(t_nodes) - np_similarity(s_nodes))**2).sum() / m**2 / n)


def np_chebyshev_mask(h: int, w: int, radius: int) -> np.ndarray:
  """[M, M] mask of node pairs at Chebyshev distance <= radius, by looping over the pairs."""
  mask = np.zeros((h * w, h * w))
  for (yi, xi), (yj, xj) in itertools.product(itertools.product(range(h), range(w)), repeat=2):
    if max(abs(yi - yj), abs(xi - xj)) <= radius:
      mask[yi * w + xi, yj * w + xj] = 1.0
  return mask


def np_pair_local(s_nodes, t_nodes, radius) -> float:
  n, h, w, _ = s_nodes.shape
  mask = np_chebyshev_mask(h, w, radius)
  diff = (np_similarity(t_nodes) - np_similarity(s_nodes))**2
  return float((diff * mask).sum() / mask.sum() / n)


def np_pair_grad_detached(s_nodes, t_nodes, mask=None) -> np.ndarray:
  """Closed-form d loss / d f_S when the norm is a constant c: -4 (D * mask) S / (P N) / c."""
  n, h, w, c = s_nodes.shape
  m = h * w
  mask = np.ones((m, m)) if mask is None else mask
  s, norm = np_normalise(s_nodes.reshape(n, m, c))
  d = (np_similarity(t_nodes) - np_similarity(s_nodes)) * mask
  grad = -4.0 * np.einsum('nij,njc->nic', d, s) / (mask.sum() * n) / norm
  return grad.reshape(s_nodes.shape)


def np_pair_full(f_s: np.ndarray, f_t: np.ndarray) -> float:
  """Global pair-wise loss without pooling, everything differentiable (for finite differences)."""
  return np_pair_global(f_s, f_t)


def np_finite_diff(fn, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    grad[idx] = (fn(xp) - fn(xm)) / (2 * eps)
  return grad


def assert_grad_close(actual, expected, rtol=1e-4):
  """Elementwise, with an absolute floor scaled to the gradient's magnitude."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# --------------------------------------------------------------------------------------------------
# Cross-entropy.
# --------------------------------------------------------------------------------------------------


def _ce_inputs(seed, n=2, h=4, w=5, c=3, out=(8, 10), ignore_frac=0.2, scale=3.0):
  rng = _rng(seed)
  logits = (scale * rng.standard_normal((n, h, w, c))).astype(np.float32)
  labels = rng.integers(0, c, (n,) + out)
  labels[rng.random(labels.shape) < ignore_frac] = 255
  return logits, labels


def test_cross_entropy_matches_numpy_with_upsampling_and_ignore():
  logits, labels = _ce_inputs(0)
  got = losses.cross_entropy(logits, labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_cross_entropy(logits, labels), rtol=RTOL)
  # Ignored pixels really are excluded: relabelling them changes nothing only if they are masked.
  np.testing.assert_allclose(losses.cross_entropy(logits, np.where(labels == 255, 7, labels),
                                                  ignore_label=7), got, rtol=RTOL)


def test_cross_entropy_same_size_and_custom_ignore_label():
  logits, labels = _ce_inputs(1, out=(4, 5))
  labels = np.where(labels == 255, -1, labels)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, ignore_label=-1),
                             np_cross_entropy(logits, labels, ignore_label=-1), rtol=RTOL)


def test_cross_entropy_all_ignored_is_zero_with_finite_gradient():
  logits, labels = _ce_inputs(2)
  labels[:] = 255
  value, grad = jax.value_and_grad(losses.cross_entropy)(jnp.asarray(logits), labels)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize('min_kept,branch', [
    (0, 'thresh'),  # no minimum: threshold = ohem_thresh.
    (10, 'thresh'),  # the 10th smallest prob is below 0.7: threshold stays 0.7.
    (110, 'raised'),  # the 110th smallest prob is above 0.7: threshold raised to it.
    (150, 'all'),  # fewer valid pixels than min_kept (but more pixels): keep all (traced branch).
    (1000, 'all'),  # more than the pixel count: keep all (static branch).
])
def test_ohem_matches_numpy_reference(min_kept, branch):
  logits, labels = _ce_inputs(3)
  # Establish which branch of the reference this case exercises, so the test cannot go vacuous.
  up = np_resize_align_corners(logits.astype(np.float64), 8, 10).reshape(-1, 3)
  lab = labels.ravel()
  valid = lab != 255
  pred = np.exp(np_log_softmax(up))[valid][np.arange(valid.sum()), lab[valid]]
  if branch == 'all':
    assert valid.sum() <= min_kept
  elif min_kept > 0:
    kth = np.sort(pred)[min_kept - 1]
    assert (kth > 0.7) == (branch == 'raised'), kth
    assert 0 < (pred <= max(kth, 0.7)).sum() < valid.sum()
  want = np_cross_entropy(logits, labels, ohem=True, thresh=0.7, min_kept=min_kept)
  fn = jax.jit(functools.partial(losses.cross_entropy, ohem=True, ohem_thresh=0.7,
                                 ohem_min_kept=min_kept))
  np.testing.assert_allclose(fn(logits, labels), want, rtol=RTOL)
  if branch != 'all':
    assert abs(want - np_cross_entropy(logits, labels)) > 1e-3  # OHEM changed the loss.


def test_ohem_all_ignored_is_zero():
  logits, labels = _ce_inputs(4)
  labels[:] = 255
  assert float(losses.cross_entropy(logits, labels, ohem=True, ohem_min_kept=5)) == 0.0


# --------------------------------------------------------------------------------------------------
# Pixel-wise distillation.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_pixel_wise_matches_numpy(temperature):
  rng = _rng(10)
  zs, zt = (rng.standard_normal((3, 4, 5, 6)).astype(np.float32) * 2 for _ in range(2))
  soft_ce, ent = np_soft_ce(zs, zt, temperature)
  t2 = temperature**2
  np.testing.assert_allclose(losses.pixel_wise_loss(zs, zt, temperature=temperature),
                             soft_ce / (4 * 5) * t2, rtol=RTOL)
  np.testing.assert_allclose(
      losses.pixel_wise_loss(zs, zt, temperature=temperature, reduction='mean'),
      soft_ce / (3 * 4 * 5) * t2, rtol=RTOL)
  np.testing.assert_allclose(losses.pixel_wise_kl(zs, zt, temperature=temperature),
                             (soft_ce - ent) / (3 * 4 * 5) * t2, rtol=RTOL)


def test_pixel_wise_batch_sum_scaling():
  rng = _rng(11)
  zs, zt = (rng.standard_normal((3, 4, 5, 6)).astype(np.float32) for _ in range(2))
  per_image = [float(losses.pixel_wise_loss(zs[i:i + 1], zt[i:i + 1])) for i in range(3)]
  # batch_sum is the sum of the per-image losses; mean is their average.
  np.testing.assert_allclose(losses.pixel_wise_loss(zs, zt), sum(per_image), rtol=RTOL)
  np.testing.assert_allclose(losses.pixel_wise_loss(zs, zt, reduction='mean'),
                             sum(per_image) / 3, rtol=RTOL)
  # The same image three times: 3x the N=1 value with batch_sum, equal to it with mean.
  rep_s, rep_t = np.repeat(zs[:1], 3, 0), np.repeat(zt[:1], 3, 0)
  np.testing.assert_allclose(losses.pixel_wise_loss(rep_s, rep_t), 3 * per_image[0], rtol=RTOL)
  np.testing.assert_allclose(losses.pixel_wise_loss(rep_s, rep_t, reduction='mean'),
                             per_image[0], rtol=RTOL)
  np.testing.assert_allclose(per_image[0], np_soft_ce(zs[:1], zt[:1], 1.0)[0] / 20, rtol=RTOL)


def test_pixel_wise_kl_zero_for_equal_logits_and_same_gradient_as_soft_ce():
  rng = _rng(12)
  zs, zt = (jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32) for _ in range(2))
  assert abs(float(losses.pixel_wise_kl(zt, zt))) < 1e-6
  assert abs(float(losses.pixel_wise_kl(zt, zt, temperature=3.0))) < 1e-6
  g_kl = jax.grad(losses.pixel_wise_kl)(zs, zt)
  g_ce = jax.grad(functools.partial(losses.pixel_wise_loss, reduction='mean'))(zs, zt)
  # Closed form: d/dz_S of the per-pixel mean = (p_S - p_T) / (N h w).
  p = lambda z: np.exp(np_log_softmax(np.asarray(z, np.float64)))
  want = (p(zs) - p(zt)) / (2 * 3 * 4)
  assert_grad_close(g_kl, want)
  assert_grad_close(g_ce, want)


def test_teacher_inputs_get_no_gradient():
  rng = _rng(13)
  zs, zt = (jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32) for _ in range(2))
  for fn in (losses.pixel_wise_loss, losses.pixel_wise_kl):
    assert np.all(np.asarray(jax.jit(jax.grad(fn, argnums=1))(zs, zt)) == 0.0)
  fs = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32)
  ft = jnp.asarray(rng.standard_normal((2, 4, 4, 5)), jnp.float32)
  for kw in (dict(detach_norm=True), dict(detach_norm=False), dict(alpha=9, pool_kernel=1)):
    g = jax.jit(jax.grad(functools.partial(losses.pair_wise_loss, **kw), argnums=1))(fs, ft)
    assert np.all(np.asarray(g) == 0.0)


# --------------------------------------------------------------------------------------------------
# Pair-wise distillation.
# --------------------------------------------------------------------------------------------------


def test_nodes_reference_max_pool_65_to_3x3():
  rng = _rng(20)
  f = rng.standard_normal((2, 65, 65, 3)).astype(np.float32)
  nodes = losses.pair_wise_nodes(f)  # pool_scale 0.5: a 32x32 kernel, ceil mode.
  assert nodes.shape == (2, 3, 3, 3)
  np.testing.assert_allclose(nodes, np_pool_bruteforce(f, 32, 32, 'max'), rtol=RTOL)
  g = rng.standard_normal((2, 65, 65, 4)).astype(np.float32)
  np.testing.assert_allclose(
      losses.pair_wise_loss(f, g),
      np_pair_global(np_pool_bruteforce(f, 32, 32, 'max'), np_pool_bruteforce(g, 32, 32, 'max')),
      rtol=RTOL)


def test_nodes_avg_pool_and_non_square_scale():
  rng = _rng(21)
  f = rng.standard_normal((1, 13, 22, 3)).astype(np.float32)
  g = rng.standard_normal((1, 13, 22, 2)).astype(np.float32)
  # int(0.3 * 13) = 3, int(0.3 * 22) = 6: 5x4 nodes, the last row and column clipped.
  want_s, want_t = np_pool_bruteforce(f, 3, 6, 'avg'), np_pool_bruteforce(g, 3, 6, 'avg')
  assert want_s.shape == (1, 5, 4, 3)
  np.testing.assert_allclose(losses.pair_wise_nodes(f, pool='avg', pool_scale=0.3), want_s,
                             rtol=RTOL)
  np.testing.assert_allclose(losses.pair_wise_loss(f, g, pool='avg', pool_scale=0.3),
                             np_pair_global(want_s, want_t), rtol=RTOL)


@pytest.mark.parametrize('kernel,shape', [(2, (4, 5)), ((2, 3), (4, 3))])
def test_nodes_fixed_kernel_on_odd_size(kernel, shape):
  rng = _rng(22)
  f = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
  g = rng.standard_normal((2, 7, 9, 6)).astype(np.float32)
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  want_s, want_t = np_pool_bruteforce(f, kh, kw, 'max'), np_pool_bruteforce(g, kh, kw, 'max')
  assert want_s.shape[1:3] == shape
  np.testing.assert_allclose(losses.pair_wise_nodes(f, pool_kernel=kernel), want_s, rtol=RTOL)
  np.testing.assert_allclose(losses.pair_wise_loss(f, g, pool_kernel=kernel, pool_scale=0.01),
                             np_pair_global(want_s, want_t), rtol=RTOL)


def test_pair_wise_zero_for_equal_features():
  rng = _rng(23)
  f = rng.standard_normal((2, 9, 9, 5)).astype(np.float32)
  for kw in (dict(), dict(pool='avg'), dict(pool_kernel=1), dict(pool_kernel=1, alpha=9),
             dict(pool_kernel=2, detach_norm=False)):
    loss = jax.jit(functools.partial(losses.pair_wise_loss, **kw))
    assert abs(float(loss(f, f))) < 1e-6, kw
  # Different teacher: clearly non-zero, so the check above is not vacuous.
  assert float(losses.pair_wise_loss(f, f[..., ::-1] ** 2, pool_kernel=1)) > 1e-3


def _explicit_mxm_loss(fs, ft, detach_norm=True):
  """The explicit M x M form in plain jnp (independent of the Gram form), no pooling."""
  def sim(f, detach):
    f = f.reshape(f.shape[0], -1, f.shape[-1])
    norm = jnp.sqrt(jnp.sum(f**2, -1, keepdims=True)) + 1e-8
    f = f / (jax.lax.stop_gradient(norm) if detach else norm)
    return jnp.einsum('nic,njc->nij', f, f, precision=jax.lax.Precision.HIGHEST)
  a_s, a_t = sim(fs, detach_norm), sim(jax.lax.stop_gradient(ft), True)
  m = a_s.shape[1]
  return jnp.sum((a_t - a_s)**2) / m**2 / fs.shape[0]


@pytest.mark.parametrize('detach_norm', [True, False])
def test_gram_form_equals_explicit_mxm_value_and_gradient(detach_norm):
  rng = _rng(24)
  fs = jnp.asarray(rng.standard_normal((2, 6, 7, 8)), jnp.float32)
  ft = jnp.asarray(rng.standard_normal((2, 6, 7, 16)), jnp.float32)
  gram = functools.partial(losses.pair_wise_loss, pool_kernel=1, detach_norm=detach_norm)
  explicit = functools.partial(_explicit_mxm_loss, detach_norm=detach_norm)
  v_gram, g_gram = jax.jit(jax.value_and_grad(gram))(fs, ft)
  v_exp, g_exp = jax.jit(jax.value_and_grad(explicit))(fs, ft)
  np.testing.assert_allclose(v_gram, v_exp, rtol=1e-5)
  np.testing.assert_allclose(v_gram, np_pair_global(np.asarray(fs, np.float64),
                                                    np.asarray(ft, np.float64)), rtol=1e-5)
  assert_grad_close(g_gram, g_exp, rtol=1e-5)


def test_detached_norm_gradient_is_the_constant_norm_derivative():
  rng = _rng(25)
  fs = rng.standard_normal((2, 3, 3, 4))
  ft = rng.standard_normal((2, 3, 3, 6))
  fs32, ft32 = jnp.asarray(fs, jnp.float32), jnp.asarray(ft, jnp.float32)
  g_detached = jax.jit(jax.grad(functools.partial(losses.pair_wise_loss, pool_kernel=1)))(
      fs32, ft32)
  g_full = jax.jit(jax.grad(functools.partial(losses.pair_wise_loss, pool_kernel=1,
                                              detach_norm=False)))(fs32, ft32)
  closed_form = np_pair_grad_detached(fs, ft)
  finite_diff = np_finite_diff(lambda x: np_pair_full(x, ft), fs)
  assert_grad_close(g_detached, closed_form)
  assert_grad_close(g_full, finite_diff, rtol=1e-4)
  # The two really are different functions' gradients.
  assert np.abs(closed_form - finite_diff).max() > 0.1 * np.abs(finite_diff).max()


@pytest.mark.parametrize('pool', ['max', 'avg'])
def test_gradient_through_pooling(pool):
  rng = _rng(29)
  f = rng.standard_normal((2, 7, 9, 3))
  g = rng.standard_normal((2, 7, 9, 4))
  kh, kw = 3, 4  # 3x3 nodes; the last row and column of windows are clipped.
  s_nodes, t_nodes = np_pool_bruteforce(f, kh, kw, pool), np_pool_bruteforce(g, kh, kw, pool)
  node_grad = np_pair_grad_detached(s_nodes, t_nodes)
  # Max routes each node's gradient to its window's (unique) argmax; avg spreads it evenly.
  want = np.zeros_like(f)
  for n, i, j, c in np.ndindex(node_grad.shape):
    ys, xs = slice(i * kh, min((i + 1) * kh, 7)), slice(j * kw, min((j + 1) * kw, 9))
    win = f[n, ys, xs, c]
    if pool == 'max':
      y, x = np.unravel_index(win.argmax(), win.shape)
      want[n, ys.start + y, xs.start + x, c] += node_grad[n, i, j, c]
    else:
      want[n, ys, xs, c] += node_grad[n, i, j, c] / win.size
  fn = functools.partial(losses.pair_wise_loss, pool=pool, pool_kernel=(kh, kw))
  value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(f, jnp.float32),
                                                 jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(value, np_pair_global(s_nodes, t_nodes), rtol=RTOL)
  assert_grad_close(grad, want)


def test_zero_node_does_not_give_nan_gradient():
  rng = _rng(26)
  fs = rng.standard_normal((1, 3, 3, 4)).astype(np.float32)
  fs[0, 1, 1] = 0.0
  ft = rng.standard_normal((1, 3, 3, 5)).astype(np.float32)
  for detach in (True, False):
    fn = functools.partial(losses.pair_wise_loss, pool_kernel=1, detach_norm=detach)
    g = jax.jit(jax.grad(fn))(jnp.asarray(fs), jnp.asarray(ft))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize('shape,alpha', [((5, 6), 1), ((5, 6), 9), ((4, 7), 25), ((3, 3), 25)])
def test_local_graph_matches_bruteforce(shape, alpha):
  rng = _rng(27)
  h, w = shape
  fs = rng.standard_normal((2, h, w, 3))
  ft = rng.standard_normal((2, h, w, 5))
  radius = (int(round(math.sqrt(alpha))) - 1) // 2
  fn = functools.partial(losses.pair_wise_loss, pool_kernel=1, alpha=alpha)
  value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(fs, jnp.float32),
                                                 jnp.asarray(ft, jnp.float32))
  if alpha == 1:
    # Each node related to itself only: a_ii ~ 1 in both graphs, so the loss and gradient ~ 0.
    assert abs(float(value)) < 1e-12 and np.abs(np.asarray(grad)).max() < 1e-6
    return
  np.testing.assert_allclose(value, np_pair_local(fs, ft, radius), rtol=RTOL)
  assert_grad_close(grad, np_pair_grad_detached(fs, ft, np_chebyshev_mask(h, w, radius)))
  if shape != (3, 3):
    assert abs(float(value) - np_pair_global(fs, ft)) > 1e-4  # Local differs from global...
  else:
    np.testing.assert_allclose(value, np_pair_global(fs, ft), rtol=RTOL)  # ...unless it covers.


def test_local_graph_after_reference_pooling():
  rng = _rng(28)
  f = rng.standard_normal((1, 33, 33, 3)).astype(np.float32)
  g = rng.standard_normal((1, 33, 33, 4)).astype(np.float32)
  # int(0.2 * 33) = 6: a 6x6 grid of nodes, local 3x3 neighbourhoods.
  s, t = np_pool_bruteforce(f, 6, 6, 'max'), np_pool_bruteforce(g, 6, 6, 'max')
  np.testing.assert_allclose(losses.pair_wise_loss(f, g, pool_scale=0.2, alpha=9),
                             np_pair_local(s, t, 1), rtol=RTOL)


# --------------------------------------------------------------------------------------------------
# Holistic distillation.
# --------------------------------------------------------------------------------------------------


def test_critic_and_generator_losses_match_numpy():
  rng = _rng(30)
  real, fake = rng.standard_normal((4, 1)) * 2, rng.standard_normal((4, 1)) * 2
  np.testing.assert_allclose(losses.critic_loss(real, fake), fake.mean() - real.mean(), rtol=RTOL)
  np.testing.assert_allclose(losses.generator_loss(fake), -fake.mean(), rtol=RTOL)
  np.testing.assert_allclose(losses.hinge_critic_loss(real, fake),
                             np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean(),
                             rtol=RTOL)
  np.testing.assert_allclose(losses.hinge_generator_loss(fake), -fake.mean(), rtol=RTOL)


def _linear_critic(w, b):
  return lambda x: jnp.einsum('nhwc,hwc->n', x, w) + b


def test_gradient_penalty_of_linear_critic_is_closed_form():
  rng = _rng(31)
  w = jnp.asarray(rng.standard_normal((3, 4, 5)) * 0.3, jnp.float32)
  real = rng.standard_normal((4, 3, 4, 5)).astype(np.float32)
  fake = rng.standard_normal((4, 3, 4, 5)).astype(np.float32)
  norm = float(np.linalg.norm(np.asarray(w, np.float64)))
  for seed in range(2):
    gp = losses.gradient_penalty(_linear_critic(w, 0.7), real, fake, jax.random.key(seed))
    np.testing.assert_allclose(gp, (norm - 1)**2, rtol=RTOL)
  # Double backpropagation to the critic's parameters: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w/||w||.
  grad_w = jax.grad(lambda w: losses.gradient_penalty(_linear_critic(w, 0.0), real, fake,
                                                      jax.random.key(0)))(w)
  assert_grad_close(grad_w, 2 * (norm - 1) * np.asarray(w, np.float64) / norm)


def test_gradient_penalty_nonlinear_critic_matches_numpy():
  rng = _rng(32)
  w = rng.standard_normal((3, 4, 2))
  x = rng.standard_normal((5, 3, 4, 2))
  # real == fake, so x_hat == x whatever the interpolation weights; scores shaped [N, 1].
  critic = lambda z: jnp.einsum('nhwc,hwc->n', jnp.tanh(z), jnp.asarray(w, jnp.float32))[:, None]
  grads = w[None] * (1 - np.tanh(x)**2)
  want = ((np.sqrt((grads**2).sum(axis=(1, 2, 3))) - 1)**2).mean()
  gp, aux = losses.gradient_penalty(lambda z: (critic(z), 'state'), x, x, jax.random.key(1),
                                    has_aux=True)
  np.testing.assert_allclose(gp, want, rtol=RTOL)
  assert aux == 'state'


def test_gradient_penalty_interpolates_per_sample():
  # D(x) = <w, x>^2 / 2 has grad <w, x> w: its norm depends on where x_hat lies. The critic hands
  # x_hat back as aux, so the interpolation weights can be read off and the value recomputed.
  rng = _rng(33)
  w = rng.standard_normal((2, 2, 3))
  real, fake = rng.standard_normal((6, 2, 2, 3)), rng.standard_normal((6, 2, 2, 3))
  critic = lambda z: (0.5 * jnp.einsum('nhwc,hwc->n', z, jnp.asarray(w, jnp.float32))**2, z)
  gp, x_hat = losses.gradient_penalty(critic, real, fake, jax.random.key(5), has_aux=True)
  x_hat = np.asarray(x_hat, np.float64)
  a = (x_hat - fake) / (real - fake)  # [N, 2, 2, 3]
  a_n = a.reshape(6, -1).mean(1)
  np.testing.assert_allclose(a, np.broadcast_to(a_n[:, None, None, None], a.shape), atol=1e-4)
  assert np.all((a_n >= 0) & (a_n <= 1))
  assert np.ptp(a_n) > 0.1  # One weight per sample, not one for the batch.
  x_hat = a_n[:, None, None, None] * real + (1 - a_n[:, None, None, None]) * fake
  norms = np.abs(np.einsum('nhwc,hwc->n', x_hat, w)) * np.linalg.norm(w)
  np.testing.assert_allclose(gp, ((norms - 1)**2).mean(), rtol=1e-4)


def test_gradient_penalty_zero_gradient_is_finite():
  x = np.ones((2, 3, 3, 2), np.float32)
  w = jnp.zeros((3, 3, 2))
  fn = lambda w: losses.gradient_penalty(_linear_critic(w, 0.0), x, 2 * x, jax.random.key(0))
  value, grad = jax.value_and_grad(fn)(w)
  assert float(value) == 1.0
  assert np.all(np.isfinite(np.asarray(grad)))


# --------------------------------------------------------------------------------------------------
# The methods SKD is compared with: logit KD, CWD (and its adapter), DIST.
# --------------------------------------------------------------------------------------------------


def np_softmax(x: np.ndarray) -> np.ndarray:
  return np.exp(np_log_softmax(np.asarray(x, np.float64)))


def np_logit_kd(zs, zt, temperature):
  """Mean over the pixel rows of KL(p_T || p_S), times T^2, one pixel at a time."""
  c = zs.shape[-1]
  rows_s, rows_t = zs.reshape(-1, c) / temperature, zt.reshape(-1, c) / temperature
  total = 0.0
  for s, t in zip(rows_s, rows_t):
    log_ps = s - s.max() - math.log(np.exp(s - s.max()).sum())
    log_pt = t - t.max() - math.log(np.exp(t - t.max()).sum())
    total += (np.exp(log_pt) * (log_pt - log_ps)).sum()
  return total / len(rows_s) * temperature**2


def np_logit_kd_grad(zs, zt, temperature):
  """Closed form of the gradient of T^2 * mean_P KL(p_T || p_S): T (p_S - p_T) / P."""
  pixels = zs.size // zs.shape[-1]
  return temperature * (np_softmax(zs / temperature) - np_softmax(zt / temperature)) / pixels


def np_cwd(fs, ft, temperature, divisor=None):
  """CWD one (image, channel) at a time: KL over the H*W positions, / (N * C'), times T^2."""
  n, _, _, c = fs.shape
  total = 0.0
  for i, k in itertools.product(range(n), range(c)):
    ps = np_softmax(fs[i, :, :, k].ravel() / temperature)
    pt = np_softmax(ft[i, :, :, k].ravel() / temperature)
    total += (pt * np.log(pt / ps)).sum()
  return total / (n * (divisor or c)) * temperature**2


def np_cwd_grad(fs, ft, temperature, divisor=None):
  """Closed form: T (phi_S - phi_T) / (N * C'), phi the softmax over the positions."""
  n, h, w, c = fs.shape
  phi = lambda f: np_softmax(f.reshape(n, h * w, c).transpose(0, 2, 1) / temperature)
  grad = temperature * (phi(fs) - phi(ft)) / (n * (divisor or c))
  return grad.transpose(0, 2, 1).reshape(fs.shape)


def np_dist(zs, zt, temperature=1.0, groups=1):
  """(inter, intra) with np.corrcoef (no epsilon), one vector pair at a time, per image group."""
  c = zs.shape[-1]
  ys = np_softmax(zs / temperature).reshape(groups, -1, c)
  yt = np_softmax(zt / temperature).reshape(groups, -1, c)
  corr = lambda u, v: np.corrcoef(u, v)[0, 1]
  inter = np.mean([corr(s, t) for g in range(groups) for s, t in zip(ys[g], yt[g])])
  intra = np.mean([corr(ys[g, :, k], yt[g, :, k]) for g in range(groups) for k in range(c)])
  return (1 - inter) * temperature**2, (1 - intra) * temperature**2


def _pair_inputs(seed, shape, scale=1.0):
  rng = _rng(seed)
  return tuple((scale * rng.standard_normal(shape)).astype(np.float32) for _ in range(2))


# Gradient tolerance of `assert_grad_close` (rtol * (|expected| + max |expected|)): float32 JAX
# against float64 NumPy. The largest error measured on these inputs, as a fraction of the largest
# gradient entry, is 3e-7 (KD), 2.5e-7 (CWD), 4.2e-7 (DIST against a float64 central difference)
# and 5e-7 (the adapter's kernel); 1e-5 leaves a 20x margin.
GRAD_RTOL = 1e-5


@pytest.mark.parametrize('temperature', [1.0, 3.0])
def test_logit_kd_matches_numpy_value_and_gradient(temperature):
  zs, zt = _pair_inputs(50, (2, 3, 4, 5), scale=2.0)
  value, grad = jax.value_and_grad(losses.logit_kd)(jnp.asarray(zs), zt, temperature=temperature)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, np_logit_kd(zs, zt, temperature), rtol=RTOL)
  assert_grad_close(grad, np_logit_kd_grad(zs, zt, temperature), rtol=GRAD_RTOL)


def test_logit_kd_closed_forms():
  zs, zt = _pair_inputs(51, (2, 3, 4, 2), scale=2.0)
  assert abs(float(losses.logit_kd(zt, zt, temperature=2.0))) < 1e-6
  # Uniform teacher, two classes: KL(u || softmax((a, b) / T)) = log cosh((a - b) / 2T).
  uniform = np.full_like(zt, 0.7)
  for t in (1.0, 2.5):
    want = t**2 * np.log(np.cosh((zs[..., 0] - zs[..., 1]) / (2 * t))).mean()
    np.testing.assert_allclose(losses.logit_kd(zs, uniform, temperature=t), want, rtol=RTOL)


@pytest.mark.parametrize('temperature,divisor', [(1.0, None), (4.0, None), (4.0, 3)])
def test_channel_wise_matches_numpy_value_and_gradient(temperature, divisor):
  fs, ft = _pair_inputs(52, (2, 3, 4, 5), scale=3.0)
  fn = functools.partial(losses.channel_wise_loss, temperature=temperature,
                         channel_divisor=divisor)
  value, grad = jax.value_and_grad(fn)(jnp.asarray(fs), ft)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, np_cwd(fs, ft, temperature, divisor), rtol=RTOL)
  assert_grad_close(grad, np_cwd_grad(fs, ft, temperature, divisor), rtol=GRAD_RTOL)


def test_channel_wise_closed_forms():
  fs, ft = _pair_inputs(53, (3, 1, 2, 4), scale=3.0)
  assert abs(float(losses.channel_wise_loss(ft, ft))) < 1e-6
  # A teacher constant over the H*W = 2 positions of every channel: for each (n, c),
  # KL(u || softmax((x0, x1) / T)) = log cosh((x0 - x1) / 2T); the loss is their sum / (N * C').
  flat = np.broadcast_to(ft[:, :1, :1], ft.shape)
  kl = np.log(np.cosh((fs[:, 0, 0] - fs[:, 0, 1]) / (2 * 4.0)))
  np.testing.assert_allclose(losses.channel_wise_loss(fs, flat), 16 * kl.sum() / (3 * 4),
                             rtol=RTOL)
  # CIRKD's divisor: the student's 2 channels before an adapter to these 4 doubles the loss.
  np.testing.assert_allclose(losses.channel_wise_loss(fs, flat, channel_divisor=2),
                             16 * kl.sum() / (3 * 2), rtol=RTOL)


def test_channel_adapter_init_forward_and_cwd_gradient():
  cs, ct = 48, 32
  rng = _rng(54)
  x = rng.standard_normal((2, 3, 4, cs)).astype(np.float32)
  adapter = ChannelAdapter(ct)
  variables = adapter.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {'params': {'conv': {'kernel': (1, 1, cs, ct)}}}
  kernel = np.asarray(variables['params']['conv']['kernel'], np.float64)
  # PyTorch's fresh Conv2d: U(-1/sqrt(Cs), 1/sqrt(Cs)), standard deviation bound / sqrt(3).
  bound = 1 / math.sqrt(cs)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05)
  y = adapter.apply(variables, x)
  np.testing.assert_allclose(y, np_conv(x.astype(np.float64), kernel), rtol=1e-5, atol=1e-5)
  # CWD on features through the adapter, CIRKD's divisor (the student's Cs): the kernel's gradient
  # is the chain rule x^T dL/dy with the closed-form dL/dy.
  ft = rng.standard_normal((2, 3, 4, ct)).astype(np.float32)

  def loss(params):
    return losses.channel_wise_loss(adapter.apply({'params': params}, x), ft, channel_divisor=cs)

  value, grads = jax.value_and_grad(loss)(variables['params'])
  y64 = np_conv(x.astype(np.float64), kernel)
  np.testing.assert_allclose(value, np_cwd(y64, ft, 4.0, cs), rtol=RTOL)
  dy = np_cwd_grad(y64, ft, 4.0, cs)
  want = np.einsum('nhwi,nhwo->io', x.astype(np.float64), dy)[None, None]
  assert_grad_close(grads['conv']['kernel'], want, rtol=GRAD_RTOL)


@pytest.mark.parametrize('temperature,groups', [(1.0, 1), (2.0, 1), (1.0, 2)])
def test_dist_matches_numpy_value_and_gradient(temperature, groups):
  zs, zt = _pair_inputs(55, (2, 2, 3, 4), scale=2.0)
  fn = jax.jit(functools.partial(losses.dist_relations, temperature=temperature, groups=groups))
  inter, intra = fn(zs, zt)
  want_inter, want_intra = np_dist(zs, zt, temperature, groups)
  assert inter.dtype == intra.dtype == jnp.float32
  np.testing.assert_allclose((inter, intra), (want_inter, want_intra), rtol=RTOL)
  beta, gamma = 0.5, 2.0
  total = functools.partial(losses.dist_loss, beta=beta, gamma=gamma, temperature=temperature,
                            groups=groups)
  np.testing.assert_allclose(total(zs, zt), beta * want_inter + gamma * want_intra, rtol=RTOL)
  grad = jax.jit(jax.grad(total))(zs, zt)
  zs64 = zs.astype(np.float64)
  want_grad = np_finite_diff(
      lambda z: np.dot((beta, gamma), np_dist(z, zt, temperature, groups)), zs64)
  assert_grad_close(grad, want_grad, rtol=GRAD_RTOL)


def test_dist_groups_change_only_the_intra_class_term():
  zs, noise = _pair_inputs(56, (4, 2, 3, 4), scale=2.0)
  zt = zs + noise / 2  # a teacher the student resembles: the correlations are near 0.75.
  inter1, intra1 = losses.dist_relations(zs, zt)
  inter4, intra4 = losses.dist_relations(zs, zt, groups=4)
  np.testing.assert_allclose(inter4, inter1, rtol=RTOL)
  # Per-image groups give a different intra-class term (0.267 against 0.250 over the batch), so
  # the grouping in the NumPy comparisons is not vacuous.
  assert abs(float(intra4) - float(intra1)) > 1e-2
  np.testing.assert_allclose((inter4, intra4), np_dist(zs, zt, groups=4), rtol=RTOL)


def test_dist_closed_forms():
  zs, zt = _pair_inputs(57, (2, 3, 4, 5), scale=2.0)
  # Student == teacher: every correlation is 1 up to the 1e-8 epsilon and float32 rounding
  # (measured: 2.4e-7 here, 1.7e-6 on other draws).
  for value in losses.dist_relations(zt, zt, temperature=2.0):
    assert abs(float(value)) < 1e-5
  # A uniform teacher has zero centred vectors: every correlation is 0, each term is T^2.
  uniform = np.zeros_like(zt)
  np.testing.assert_allclose(losses.dist_relations(zs, uniform, temperature=3.0), (9.0, 9.0),
                             rtol=RTOL)
  np.testing.assert_allclose(losses.dist_loss(zs, uniform, beta=0.3, gamma=2.0), 2.3, rtol=RTOL)
  # Two classes: a pixel's centred vector is +-(p - 1/2)(1, -1), so its correlation is the sign
  # of (s0 - s1)(t0 - t1); logits apart by >= 1 keep the epsilon's effect below 1e-6.
  rng = _rng(58)
  gap = rng.choice((-1.0, 1.0), (2, 3, 4)) * (1 + rng.random((2, 3, 4)))
  s = np.stack([gap, np.zeros_like(gap)], -1)
  flip = rng.random((2, 3, 4)) < 0.4
  t = np.where(flip[..., None], s[..., ::-1], 2 * s)
  inter, _ = losses.dist_relations(s, t)
  np.testing.assert_allclose(inter, 2 * flip.mean(), rtol=RTOL, atol=1e-6)
  assert 0 < flip.sum() < flip.size


def test_compared_methods_teacher_gets_no_gradient():
  zs, zt = (jnp.asarray(a) for a in _pair_inputs(59, (2, 3, 4, 5)))
  for fn in (losses.logit_kd, losses.channel_wise_loss, losses.dist_loss,
             functools.partial(losses.dist_loss, groups=2)):
    assert np.all(np.asarray(jax.jit(jax.grad(fn, argnums=1))(zs, zt)) == 0.0)


# --------------------------------------------------------------------------------------------------
# dtypes and errors.
# --------------------------------------------------------------------------------------------------


def test_bfloat16_inputs_give_float32_losses():
  rng = _rng(40)
  bf = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
  zs, zt, fs, ft = bf(2, 4, 5, 3), bf(2, 4, 5, 3), bf(2, 6, 6, 4), bf(2, 6, 6, 8)
  labels = rng.integers(0, 3, (2, 8, 10))
  f32 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
  real, fake = bf(3, 1), bf(3, 1)
  cases = [
      (losses.cross_entropy(zs, labels), np_cross_entropy(f32(zs), labels)),
      (losses.cross_entropy(zs, labels, ohem=True, ohem_min_kept=20),
       np_cross_entropy(f32(zs), labels, ohem=True, min_kept=20)),
      (losses.pixel_wise_loss(zs, zt), np_soft_ce(f32(zs), f32(zt), 1.0)[0] / 20),
      (losses.pixel_wise_kl(zs, zt), np.subtract(*np_soft_ce(f32(zs), f32(zt), 1.0)) / 40),
      (losses.pair_wise_loss(fs, ft, pool_kernel=1), np_pair_global(f32(fs), f32(ft))),
      (losses.pair_wise_loss(fs, ft, pool_kernel=1, alpha=9), np_pair_local(f32(fs), f32(ft), 1)),
      (losses.critic_loss(real, fake), f32(fake).mean() - f32(real).mean()),
      (losses.hinge_critic_loss(real, fake),
       np.maximum(1 - f32(real), 0).mean() + np.maximum(1 + f32(fake), 0).mean()),
      (losses.generator_loss(fake), -f32(fake).mean()),
      (losses.hinge_generator_loss(fake), -f32(fake).mean()),
      (losses.gradient_penalty(lambda x: jnp.sum(x, axis=(1, 2, 3)), zs, zt, jax.random.key(0)),
       (math.sqrt(60) - 1)**2),
      (losses.logit_kd(zs, zt, temperature=2.0), np_logit_kd(f32(zs), f32(zt), 2.0)),
      (losses.channel_wise_loss(zs, zt), np_cwd(f32(zs), f32(zt), 4.0)),
      (losses.dist_loss(zs, zt, groups=2), sum(np_dist(f32(zs), f32(zt), groups=2))),
  ]
  for i, (got, want) in enumerate(cases):
    assert got.dtype == jnp.float32, i
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=str(i))


@pytest.mark.parametrize('call,match', [
    (lambda: losses.cross_entropy(np.zeros((2, 4, 4, 3)), np.zeros((3, 8, 8), int)), 'batch'),
    (lambda: losses.cross_entropy(np.zeros((4, 4, 3)), np.zeros((1, 8, 8), int)), 'logits'),
    (lambda: losses.cross_entropy(np.zeros((1, 4, 4, 3)), np.zeros((1, 8, 8, 1), int)), 'labels'),
    (lambda: losses.pixel_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 4))),
     'same shape'),
    (lambda: losses.pixel_wise_kl(np.zeros((1, 4, 4, 3)), np.zeros((2, 4, 4, 3))), 'same shape'),
    (lambda: losses.pixel_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                    reduction='sum'), "reduction must be 'batch_sum' or 'mean'"),
    (lambda: losses.pixel_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                    temperature=0.0), 'temperature'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 5, 3))),
     'same N, H, W'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), pool='mean'),
     "pool must be 'max'"),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), alpha=8),
     r'alpha must be None .*1, 9, 25, 49, 81'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), alpha=4),
     'alpha'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), alpha=0),
     'alpha'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), alpha=9.0),
     'alpha'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                   pool_scale=0.1), 'pool_scale'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                   pool_kernel=0), 'pool_kernel'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                   pool_kernel=(2, 2, 2)), 'pool_kernel'),
    (lambda: losses.pair_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                   pool_kernel=5), 'larger than the feature map'),
    (lambda: losses.pair_wise_nodes(np.zeros((4, 4, 3))), 'feat'),
    (lambda: losses.gradient_penalty(lambda x: x.sum(), np.zeros((2, 3)), np.zeros((3, 3)),
                                     jax.random.key(0)), 'real and fake'),
    (lambda: losses.logit_kd(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 4))), 'same shape'),
    (lambda: losses.logit_kd(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), temperature=-1.0),
     'temperature'),
    (lambda: losses.channel_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 6))),
     'same shape.*ChannelAdapter'),
    (lambda: losses.channel_wise_loss(np.zeros((4, 4, 3)), np.zeros((4, 4, 3))), 'student_map'),
    (lambda: losses.channel_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                      temperature=0.0), 'temperature'),
    (lambda: losses.channel_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                      channel_divisor=0), 'channel_divisor'),
    (lambda: losses.channel_wise_loss(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)),
                                      channel_divisor=2.0), 'channel_divisor'),
    (lambda: losses.dist_loss(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 5, 3))), 'same shape'),
    (lambda: losses.dist_loss(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4, 3)), groups=3),
     'groups must be a positive int dividing the batch size 2'),
    (lambda: losses.dist_relations(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4, 3)), groups=0),
     'groups'),
    (lambda: losses.dist_relations(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4, 3)),
                                   temperature=0.0), 'temperature'),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
