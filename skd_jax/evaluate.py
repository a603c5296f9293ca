r"""Evaluation: inference modes, mIoU from one confusion matrix over the split, test-server export.

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

The prediction is the argmax of the averaged logits. One confusion matrix is accumulated on device
over the whole split (pixels labelled 255 and padded examples ignored); the batch is sharded over
the mesh and the matrix replicated, so it is global over devices and hosts.
``IoU_c = TP / (TP + FP + FN)``, mIoU the mean over the classes.

Standalone:

    python -m skd_jax.evaluate --config=configs/cityscapes.py --workdir=DIR \
        [--checkpoint=PATH] [--model=student|teacher] [--export_dir=OUT [--export_color]]

evaluates the best (else the latest) checkpoint of the run in DIR, or `--checkpoint`, or, with
``--model=teacher``, the config's teacher, with the inference of ``config.eval``; prints the
per-class IoU table and writes it as JSON. ``--export_dir`` also writes every image of the split
(``--config.data.eval_split=test`` for the test server) as a PNG of Cityscapes label ids named
``<city>_<seq>_<frame>_leftImg8bit.png``: zip that folder for the server, or point the official
``cityscapesscripts`` evaluation at it (``CITYSCAPES_RESULTS=OUT``). ``--export_color`` adds
colour visualisations in the sibling folder ``OUT_color`` (not inside OUT: the official script
searches OUT recursively and rejects a second PNG whose name starts with an image's id).

On several hosts it is the same command on every host, with the multi-host flags of
`skd_jax.main` (`skd_jax.cli`): each host reads its own share of the split, every image is counted
once, and process 0 prints the table and writes the JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from skd_jax import ops
from skd_jax import sharding as sharding_lib
from skd_jax.data import cityscapes
from skd_jax.paths import as_path

# The reference's tile overlap in predict_sliding.
SLIDING_OVERLAP = 1 / 3


def confusion_matrix(pred: jax.Array, label: jax.Array, mask: jax.Array | None, num_classes: int,
                     ignore_label: int = 255) -> jax.Array:
  """[C, C] int32 counts, rows = ground truth, columns = prediction.

  Args:
    pred, label: [N, H, W] integer maps. Labels equal to `ignore_label` are skipped.
    mask: [N] bool, False for padding examples (skipped), or None.
  """
  valid = (label != ignore_label) & (label >= 0) & (label < num_classes)
  if mask is not None:
    valid &= mask[:, None, None]
  index = jnp.where(valid, label * num_classes + pred, 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def metrics_from_confusion(confusion: np.ndarray, class_names: Sequence[str] | None = None, *,
                           ignore_absent_classes: bool = False) -> dict[str, Any]:
  """mIoU, per-class IoU, pixel accuracy and mean accuracy from a confusion matrix.

  By default (the reference), a class absent from both labels and predictions has IoU 0 and
  counts in the mean; ``ignore_absent_classes=True`` leaves such classes out of the mean (the
  official Cityscapes scripts' behaviour; used by the demo, whose scenes lack some classes).
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  gt = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  union = gt + predicted - tp
  iou = tp / np.maximum(union, 1.0)
  present = union > 0
  mean_iou = iou[present].mean() if ignore_absent_classes and present.any() else iou.mean()
  acc = tp / np.maximum(gt, 1.0)
  names = list(class_names) if class_names is not None else [str(c) for c in range(len(tp))]
  return {
      'miou': float(mean_iou),
      'per_class_iou': {n: float(v) for n, v in zip(names, iou)},
      'pixel_accuracy': float(tp.sum() / max(confusion.sum(), 1.0)),
      'mean_accuracy': float(acc[gt > 0].mean()) if (gt > 0).any() else 0.0,
      'num_pixels': int(confusion.sum()),
  }


# ---------------------------------------------------------------------------------------------
# Inference modes.


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


# ---------------------------------------------------------------------------------------------
# The evaluation pass.


def eval_step(variables, batch: dict[str, jax.Array], confusion: jax.Array, *, model,
              num_classes: int, ignore_label: int, mode: InferenceMode = InferenceMode(),
              return_predictions: bool = False):
  """Adds one batch ({'image', 'label', 'mask'}) to the running confusion matrix.

  Returns the new matrix, and with `return_predictions` also the predictions [N, H, W] (uint8
  when the classes fit, else int32).
  """
  logits = predict(model, variables, batch['image'], batch['label'].shape[1:3], mode)
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  confusion = confusion + confusion_matrix(pred, batch['label'], batch['mask'], num_classes,
                                           ignore_label)
  if return_predictions:
    return confusion, pred.astype(jnp.uint8 if num_classes <= 256 else jnp.int32)
  return confusion


def process_local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order of its local batch.

  `sharding_lib.global_batch` lays each process's rows out in the order of the global indices
  its devices hold, so sorting the addressable shards by their first row restores it.
  """
  shards = {}
  for shard in x.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, shard.data)  # Replicas hold the same rows.
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)], axis=0)


OnPredictions = Callable[[dict[str, np.ndarray], np.ndarray], None]


def make_evaluator(model, mesh, *, num_classes: int, ignore_label: int = 255,
                   sliding_window: bool = False, crop_size: Sequence[int] | None = None,
                   scales: Sequence[float] = (1.0,), flip: bool = False
                   ) -> Callable[..., np.ndarray]:
  """A function (variables, host batches[, on_predictions]) -> confusion matrix, as NumPy.

  The inference keywords are those of `InferenceMode` (`inference_options(config)` reads them
  from a config); the defaults are the reference's whole-image, single-scale evaluation.

  The step is jitted once per shape: variables and the confusion matrix replicated, the batch
  sharded. `on_predictions(host_batch, predictions)`, if given, is called for every batch with
  this process's predictions [B_local, H, W] (train ids; padding rows included, `host_batch`
  has 'mask' and 'index' to skip them).
  """
  mode = InferenceMode(sliding_window=sliding_window,
                       crop_size=tuple(crop_size) if crop_size is not None else None,
                       scales=tuple(scales), flip=flip)
  replicated = sharding_lib.replicated(mesh)

  @functools.cache
  def step(return_predictions: bool):
    out_shardings = ((replicated, sharding_lib.batch_sharded(mesh)) if return_predictions
                     else replicated)
    return jax.jit(
        functools.partial(eval_step, model=model, num_classes=num_classes,
                          ignore_label=ignore_label, mode=mode,
                          return_predictions=return_predictions),
        out_shardings=out_shardings, donate_argnums=(2,))

  def evaluate(variables, batches: Iterable[dict[str, np.ndarray]],
               on_predictions: OnPredictions | None = None) -> np.ndarray:
    confusion = jax.device_put(jnp.zeros((num_classes, num_classes), jnp.int32), replicated)
    for batch in batches:
      inputs = sharding_lib.global_batch({k: batch[k] for k in ('image', 'label', 'mask')}, mesh)
      if on_predictions is None:
        confusion = step(False)(variables, inputs, confusion)
      else:
        confusion, pred = step(True)(variables, inputs, confusion)
        on_predictions(batch, process_local_rows(pred))
    return np.asarray(jax.device_get(confusion))

  return evaluate


# ---------------------------------------------------------------------------------------------
# Test-server export.


def image_id_reader(data_dir: str, split: str) -> Callable[[int], str]:
  """Example index in a prepared Cityscapes split -> its image id, '<city>_<seq>_<frame>'.

  The eval iterator yields only the example index ('index'); the id is the tfds builder's
  'image_id' feature of the same example, read from the same source in the same order as
  `pipeline.make_eval_iterator` (ArrayRecord random access, else the split's stored order).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from skd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  builder = pipeline._prepared_builder(data_dir)
  tfds_split = pipeline._tfds_split(split)
  # pylint: enable=protected-access
  # Only the id is read: every image feature stays encoded.
  decoders = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
              if isinstance(feature, tfds.features.Image)}
  formats = {f.value for f in builder.info.available_file_formats()} | {
      builder.info.file_format.value}
  if 'array_record' in formats:
    source = builder.as_data_source(tfds_split, decoders=decoders)
    return lambda index: source[int(index)]['image_id'].decode()
  dataset = builder.as_dataset(split=tfds_split, decoders=decoders, shuffle_files=False)
  ids = [example['image_id'].decode() for example in dataset.as_numpy_iterator()]
  return lambda index: ids[int(index)]


class PredictionExporter:
  """Writes predictions as Cityscapes test-server PNGs (an `on_predictions` of `make_evaluator`).

  Each real example of a batch becomes ``<export_dir>/<image id>_leftImg8bit.png``: one 8-bit
  grey channel of Cityscapes label ids (train ids mapped back through `label_ids`), the format
  and name the official `cityscapesscripts` evaluation and the test server read. With
  `color_dir`, an RGB rendering in the class palette goes to ``<color_dir>/<same name>``.
  """

  def __init__(self, export_dir: str | os.PathLike, image_id: Callable[[int], str], *,
               label_ids: np.ndarray, palette: np.ndarray | None = None,
               color_dir: str | os.PathLike | None = None):
    # Local or gs://: on several hosts each writes its own images, so the folder must be shared.
    self.export_dir = as_path(export_dir)
    self.color_dir = as_path(color_dir) if color_dir is not None else None
    if self.color_dir is not None and palette is None:
      raise ValueError('color_dir needs a palette')
    self._image_id = image_id
    # One extra entry (0, 'unlabeled' in Cityscapes) for anything out of range.
    self._lut = np.concatenate([np.asarray(label_ids, np.uint8), np.zeros((1,), np.uint8)])
    self._palette = palette
    self.num_written = 0
    self.export_dir.mkdir(parents=True, exist_ok=True)
    if self.color_dir is not None:
      self.color_dir.mkdir(parents=True, exist_ok=True)

  def file_name(self, index: int) -> str:
    return f'{self._image_id(index)}_leftImg8bit.png'

  def __call__(self, batch: dict[str, np.ndarray], predictions: np.ndarray) -> None:
    num_classes = len(self._lut) - 1
    for index, train_ids in zip(batch['index'], predictions):
      if index < 0:  # Padding.
        continue
      name = self.file_name(int(index))
      train_ids = np.asarray(train_ids)
      valid = (train_ids >= 0) & (train_ids < num_classes)
      label_ids = self._lut[np.where(valid, train_ids, num_classes).astype(np.intp)]
      _write_png(self.export_dir / name, label_ids)  # 2-D uint8: mode 'L'
      if self.color_dir is not None:
        _write_png(self.color_dir / name, cityscapes.colorize(train_ids, self._palette))
      self.num_written += 1


def _write_png(path, pixels: np.ndarray) -> None:
  with path.open('wb') as f:
    Image.fromarray(pixels).save(f, format='PNG')


def prediction_exporter(data_dir: str, split: str, export_dir: str | os.PathLike, *,
                        dataset: str = 'cityscapes', num_classes: int = 19,
                        color: bool = False) -> PredictionExporter:
  """A `PredictionExporter` for a prepared split; colour files go to ``<export_dir>_color``."""
  if dataset != 'cityscapes' or num_classes != cityscapes.NUM_CLASSES:
    raise ValueError(
        f'--export_dir writes Cityscapes label ids, which needs data.dataset = "cityscapes" and '
        f'data.num_classes = {cityscapes.NUM_CLASSES}; got {dataset!r} with {num_classes} classes.')
  export_dir = as_path(export_dir)
  color_dir = export_dir.with_name(export_dir.name + '_color') if color else None
  return PredictionExporter(export_dir, image_id_reader(data_dir, split),
                            label_ids=cityscapes.TRAIN_ID_TO_LABEL_ID,
                            palette=cityscapes.PALETTE, color_dir=color_dir)


# ---------------------------------------------------------------------------------------------
# Reporting and the standalone program.


def format_table(metrics: dict[str, Any], title: str = '') -> str:
  """The per-class IoU table as text."""
  lines = [title] if title else []
  width = max(len(n) for n in metrics['per_class_iou'])
  for name, value in metrics['per_class_iou'].items():
    lines.append(f'  {name:<{width}}  {100 * value:6.2f}')
  lines.append(f'  {"mIoU":<{width}}  {100 * metrics["miou"]:6.2f}')
  lines.append(f'  {"pixel acc":<{width}}  {100 * metrics["pixel_accuracy"]:6.2f}')
  lines.append(f'  {"mean acc":<{width}}  {100 * metrics["mean_accuracy"]:6.2f}')
  return '\n'.join(lines)


def evaluate_and_report() -> None:
  """The standalone program: evaluates as the flags say, prints the table, writes the JSON."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from skd_jax import train  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  workdir = as_path(fl.workdir)
  start = time.time()
  result = train.evaluate_checkpoint(fl.config, workdir, checkpoint=fl.checkpoint, which=fl.model,
                                     export_dir=fl.export_dir, export_color=fl.export_color)
  if jax.process_index() != 0:
    return
  print(format_table(result['metrics'], f'{result["name"]} on {result["split"]} '
                     f'({result["num_images"]} images, {result["inference"]}, '
                     f'{time.time() - start:.0f} s):'))
  if result['split'].startswith('test'):
    print('(the Cityscapes test labels are placeholders: these scores mean nothing; submit the '
          'exported PNGs to the server instead)')
  if result.get('export_dir'):
    print(f'wrote {result["num_exported"]} label-id PNGs to {result["export_dir"]}'
          + (f' and colour PNGs to {result["color_dir"]}' if result.get('color_dir') else ''))
  out = workdir / f'eval_{fl.model}_{result["split"]}.json'
  workdir.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(result['metrics'], inference=result['inference'],
                                 confusion_matrix=result['confusion'].tolist()), indent=2))
  print(f'wrote {out}')


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from skd_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.run(evaluate_and_report)


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from skd_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'The run directory.')
  flags.DEFINE_string('checkpoint', None, 'A checkpoint to evaluate instead of the run\'s own.')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which network to evaluate.')
  flags.DEFINE_string('export_dir', None,
                      'Also write each image\'s prediction here as a Cityscapes label-id PNG, '
                      '<city>_<seq>_<frame>_leftImg8bit.png (the test-server format).')
  flags.DEFINE_bool('export_color', False,
                    'With --export_dir: also write colour visualisations to <export_dir>_color.')
  cli.define_multihost_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_flags)
