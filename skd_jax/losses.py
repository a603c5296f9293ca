"""The losses of Structured Knowledge Distillation (Liu et al., CVPR 2019), as pure functions.

Every function takes NHWC arrays of any float dtype and computes in float32 (inputs are cast at
entry, so bfloat16 activations give float32 losses). Teacher inputs are constants: they pass
through `jax.lax.stop_gradient`. Loss weights (lambda_pi, lambda_pa, lambda_ho, lambda_gp, the
auxiliary head's 0.4) are applied by the trainer, not here.

Where the reference PyTorch code and the paper disagree, the default is the reference code's
behaviour (it produced the published numbers) and the paper's reading is an option:

* `cross_entropy`: segmentation cross-entropy with the logits upsampled to the label size, with
  the reference code's optional OHEM.
* `pixel_wise_loss`, `pixel_wise_kl`: pixel-wise distillation (soft cross-entropy, summed over the
  batch as in the reference; KL for logging).
* `pair_wise_nodes`, `pair_wise_loss`: pair-wise distillation over a graph of pooled nodes, global
  (reference) or local (paper), computed without an M x M matrix.
* `critic_loss`, `gradient_penalty`, `generator_loss`, `hinge_critic_loss`,
  `hinge_generator_loss`: holistic (adversarial) distillation, WGAN-GP (reference) or hinge
  (CIRKD).
* `logit_kd`, `channel_wise_loss`, `dist_relations`, `dist_loss`: the methods SKD is compared
  with in the CIRKD benchmark (logit KD, CWD, DIST), each as its public code defines it.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from skd_jax import ops

_EPS_NORM = 1e-8  # The reference adds it to the L2 norm (not to the squared norm).
# Float32 dot products at full precision: the Gram form subtracts sums of size ~M^2, which the
# TF32 / bf16-pass matmuls that accelerators use by default would not resolve.
_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _check_ndim(x: jax.Array, ndim: int, name: str, layout: str) -> None:
  if x.ndim != ndim:
    raise ValueError(f'{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}')


def _safe_sqrt(sq: jax.Array) -> jax.Array:
  """sqrt with a zero (not NaN) gradient at 0, e.g. for an all-zero feature vector."""
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# --------------------------------------------------------------------------------------------------
# Segmentation cross-entropy.
# --------------------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_label: int = 255,
                  ohem: bool = False, ohem_thresh: float = 0.7,
                  ohem_min_kept: int = 100000) -> jax.Array:
  """Pixel cross-entropy, mean over the valid (non-ignored) pixels of the batch.

  The logits are upsampled to the label size INSIDE this function, bilinearly with
  ``align_corners=True`` (`ops.resize_bilinear`), as the reference does before its loss:

      z = up(logits)                          # [N, H, W, C]
      loss = sum_{p in K} -log softmax(z_p)[y_p] / max(|K|, 1)

  where ``K`` is the set of valid pixels (``y_p != ignore_label``), or the OHEM-kept subset of
  it. An all-ignored batch gives 0 (and a zero gradient), not NaN. Labels must lie in [0, C) or
  equal ``ignore_label``; any other value makes the loss NaN.

  OHEM (``ohem=True``; in the reference code's ``OhemCrossEntropy2d``, unused in its runs): let
  ``q_p = softmax(z_p)[y_p]`` (no gradient flows through the selection) and ``V`` the number of
  valid pixels in the whole batch. If ``V <= ohem_min_kept``, every valid pixel is kept.
  Otherwise the threshold is ``max(ohem_thresh, q_(k))``, where ``q_(k)`` is the k-th smallest
  ``q`` over the valid pixels with ``k = ohem_min_kept`` (1-based; no raise when
  ``ohem_min_kept == 0``), and the valid pixels with ``q_p <= threshold`` are kept. The loss is
  then the plain mean over the kept pixels (the reference's optional class weights are not
  implemented). Static shapes throughout (a sort and masks), so it jits.

  Args:
    logits: [N, h, w, C], any float dtype.
    labels: [N, H, W] integer class ids.
    ignore_label: label value excluded from the loss (255 in the reference, -1 in CIRKD).
    ohem: online hard example mining as in the reference code.
    ohem_thresh: probability threshold of OHEM.
    ohem_min_kept: minimum number of pixels OHEM keeps (when that many are valid).

  Returns:
    float32 scalar.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  _check_ndim(logits, 4, 'logits', '[N, h, w, C]')
  _check_ndim(labels, 3, 'labels', '[N, H, W]')
  if logits.shape[0] != labels.shape[0]:
    raise ValueError(f'logits and labels must have the same batch size, got logits '
                     f'{tuple(logits.shape)} and labels {tuple(labels.shape)}')
  if ohem_min_kept < 0:
    raise ValueError(f'ohem_min_kept must be >= 0, got {ohem_min_kept}')
  logits = ops.resize_bilinear(_f32(logits), labels.shape[1:])
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_label
  logp = jax.nn.log_softmax(logits, axis=-1)
  true_logp = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  keep = valid
  if ohem:
    keep = _ohem_keep(jax.lax.stop_gradient(jnp.exp(true_logp)), valid, ohem_thresh,
                      ohem_min_kept)
  keep = keep.astype(jnp.float32)
  return -jnp.sum(true_logp * keep) / jnp.maximum(jnp.sum(keep), 1.0)


def _ohem_keep(prob: jax.Array, valid: jax.Array, thresh: float, min_kept: int) -> jax.Array:
  """The reference's OHEM selection. prob, valid: [N, H, W]; returns the kept mask [N, H, W]."""
  num_valid = jnp.sum(valid)
  if min_kept >= valid.size:
    return valid  # num_valid <= min_kept whatever the labels.
  if min_kept == 0:
    threshold = jnp.float32(thresh)
  else:
    # Invalid pixels sort last, so index min_kept - 1 is the min_kept-th smallest valid prob
    # whenever num_valid > min_kept, the only case where the threshold is used.
    ordered = jnp.sort(jnp.where(valid, prob, jnp.inf).ravel())
    threshold = jnp.maximum(jnp.float32(thresh), ordered[min_kept - 1])
  return jnp.where(num_valid <= min_kept, valid, valid & (prob <= threshold))


# --------------------------------------------------------------------------------------------------
# Pixel-wise distillation.
# --------------------------------------------------------------------------------------------------


def _pixel_inputs(student_logits, teacher_logits, temperature):
  student_logits = jnp.asarray(student_logits)
  teacher_logits = jnp.asarray(teacher_logits)
  _check_ndim(student_logits, 4, 'student_logits', '[N, h, w, C]')
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f'student_logits and teacher_logits must have the same shape, got '
                     f'{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}')
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  log_ps = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(teacher_logits)) / temperature, axis=-1)
  return log_ps, log_pt


def pixel_wise_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                    temperature: float = 1.0, reduction: str = 'batch_sum') -> jax.Array:
  """Pixel-wise distillation: soft cross-entropy from the teacher's class distributions.

  With ``p_T = softmax(z_T / T)`` and ``log p_S = log_softmax(z_S / T)`` per pixel (over C):

      batch_sum (reference):  T^2 * sum_{n,h,w,c} -p_T * log p_S / (h * w)
      mean:                   T^2 * sum_{n,h,w,c} -p_T * log p_S / (N * h * w)

  The reference divides by ``h * w`` only, so its loss is summed over the batch and its scale
  grows with the per-device batch size; ``mean`` is the batch-size independent per-pixel mean.
  The ``T^2`` factor (Hinton) keeps gradient magnitudes comparable across temperatures; the
  reference uses T = 1. Every pixel counts (no ignore mask), at the logits' own resolution. The
  gradient equals that of `pixel_wise_kl`; the values differ by the teacher's entropy.

  Args:
    student_logits: [N, h, w, C], any float dtype.
    teacher_logits: [N, h, w, C], treated as a constant.
    temperature: softmax temperature T > 0.
    reduction: 'batch_sum' (reference) or 'mean'.

  Returns:
    float32 scalar.
  """
  if reduction not in ('batch_sum', 'mean'):
    raise ValueError(f"reduction must be 'batch_sum' or 'mean', got {reduction!r}")
  log_ps, log_pt = _pixel_inputs(student_logits, teacher_logits, temperature)
  n, h, w, _ = log_ps.shape
  total = -jnp.sum(jnp.exp(log_pt) * log_ps)
  pixels = h * w if reduction == 'batch_sum' else n * h * w
  return total / pixels * temperature**2


def pixel_wise_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
                  temperature: float = 1.0) -> jax.Array:
  """Per-pixel mean of KL(p_T || p_S), times T^2; 0 when the student equals the teacher.

      T^2 * sum_{n,h,w,c} p_T * (log p_T - log p_S) / (N * h * w)

  with ``p = softmax(z / T)`` over C. Meant for logging alongside `pixel_wise_loss` (same
  gradient, but 0 means "student equals teacher"); it is also CIRKD's pixel-wise loss
  (``F.kl_div(..., reduction='batchmean') * T^2`` over the N*h*w pixel rows).

  Args:
    student_logits: [N, h, w, C], any float dtype.
    teacher_logits: [N, h, w, C], treated as a constant.
    temperature: softmax temperature T > 0.

  Returns:
    float32 scalar.
  """
  log_ps, log_pt = _pixel_inputs(student_logits, teacher_logits, temperature)
  n, h, w, _ = log_ps.shape
  total = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps))
  return total / (n * h * w) * temperature**2


# --------------------------------------------------------------------------------------------------
# Pair-wise distillation.
# --------------------------------------------------------------------------------------------------


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
  error = ValueError(f'{name} must be a positive int or a pair of positive ints, got {v!r}')
  try:
    pair = tuple(map(operator.index, v)) if isinstance(v, Sequence) else (operator.index(v),) * 2
  except TypeError:
    raise error from None
  if len(pair) != 2 or min(pair) < 1:
    raise error
  return pair


def _pool_kernel(height: int, width: int, pool_scale: float,
                 pool_kernel: int | Sequence[int] | None) -> tuple[int, int]:
  if pool_kernel is not None:
    kh, kw = _pair(pool_kernel, 'pool_kernel')
    if kh > height or kw > width:
      raise ValueError(f'pool_kernel {(kh, kw)} is larger than the feature map {(height, width)}')
    return kh, kw
  # int() truncates exactly as the reference's int(scale * size) does.
  kh, kw = int(pool_scale * height), int(pool_scale * width)
  if not (1 <= kh <= height and 1 <= kw <= width):
    raise ValueError(f'pool_scale must give a kernel between 1 and the feature size; '
                     f'pool_scale={pool_scale} on a {height}x{width} map gives {(kh, kw)}')
  return kh, kw


def pair_wise_nodes(feat: jax.Array, *, pool: str = 'max', pool_scale: float = 0.5,
                    pool_kernel: int | Sequence[int] | None = None) -> jax.Array:
  """The node grid of the pair-wise graph: the feature pooled with kernel = stride, ceil mode.

  * Reference: ``pool='max'``, kernel = stride = ``(int(pool_scale * H), int(pool_scale * W))``,
    ``ceil_mode=True``, no padding. A 65x65 map and pool_scale 0.5 give a 32x32 kernel and 3x3
    nodes, the last row and column pooling a single line of pixels.
  * Paper: ``pool='avg'``, average pooling of the same patches (the clipped last windows are
    averaged over the pixels they contain).
  * CIRKD: ``pool_kernel=2`` (an int or an (h, w) pair overriding pool_scale), max pooling with
    stride = kernel and ceil mode. ``pool_kernel=1`` uses every feature pixel as a node.

  Args:
    feat: [N, H, W, C], any float dtype.
    pool: 'max' (reference, CIRKD) or 'avg' (paper).
    pool_scale: kernel size as a fraction of the feature size (ignored with pool_kernel).
    pool_kernel: fixed kernel, overriding pool_scale.

  Returns:
    float32 [N, h, w, C] nodes, h = ceil((H - kh) / kh) + 1 (PyTorch's ceil-mode rule).
  """
  feat = jnp.asarray(feat)
  _check_ndim(feat, 4, 'feat', '[N, H, W, C]')
  if pool not in ('max', 'avg'):
    raise ValueError(f"pool must be 'max' (reference) or 'avg' (paper), got {pool!r}")
  kernel = _pool_kernel(feat.shape[1], feat.shape[2], pool_scale, pool_kernel)
  feat = _f32(feat)
  if kernel == (1, 1):
    return feat
  return ops.pool2d(feat, kernel, kernel, 0, ceil_mode=True, mode=pool)


def _normalise(nodes: jax.Array, detach_norm: bool) -> jax.Array:
  """f / (||f||_2 + 1e-8) over channels; the norm is a constant when detach_norm."""
  norm = _safe_sqrt(jnp.sum(nodes * nodes, axis=-1, keepdims=True)) + _EPS_NORM
  if detach_norm:
    norm = jax.lax.stop_gradient(norm)
  return nodes / norm


def _alpha_radius(alpha: int | None) -> int | None:
  if alpha is None:
    return None
  valid = ', '.join(str((2 * r + 1)**2) for r in range(5))
  error = ValueError(f'alpha must be None (global graph) or a square neighbourhood size '
                     f'(2r+1)^2 for r >= 0 ({valid}, ...), got {alpha!r}')
  try:
    alpha = operator.index(alpha) if not isinstance(alpha, bool) else 0
  except TypeError:
    raise error from None
  side = int(round(max(alpha, 0)**0.5))
  if alpha < 1 or side * side != alpha or side % 2 == 0:
    raise error
  return (side - 1) // 2


def pair_wise_loss(student_feat: jax.Array, teacher_feat: jax.Array, *, pool: str = 'max',
                   pool_scale: float = 0.5, pool_kernel: int | Sequence[int] | None = None,
                   alpha: int | None = None, detach_norm: bool = True) -> jax.Array:
  """Pair-wise distillation: squared difference of the node similarity graphs.

  Nodes come from `pair_wise_nodes` (reference: max pooling, kernel int(pool_scale * size),
  ceil mode; ``pool='avg'``: the paper; ``pool_kernel=2``: CIRKD). Each node vector is
  normalised over channels, ``s_i = f_i / (||f_i||_2 + 1e-8)``; the norm is DETACHED (a constant
  in the backward pass) when ``detach_norm`` (reference), differentiable otherwise (CIRKD). The
  similarity is ``a_ij = s_i . s_j`` per image.

  Global graph (``alpha=None``, reference, the paper's best), over the M = h*w nodes:

      loss = sum_{n,i,j} (a^T_nij - a^S_nij)^2 / M^2 / N

  computed without the M x M matrices through the exact identity, per image, with the
  normalised node matrices S [M, Cs] and T [M, Ct]:

      sum_ij (S S^t - T T^t)_ij^2 = ||S^t S||_F^2 - 2 ||S^t T||_F^2 + ||T^t T||_F^2,

  O(M (Cs + Ct)^2) time and O((Cs + Ct)^2) memory instead of O(M^2 (Cs + Ct)) and O(M^2).

  Local graph (``alpha=(2r+1)^2``, the paper's option; no public code implements it): node i
  is related to the nodes j of the (2r+1) x (2r+1) square around it on the node grid, i.e. at
  Chebyshev distance ``max(|dy|, |dx|) <= r``, itself included; an interior node thus has exactly
  alpha neighbours and there are no ties to break. Border nodes have fewer (the window is clipped
  to the grid). With P the number of such ordered in-grid pairs (i, j) per image (P = M^2 once
  the window covers the grid, where this equals the global graph),

      loss = sum_n sum_{(i, j) in pairs} (a^T_nij - a^S_nij)^2 / P / N,

  computed with one shifted product of the node grid with itself per window offset (half the
  offsets, by symmetry), O(alpha M (Cs + Ct)), never an M x M matrix. alpha must be 1, 9, 25,
  49, ... (ValueError otherwise).

  Args:
    student_feat: [N, H, W, Cs], any float dtype.
    teacher_feat: [N, H, W, Ct], treated as a constant; Ct may differ from Cs.
    pool: 'max' (reference, CIRKD) or 'avg' (paper).
    pool_scale: node kernel as a fraction of the feature size (reference 0.5).
    pool_kernel: fixed node kernel (int or pair), overriding pool_scale (CIRKD: 2).
    alpha: None for the global graph, or the local neighbourhood size (2r+1)^2.
    detach_norm: stop the gradient through the L2 norm (reference) or not (CIRKD).

  Returns:
    float32 scalar.
  """
  student_feat = jnp.asarray(student_feat)
  teacher_feat = jnp.asarray(teacher_feat)
  _check_ndim(student_feat, 4, 'student_feat', '[N, H, W, Cs]')
  _check_ndim(teacher_feat, 4, 'teacher_feat', '[N, H, W, Ct]')
  if student_feat.shape[:3] != teacher_feat.shape[:3]:
    raise ValueError(f'student_feat and teacher_feat must have the same N, H, W, got '
                     f'{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}')
  radius = _alpha_radius(alpha)
  nodes = dict(pool=pool, pool_scale=pool_scale, pool_kernel=pool_kernel)
  s = _normalise(pair_wise_nodes(student_feat, **nodes), detach_norm)
  # The teacher is a constant, so its norm is one too whatever detach_norm says.
  t = _normalise(pair_wise_nodes(jax.lax.stop_gradient(teacher_feat), **nodes), True)
  n, h, w, _ = s.shape
  if radius is None or (radius >= h - 1 and radius >= w - 1):
    return _global_graph_loss(s, t)
  return _local_graph_loss(s, t, radius)


def _global_graph_loss(s: jax.Array, t: jax.Array) -> jax.Array:
  """s: [N, h, w, Cs], t: [N, h, w, Ct] normalised nodes; Gram-form global graph loss."""
  n, h, w, _ = s.shape
  m = h * w
  s = s.reshape(n, m, -1)
  t = t.reshape(n, m, -1)
  gram = lambda a, b: jnp.einsum('nmc,nmd->ncd', a, b, precision=_HIGHEST)
  total = (jnp.sum(jnp.square(gram(s, s))) - 2.0 * jnp.sum(jnp.square(gram(s, t)))
           + jnp.sum(jnp.square(gram(t, t))))
  return total / (m * m) / n


def _local_graph_loss(s: jax.Array, t: jax.Array, radius: int) -> jax.Array:
  """s: [N, h, w, Cs], t: [N, h, w, Ct] normalised nodes; local graph of Chebyshev radius."""
  n, h, w, _ = s.shape
  ry, rx = min(radius, h - 1), min(radius, w - 1)
  total = jnp.float32(0.0)
  pairs = 0
  # a_ij = a_ji, so offset -d gives the same terms as +d: visit half the window, count twice.
  for dy in range(0, ry + 1):
    for dx in range(-rx, rx + 1):
      if dy == 0 and dx < 0:
        continue
      weight = 1 if dy == dx == 0 else 2
      # Node (y, x) for y in [0, h - dy), x in [x0, x1), paired with node (y + dy, x + dx).
      x0, x1 = max(0, -dx), w - max(0, dx)
      a_s = jnp.sum(s[:, :h - dy, x0:x1] * s[:, dy:, x0 + dx:x1 + dx], axis=-1)
      a_t = jnp.sum(t[:, :h - dy, x0:x1] * t[:, dy:, x0 + dx:x1 + dx], axis=-1)
      total = total + weight * jnp.sum(jnp.square(a_t - a_s))
      pairs += weight * (h - dy) * (x1 - x0)
  return total / pairs / n


# --------------------------------------------------------------------------------------------------
# Holistic (adversarial) distillation. The trainer applies lambda_ho and lambda_gp.
# --------------------------------------------------------------------------------------------------


def critic_loss(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """WGAN critic loss (reference): ``mean D(fake) - mean D(real)``.

  Real = teacher logits, fake = student logits. Scores of any shape ([N] or [N, 1] usually);
  each mean is over all entries. The trainer multiplies by lambda_ho and adds
  lambda_ho * lambda_gp * `gradient_penalty`.

  Returns:
    float32 scalar.
  """
  return jnp.mean(_f32(fake_scores)) - jnp.mean(_f32(real_scores))


def generator_loss(fake_scores: jax.Array) -> jax.Array:
  """Student's adversarial loss (WGAN, reference): ``-mean D(fake)``; float32 scalar."""
  return -jnp.mean(_f32(fake_scores))


def hinge_critic_loss(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """Hinge critic loss (CIRKD): ``mean relu(1 - D(real)) + mean relu(1 + D(fake))``.

  Scores of any shape; the trainer applies the weight (0.1 in CIRKD). Returns a float32 scalar.
  """
  return (jnp.mean(jax.nn.relu(1.0 - _f32(real_scores)))
          + jnp.mean(jax.nn.relu(1.0 + _f32(fake_scores))))


def hinge_generator_loss(fake_scores: jax.Array) -> jax.Array:
  """Student's adversarial loss with the hinge critic (CIRKD): ``-mean D(fake)``; float32."""
  return -jnp.mean(_f32(fake_scores))


def gradient_penalty(critic_fn: Callable[[jax.Array], Any], real: jax.Array, fake: jax.Array,
                     key: jax.Array, *, has_aux: bool = False) -> Any:
  """WGAN-GP gradient penalty: ``mean_n (||grad_x D(x_hat_n)||_2 - 1)^2``.

      a_n ~ U[0, 1] per sample,   x_hat_n = a_n * real_n + (1 - a_n) * fake_n

  The gradient is that of ``sum(D(x_hat))`` with respect to x_hat, and its norm is taken over
  all the non-batch axes of each sample (all of H*W*C). ``real`` (teacher logits) and ``fake``
  (student logits) are constants here: the penalty trains the critic only, through the
  parameters that ``critic_fn`` closes over (double backpropagation). The norm has a zero, not
  NaN, gradient where the input gradient vanishes. The trainer multiplies the result by
  lambda_ho * lambda_gp.

  Args:
    critic_fn: maps x [N, ...] (float32) to scores [N] or [N, 1] (any shape: they are summed);
      with ``has_aux``, to ``(scores, aux)`` (e.g. updated spectral-norm or BN state).
    real: [N, ...] real samples (teacher logits [N, h, w, C]), any float dtype.
    fake: same shape as real (student logits).
    key: PRNG key for the interpolation weights.
    has_aux: critic_fn also returns auxiliary data, returned alongside the penalty.

  Returns:
    float32 scalar, or ``(penalty, aux)`` with has_aux.
  """
  real = jax.lax.stop_gradient(_f32(real))
  fake = jax.lax.stop_gradient(_f32(fake))
  if real.shape != fake.shape:
    raise ValueError(f'real and fake must have the same shape, got {tuple(real.shape)} and '
                     f'{tuple(fake.shape)}')
  n = real.shape[0]
  a = jax.random.uniform(key, (n,) + (1,) * (real.ndim - 1), jnp.float32)
  x_hat = a * real + (1.0 - a) * fake

  def summed(x):
    out = critic_fn(x)
    scores, aux = out if has_aux else (out, None)
    return jnp.sum(_f32(scores)), aux

  grads, aux = jax.grad(summed, has_aux=True)(x_hat)
  norms = _safe_sqrt(jnp.sum(jnp.square(grads.reshape(n, -1)), axis=1))
  penalty = jnp.mean(jnp.square(norms - 1.0))
  return (penalty, aux) if has_aux else penalty


# --------------------------------------------------------------------------------------------------
# The methods SKD is compared with (the CIRKD benchmark): logit KD, CWD, DIST.
# --------------------------------------------------------------------------------------------------


def _is_positive_int(v: Any) -> bool:
  try:
    return not isinstance(v, bool) and operator.index(v) >= 1
  except TypeError:
    return False


def logit_kd(student_logits: jax.Array, teacher_logits: jax.Array, *,
             temperature: float = 1.0) -> jax.Array:
  """Logit knowledge distillation (Hinton et al.): per-pixel mean of KL(p_T || p_S), times T^2.

      T^2 * sum_{n,h,w,c} p_T * (log p_T - log p_S) / (N * h * w),   p = softmax(z / T) over C

  This is CIRKD's ``CriterionKD`` (``F.kl_div(..., reduction='batchmean')`` over the N*h*w pixel
  rows, times T^2; its runs use T = 1), applied to the main logits at their own resolution, no
  upsampling and no ignore mask. The quantity is `pixel_wise_kl`'s, which computes it; this name
  is the KD method's term. A mean over the pixels of the global batch equals the reference's
  per-GPU value averaged over its GPUs (DDP averages gradients) when the per-GPU batches are equal.

  Args:
    student_logits: [N, h, w, C], any float dtype.
    teacher_logits: [N, h, w, C], treated as a constant.
    temperature: softmax temperature T > 0.

  Returns:
    float32 scalar, 0 when the student equals the teacher.
  """
  return pixel_wise_kl(student_logits, teacher_logits, temperature=temperature)


def channel_wise_loss(student_map: jax.Array, teacher_map: jax.Array, *,
                      temperature: float = 4.0, channel_divisor: int | None = None) -> jax.Array:
  """Channel-wise distillation (CWD; Shu et al., ICCV 2021), on logits or on features.

  Each channel c of each image n becomes a distribution over the M = H*W positions i,
  ``phi(x)_nci = softmax_i(x_nic / T)``, and the loss is the KL divergence of the student's from
  the teacher's, summed over positions, channels and images:

      T^2 * sum_{n,c,i} phi(t)_nci * (log phi(t)_nci - log phi(s)_nci) / (N * C')

  with ``C' = channel_divisor`` if given, else C (the compared channel count; the paper's 1/C).
  CIRKD (``CriterionCWD(norm_type='channel', divergence='kl', temperature=4.)``, the published CWD
  run) uses T = 4 for both its terms (logits, weight 3; features, weight 50) and takes its divisor
  from the student's input BEFORE its 1x1 adapter, so on features with a student of Cs channels
  and a teacher of Ct the reference divides by N * Cs, not N * Ct (x2 for its 128 -> 256
  channels). To match the reference, pass ``channel_divisor=Cs`` for the feature term; on the
  logits the two readings agree. The student's features go through
  `skd_jax.models.adapters.ChannelAdapter` first when Cs != Ct (that is the trainer's job; this
  function compares maps of one shape).

  Both maps must have the same resolution (no resizing here). The reference takes ``log`` of the
  student's softmax, where this uses log-softmax: equal up to rounding, except where the softmax
  underflows to 0 (the reference's loss is then infinite, this one finite). Linear in the images,
  so the global-batch value equals the reference's per-GPU average.

  Args:
    student_map: [N, H, W, C] student logits or (adapted) features, any float dtype.
    teacher_map: [N, H, W, C], treated as a constant.
    temperature: softmax temperature T > 0 (4 in CIRKD and in the paper's Cityscapes runs).
    channel_divisor: C' of the N * C' normaliser; None for the compared channel count C.

  Returns:
    float32 scalar, 0 when the student equals the teacher.
  """
  student_map = jnp.asarray(student_map)
  teacher_map = jnp.asarray(teacher_map)
  _check_ndim(student_map, 4, 'student_map', '[N, H, W, C]')
  if student_map.shape != teacher_map.shape:
    raise ValueError(
        f'student_map and teacher_map must have the same shape, got {tuple(student_map.shape)} '
        f'and {tuple(teacher_map.shape)} (map the student features to the teacher channels with '
        f'skd_jax.models.adapters.ChannelAdapter)')
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  if channel_divisor is not None and not _is_positive_int(channel_divisor):
    raise ValueError(f'channel_divisor must be None or a positive int, got {channel_divisor!r}')
  n, h, w, c = student_map.shape

  def log_phi(x):  # [N, H, W, C] -> [N, H*W, C], log-softmax over the positions.
    return jax.nn.log_softmax(_f32(x).reshape(n, h * w, c) / temperature, axis=1)

  log_ps = log_phi(student_map)
  log_pt = log_phi(jax.lax.stop_gradient(teacher_map))
  total = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps))
  return total / (n * (channel_divisor or c)) * temperature**2


_EPS_PEARSON = 1e-8  # DIST adds it to the product of the two centred norms.


def _pearson(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
  """Pearson correlation along axis: cos(a - mean a, b - mean b), eps added to the norm product."""
  a = a - jnp.mean(a, axis=axis, keepdims=True)
  b = b - jnp.mean(b, axis=axis, keepdims=True)
  norms = _safe_sqrt(jnp.sum(a * a, axis=axis)) * _safe_sqrt(jnp.sum(b * b, axis=axis))
  return jnp.sum(a * b, axis=axis) / (norms + _EPS_PEARSON)


def dist_relations(student_logits: jax.Array, teacher_logits: jax.Array, *,
                   temperature: float = 1.0, groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """DIST's two relation losses (Huang et al., NeurIPS 2022), for segmentation logits.

  With ``Y = softmax(z / T)`` over the C classes, the pixels of each group of N / G images
  flattened into the P = (N / G) * h * w rows of a [P, C] matrix per group g, and
  ``rho(u, v) = (u - mean u) . (v - mean v) / (||u - mean u|| * ||v - mean v|| + 1e-8)``:

      inter = T^2 * (1 - mean_{g, p} rho(Y^S_g[p, :], Y^T_g[p, :]))   # each pixel's class vector
      intra = T^2 * (1 - mean_{g, c} rho(Y^S_g[:, c], Y^T_g[:, c]))   # each class across pixels

  This is the DIST_KD segmentation code (``segmentation/losses/dist_kd.py``): softmax of the raw
  logits, the [N, C, h, w] maps flattened to one [N*h*w, C] matrix per GPU, epsilon 1e-8 added to
  the product of the norms, no upsampling and no ignore mask, on the main and the aux logits (the
  trainer applies the 0.4). That code has no temperature; the classification DIST's ``tau``
  (softmax of z / tau, both terms times tau^2) is the option here, and T = 1 is the segmentation
  code exactly.

  The intra-class term is not linear in the images: the reference computes it over each GPU's
  local batch and DDP averages the per-GPU losses. ``groups=G`` splits the batch into G
  consecutive groups of N / G images and averages their losses, which is the reference on G GPUs
  (its published run: 8 GPUs x 2 images, ``groups=8`` for N = 16); ``groups=1`` takes the whole
  batch as one group. The inter-class term is the same for every G.

  A pixel whose class vector is constant (a uniform softmax) has a zero centred vector, so its
  correlation is 0, as in the reference; the gradient there is then large (b / 1e-8), as the
  reference's is.

  Args:
    student_logits: [N, h, w, C], any float dtype.
    teacher_logits: [N, h, w, C], treated as a constant.
    temperature: softmax temperature T > 0 (1: the segmentation code).
    groups: number G of equal image groups (G must divide N).

  Returns:
    (inter, intra), float32 scalars, each 0 when the student equals the teacher (up to the
    epsilon) and T^2 when the teacher is uniform.
  """
  log_ps, log_pt = _pixel_inputs(student_logits, teacher_logits, temperature)
  n, _, _, c = log_ps.shape
  if not _is_positive_int(groups) or n % groups:
    raise ValueError(f'groups must be a positive int dividing the batch size {n}, got {groups!r}')
  ps = jnp.exp(log_ps).reshape(groups, -1, c)
  pt = jnp.exp(log_pt).reshape(groups, -1, c)
  inter = 1.0 - jnp.mean(_pearson(ps, pt, axis=-1))
  intra = 1.0 - jnp.mean(_pearson(ps, pt, axis=1))
  return inter * temperature**2, intra * temperature**2


def dist_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 1.0, groups: int = 1) -> jax.Array:
  """DIST: ``beta * inter + gamma * intra`` of `dist_relations` (beta = gamma = 1 in DIST).

  Args:
    student_logits: [N, h, w, C], any float dtype.
    teacher_logits: [N, h, w, C], treated as a constant.
    beta: weight of the inter-class (per-pixel) relation.
    gamma: weight of the intra-class (per-class, across pixels) relation.
    temperature: softmax temperature T > 0 (1: the segmentation code).
    groups: images split into this many equal groups, as the reference's GPUs.

  Returns:
    float32 scalar.
  """
  inter, intra = dist_relations(student_logits, teacher_logits, temperature=temperature,
                                groups=groups)
  return beta * inter + gamma * intra


__all__ = [
    'channel_wise_loss', 'critic_loss', 'cross_entropy', 'dist_loss', 'dist_relations',
    'generator_loss', 'gradient_penalty', 'hinge_critic_loss', 'hinge_generator_loss', 'logit_kd',
    'pair_wise_loss', 'pair_wise_nodes', 'pixel_wise_kl', 'pixel_wise_loss',
]
