r"""Inference, pure JAX: the logits of images under any of the reference's inference modes.


Inference (`InferenceMode`; any combination, from ``config.eval`` through `inference_options`):

* whole image (the reference's reported evaluation, the default): the network's logits (1/8 of the
  input) upsampled (bilinear, align_corners=True) to the label size;
* sliding window (the reference's ``predict_sliding``): tiles of ``crop_size`` with stride
  ``ceil(tile_h * (1 - 1/3))`` (1/3 overlap) on both axes, each window ``[y1, y2)`` with
  ``y2 = min(y1 + tile, H)``, ``y1 = max(y2 - tile, 0)``; a tile larger than the image is
  zero-padded bottom / right (the reference pads the normalised image with 0, as here), its logits
  are upsampled (align_corners=True) to the tile size, the padding cropped off, and the logits of
  overlapping tiles averaged per pixel. (A tile narrower than the stride would leave columns that
  no tile covers, where the reference divides 0 by 0: an error here.);
* multi-scale (the reference's ``predict_multiscale``): the image resized to ``round(H * s)`` x
  ``round(W * s)`` for each scale ``s`` and predicted (whole or sliding), the logits upsampled to
  the label size and averaged over the scales. The reference resizes with
  ``scipy.ndimage.zoom(order=1, prefilter=False)``, which samples with aligned corners (output
  pixel ``i`` reads input ``i * (in - 1) / (out - 1)``) and rounds the size with Python's
  ``round``: that is `ops.resize_bilinear` (align_corners=True), not `jax.image.resize`
  (half-pixel centres), and the same size rule. (One artefact is not reproduced: with its default
  ``mode='constant'``, zoom reads 0 for a last row or column whose source coordinate rounds a
  hair past the edge, e.g. 30 -> 15 rows.);
* flip: the horizontally flipped image is predicted too and its flipped-back logits averaged in
  (at every scale, as the reference).

The prediction is the argmax of the averaged logits (`skd_jax.evaluator` turns it into a confusion
matrix; `skd_jax.export` puts `predict` into a serving function).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skd_jax import ops

# The reference's tile overlap in predict_sliding.
SLIDING_OVERLAP = 1 / 3



@dataclasses.dataclass(frozen=True)
class InferenceMode:
  """How the logits of an image are computed (hashable: a static argument of the jitted step).

  Attributes:
    sliding_window: tiles of `crop_size` (reference ``predict_sliding``) instead of the whole
      image.
    crop_size: the sliding-window tile (height, width); needed with `sliding_window` only.
    scales: image scales whose logits are averaged; (1.0,) = single scale.
    flip: also average the logits of the horizontally flipped image.
  """
  sliding_window: bool = False
  crop_size: tuple[int, int] | None = None
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False

  def __post_init__(self):
    scales = tuple(self.scales) if isinstance(self.scales, (tuple, list)) else ()
    if not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
      raise ValueError(f'eval.scales must be a non-empty tuple of positive numbers, got '
                       f'{self.scales!r} (e.g. --config.eval.scales="(0.75, 1.0, 1.25)")')
    object.__setattr__(self, 'scales', tuple(float(s) for s in scales))
    if self.crop_size is not None:
      crop = tuple(self.crop_size)
      if len(crop) != 2 or not all(isinstance(c, (int, np.integer)) and c > 0 for c in crop):
        raise ValueError(f'eval.crop_size must be (height, width) of positive ints, got '
                         f'{self.crop_size!r} (e.g. --config.eval.crop_size="(512, 512)")')
      object.__setattr__(self, 'crop_size', tuple(int(c) for c in crop))
    elif self.sliding_window:
      raise ValueError('sliding-window evaluation needs a tile size: set eval.crop_size (or '
                       'data.crop_size), e.g. --config.eval.crop_size="(512, 512)"')

  def describe(self) -> str:
    """E.g. 'sliding window 512x512, scales 0.75/1.0/1.25, flip'."""
    parts = [f'sliding window {self.crop_size[0]}x{self.crop_size[1]}' if self.sliding_window
             else 'whole image']
    if self.scales != (1.0,):
      parts.append('scales ' + '/'.join(f'{s:g}' for s in self.scales))
    if self.flip:
      parts.append('flip')
    return ', '.join(parts)


def inference_options(config) -> dict[str, Any]:
  """`make_evaluator`'s inference keywords from ``config.eval`` (crop_size () = data.crop_size)."""
  crop_size = tuple(config.eval.crop_size) or tuple(config.data.crop_size)
  return dict(sliding_window=bool(config.eval.sliding_window), crop_size=crop_size,
              scales=tuple(config.eval.scales), flip=bool(config.eval.flip))


def sliding_window_stride(tile_h: int) -> int:
  """The reference's stride, ``ceil(tile_h * (1 - 1/3))`` in floating point, for both axes.

  The float expression is kept on purpose: ``1 - 1/3`` rounds up, so some tiles divisible by 3
  get one pixel more than 2/3 of them (720 -> 481, 576 -> 385, 36 -> 25); 512 gives 342 either
  way.
  """
  return math.ceil(tile_h * (1 - SLIDING_OVERLAP))


def sliding_window_starts(size: int, tile: int, stride: int) -> list[int]:
  """First pixel of each window along one axis, as the reference's predict_sliding.

  ``ceil((size - tile) / stride) + 1`` windows (at least one); window ``i`` ends at
  ``min(i * stride + tile, size)`` and starts ``tile`` before that, or at 0.
  """
  count = max(ops.ceil_div(size - tile, stride) + 1, 1)
  return [max(min(i * stride + tile, size) - tile, 0) for i in range(count)]


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
  """(round(h * scale), round(w * scale)): `scipy.ndimage.zoom`'s output size (Python round).

  At scale 1 the size itself, which may then be symbolic (`skd_jax.export`).
  """
  if scale == 1:
    return tuple(size)
  return tuple(max(int(round(s * scale)), 1) for s in size)


def predict_logits(model, variables, images: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Whole-image inference: logits [N, h, w, C] upsampled to [N, *out_hw, C] in float32."""
  logits, _, _ = model.apply(variables, images, train=False)
  return ops.resize_bilinear(logits.astype(jnp.float32), out_hw)


def predict_sliding(model, variables, images: jax.Array, crop_size: tuple[int, int]) -> jax.Array:
  """Sliding-window inference: [N, H, W, 3] images -> [N, H, W, C] float32 logits.

  The tiles run one after the other (`jax.lax.scan`), so the network is traced once and only
  one tile's activations are alive at a time. A tile narrower than 2/3 of its height would leave
  columns without a tile (the reference's stride is the height's on both axes): a ValueError.
  """
  n, h, w, channels = images.shape
  tile_h, tile_w = crop_size
  stride = sliding_window_stride(tile_h)
  ys = sliding_window_starts(h, tile_h, stride)
  xs = sliding_window_starts(w, tile_w, stride)
  # Every window has this size: a full tile, or the whole image where it is smaller.
  win_h, win_w = min(tile_h, h), min(tile_w, w)
  counts = np.zeros((h, w), np.float32)
  for y in ys:
    for x in xs:
      counts[y:y + win_h, x:x + win_w] += 1
  if not counts.all():
    # The reference steps both axes by the stride of the tile's height: a tile narrower than that
    # leaves columns that no tile covers (the reference divides 0 by 0 there).
    raise ValueError(
        f'eval.crop_size {tuple(crop_size)}: the sliding window steps both axes by '
        f'{stride} pixels (ceil(2/3 of the tile height), as the reference), more than the tile '
        f'width {tile_w}, so some columns of a {h}x{w} image get no prediction; use a tile at '
        f'least {stride} wide, e.g. --config.eval.crop_size="({tile_h}, {max(tile_w, tile_h)})".')

  def tile_logits(offset):
    window = jax.lax.dynamic_slice(images, (0, offset[0], offset[1], 0),
                                   (n, win_h, win_w, channels))
    # The reference's pad_image: zeros bottom / right (our images are normalised already).
    tile = jnp.pad(window, ((0, 0), (0, tile_h - win_h), (0, tile_w - win_w), (0, 0)))
    return predict_logits(model, variables, tile, (tile_h, tile_w))[:, :win_h, :win_w]

  def add_tile(total, offset):
    start = (0, offset[0], offset[1], 0)
    logits = tile_logits(offset)
    current = jax.lax.dynamic_slice(total, start, logits.shape)
    return jax.lax.dynamic_update_slice(total, current + logits, start), None

  offsets = jnp.asarray([(y, x) for y in ys for x in xs], jnp.int32)
  num_classes = jax.eval_shape(tile_logits, offsets[0]).shape[-1]
  total, _ = jax.lax.scan(add_tile, jnp.zeros((n, h, w, num_classes), jnp.float32), offsets)
  return total / jnp.asarray(counts)[None, :, :, None]


def _predict_view(model, variables, images: jax.Array, out_hw: tuple[int, int],
                  mode: InferenceMode) -> jax.Array:
  """Logits [N, *out_hw, C] of one view (one scale, flipped or not)."""
  if mode.sliding_window:
    return ops.resize_bilinear(predict_sliding(model, variables, images, mode.crop_size), out_hw)
  # As the reference's predict_whole: straight from the network's resolution to the label's.
  return predict_logits(model, variables, images, out_hw)


def predict(model, variables, images: jax.Array, out_hw: tuple[int, int],
            mode: InferenceMode = InferenceMode()) -> jax.Array:
  """Logits [N, *out_hw, C] float32 of images [N, H, W, 3], averaged over scales and flips."""
  view = functools.partial(_predict_view, model, variables, out_hw=out_hw, mode=mode)
  total = 0.0
  for scale in mode.scales:
    # resize_bilinear returns the images themselves at scale 1.
    scaled = ops.resize_bilinear(images, scaled_size(images.shape[1:3], scale))
    if mode.flip:
      # Both views through one trace of the network, one after the other.
      both = jax.lax.map(view, jnp.stack([scaled, scaled[:, :, ::-1]]))
      logits = 0.5 * (both[0] + both[1][:, :, ::-1])
    else:
      logits = view(scaled)
    total = total + logits
  return total / len(mode.scales)
