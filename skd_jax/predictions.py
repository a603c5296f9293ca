"""Prediction files: Cityscapes test-server PNGs of label ids and colour renderings.

`PredictionExporter` is an `on_predictions` of `evaluator.make_evaluator`: each image of the split
becomes ``<export_dir>/<city>_<seq>_<frame>_leftImg8bit.png``, one 8-bit grey channel of Cityscapes
label ids (train ids mapped back), the format and name the official `cityscapesscripts` evaluation
and the test server read; colour renderings go to the sibling folder ``<export_dir>_color`` (not
inside it: the official script searches it recursively and rejects a second PNG whose name starts
with an image's id).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from PIL import Image

from skd_jax.data import cityscapes
from skd_jax.data import pipeline
from skd_jax.data import spec
from skd_jax.paths import as_path


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
        _write_png(self.color_dir / name, spec.colorize(train_ids, self._palette))
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
  return PredictionExporter(export_dir, pipeline.example_ids(data_dir, split),
                            label_ids=cityscapes.TRAIN_ID_TO_LABEL_ID,
                            palette=cityscapes.PALETTE, color_dir=color_dir)
