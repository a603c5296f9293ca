"""The evaluation pass, pure JAX: one confusion matrix over a split, its metrics and table.

The prediction is the argmax of the averaged logits. One confusion matrix is accumulated on device
over the whole split (pixels labelled 255 and padded examples ignored); the batch is sharded over
the mesh and the matrix replicated, so it is global over devices and hosts.
``IoU_c = TP / (TP + FP + FN)``, mIoU the mean over the classes.

"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skd_jax import sharding as sharding_lib
from skd_jax.inference import InferenceMode, predict


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
