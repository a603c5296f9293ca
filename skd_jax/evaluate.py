r"""Evaluation: whole-image inference and mIoU from one confusion matrix over the split.

As the reference: logits at 1/8 resolution are upsampled (bilinear, align_corners=True) to the
label size, the argmax is the prediction, and one confusion matrix is accumulated on device over the
whole split (pixels labelled 255 and padded examples ignored). ``IoU_c = TP / (TP + FP + FN)``,
mIoU the mean over the classes.

Standalone:

    python -m skd_jax.evaluate --config=configs/cityscapes.py --workdir=DIR \
        [--checkpoint=PATH] [--model=student|teacher]

evaluates the best (else the latest) checkpoint of the run in DIR, or `--checkpoint`, or, with
``--model=teacher``, the config's teacher; prints the per-class IoU table and writes it as JSON.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skd_jax import ops
from skd_jax import sharding as sharding_lib


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


def predict_logits(model, variables, images: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Whole-image inference: logits [N, h, w, C] upsampled to [N, *out_hw, C] in float32."""
  logits, _, _ = model.apply(variables, images, train=False)
  return ops.resize_bilinear(logits.astype(jnp.float32), out_hw)


def eval_step(variables, batch: dict[str, jax.Array], confusion: jax.Array, *, model,
              num_classes: int, ignore_label: int) -> jax.Array:
  """Adds one batch ({'image', 'label', 'mask'}) to the running confusion matrix."""
  logits = predict_logits(model, variables, batch['image'], batch['label'].shape[1:3])
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return confusion + confusion_matrix(pred, batch['label'], batch['mask'], num_classes,
                                      ignore_label)


def make_evaluator(model, mesh, *, num_classes: int, ignore_label: int = 255
                   ) -> Callable[[Any, Iterable[dict[str, np.ndarray]]], np.ndarray]:
  """A function (variables, host batches) -> confusion matrix over all of them, as NumPy.

  The step is jitted once: variables and the confusion matrix replicated, the batch sharded.
  """
  step = jax.jit(
      functools.partial(eval_step, model=model, num_classes=num_classes,
                        ignore_label=ignore_label),
      out_shardings=sharding_lib.replicated(mesh), donate_argnums=(2,))

  def evaluate(variables, batches: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    confusion = jax.device_put(jnp.zeros((num_classes, num_classes), jnp.int32),
                               sharding_lib.replicated(mesh))
    for batch in batches:
      batch = {k: batch[k] for k in ('image', 'label', 'mask')}
      confusion = step(variables, sharding_lib.global_batch(batch, mesh), confusion)
    return np.asarray(jax.device_get(confusion))

  return evaluate


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


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from skd_jax import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = pathlib.Path(flags.FLAGS.workdir)
  start = time.time()
  result = train.evaluate_checkpoint(config, workdir, checkpoint=flags.FLAGS.checkpoint,
                                     which=flags.FLAGS.model)
  print(format_table(result['metrics'], f'{result["name"]} on {result["split"]} '
                     f'({result["num_images"]} images, {time.time() - start:.0f} s):'))
  out = workdir / f'eval_{flags.FLAGS.model}_{result["split"]}.json'
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result['metrics'], indent=2))
    print(f'wrote {out}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'The run directory.')
  flags.DEFINE_string('checkpoint', None, 'A checkpoint to evaluate instead of the run\'s own.')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which network to evaluate.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
