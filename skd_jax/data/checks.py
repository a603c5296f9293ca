"""Data checked where it enters: after preparation, before any training step.

`take_census` reads every example of every split of a prepared dataset once: both files must
decode with the decoders training uses (a damaged one is named by its place in the downloads,
``archive.zip:member`` for Cityscapes), a label map must have its image's size, and the stored
label values are counted per value. The census is written beside the prepared data
(`CENSUS_FILE`), so later runs read it instead of the splits (`load_or_take_census`).

The checks then compare it with a run's config:
  - `check_labels`: stored label values outside the dataset's table (which training and
    evaluation would silently turn into "ignore") are counted per value and reported, an error
    above ``data.unknown_label_tolerance`` (a fraction of the pixels), a warning below it; a
    split with no trainable pixel at all, and a class count other than the table's, are errors;
  - `check_crop`: a training crop larger than the images is a warning with the sizes and the
    share of each crop that is then padding.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from skd_jax.data import datasets
from skd_jax.data import pipeline
from skd_jax.paths import as_path
from skd_jax.data import spec as spec_lib

CENSUS_FILE = 'skd_jax_census.json'
_BATCH = 32   # examples decoded at once (bounded memory: full Cityscapes images are 6 MB each)


def _census_path(data_dir: str, dataset: str):
  builder = pipeline.prepared_builder(data_dir, dataset)
  return as_path(os.fspath(builder.data_dir)) / CENSUS_FILE


def _tf_message(error: tf.errors.OpError) -> str:
  # '{{function_node ...}} Invalid PNG data, size 12354 [Op:DecodeJpeg]' -> 'Invalid PNG data'
  text = re.sub(r'\{\{[^}]*\}\}|\[Op:[^\]]*\]', '', error.message.splitlines()[0])
  return text.split(', size')[0].strip()


def _inspect(example: tuple[str, bytes, bytes]) -> dict[str, Any]:
  """One example's label histogram [256] and sizes, or which of its files does not decode."""
  image_id, image_bytes, label_bytes = example
  result = {'id': image_id}
  for which, decode, data in (('image', pipeline.decode_image, image_bytes),
                              ('label', pipeline.decode_label, label_bytes)):
    try:
      result[which] = decode(data)
    except tf.errors.InvalidArgumentError as e:
      return dict(result, error=(which, _tf_message(e)))
  image, label = result.pop('image'), result.pop('label')
  return dict(result, image_hw=image.shape[:2], label_hw=label.shape,
              counts=np.bincount(label.ravel(), minlength=256))


def _split_census(data_dir: str, split: str, dataset: str, sources, workers: int
                  ) -> tuple[dict[str, Any], list[str]]:
  """(census of one split, the damaged files of it)."""
  counts = np.zeros((256,), np.int64)
  lo = np.array([np.iinfo(np.int64).max] * 2)
  hi = np.zeros((2,), np.int64)
  damaged, num = [], 0
  examples = pipeline.encoded_examples(data_dir, split, dataset)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    while True:
      batch = [e for _, e in zip(range(_BATCH), examples)]
      if not batch:
        break
      for result in pool.map(_inspect, batch):
        num += 1
        image_source, label_source = sources(split, result['id'])
        if 'error' in result:
          which, message = result['error']
          damaged.append(f'{image_source if which == "image" else label_source} ({message})')
          continue
        if tuple(result['image_hw']) != tuple(result['label_hw']):
          damaged.append(
              f'{label_source} is {result["label_hw"][0]}x{result["label_hw"][1]} but its image '
              f'{image_source} is {result["image_hw"][0]}x{result["image_hw"][1]}')
          continue
        counts += result['counts']
        lo = np.minimum(lo, result['image_hw'])
        hi = np.maximum(hi, result['image_hw'])
  census = {'num_examples': num,
            'label_counts': {str(v): int(n) for v, n in enumerate(counts) if n},
            'image_min': [int(x) for x in lo] if num else None,
            'image_max': [int(x) for x in hi] if num else None}
  return census, damaged


def take_census(data_dir: str, dataset: str, manual_dir: str, *,
                workers: int | None = None) -> dict[str, Any]:
  """Decodes every example of every split of a prepared dataset; {split: its census}.

  Raises:
    ValueError: files that do not decode or whose label map has another size than the image,
      named by where they came from (`spec_lib.Dataset.sources`), with what to do.
  """
  spec = datasets.get(dataset)
  builder = pipeline.prepared_builder(data_dir, dataset)
  sources = spec.sources(manual_dir)
  workers = workers or min(16, os.cpu_count() or 1)
  census, damaged = {}, []
  for split in builder.info.splits:
    logging.info('Checking that every example of split %s of %s decodes (once, after '
                 'preparation)', split, spec.builder_name)
    census[str(split)], bad = _split_census(data_dir, str(split), dataset, sources, workers)
    damaged += bad
  if damaged:
    more = f' and {len(damaged) - 3} more' if len(damaged) > 3 else ''
    raise ValueError(
        f'{len(damaged)} example(s) of {dataset} cannot be read: {"; ".join(damaged[:3])}{more}. '
        f'Replace the damaged files in {manual_dir} (a partial download?), then delete the '
        f'prepared copy {builder.data_dir} so that it is prepared again.')
  return census


def load_or_take_census(data_dir: str, dataset: str, manual_dir: str) -> dict[str, Any]:
  """The census stored with the prepared data; taken (and stored) if there is none yet."""
  path = _census_path(data_dir, dataset)
  if path.exists():
    return json.loads(path.read_text())
  census = take_census(data_dir, dataset, manual_dir)
  partial = path.parent / (path.name + '.partial')
  try:
    partial.write_text(json.dumps(census, indent=1))
    partial.rename(path)   # a kill never leaves a truncated census
  except OSError as e:   # a prepared copy this user may only read: taken again next time
    logging.warning('could not store the data census in %s (%s): it is taken again by each run',
                    path, e)
  return census


def _describe_values(counts: dict[int, int], limit: int = 6) -> str:
  top = sorted(counts, key=lambda v: (-counts[v], v))
  text = ', '.join(f'{v} ({counts[v]:,} pixels)' for v in top[:limit])
  return text + (f' and {len(top) - limit} more values' if len(top) > limit else '')


def check_labels(census: dict[str, Any], dataset: str, num_classes: int,
                 tolerance: float) -> list[str]:
  """Checks a census against the dataset's table and the config; returns the warnings.

  Args:
    census: from `load_or_take_census`.
    dataset: config.data.dataset.
    num_classes: config.data.num_classes.
    tolerance: config.data.unknown_label_tolerance, the fraction of a split's label pixels that
      may hold values outside the table (they are ignored, with a warning).

  Raises:
    ValueError: more unknown values than `tolerance`, a split whose labels are all ignored, or
      a class count other than the table's.
  """
  spec = datasets.get(dataset)
  known = spec.known_values()
  warnings, present = [], set()
  for split, info in census.items():
    counts = {int(v): n for v, n in info['label_counts'].items()}
    total = sum(counts.values())
    unknown = {v: n for v, n in counts.items() if not known[v]}
    trainable = sum(n for v, n in counts.items() if spec.label_lut[v] != spec_lib.IGNORE_LABEL)
    present |= {int(spec.label_lut[v]) for v in counts
                if spec.label_lut[v] != spec_lib.IGNORE_LABEL}
    if unknown:
      share = sum(unknown.values()) / total
      where = f'the label maps of split {split} of {dataset} hold values outside its table'
      if share > tolerance:
        raise ValueError(
            f'{where}: {_describe_values(unknown)}, {share:.2%} of their pixels (more than '
            f'data.unknown_label_tolerance = {tolerance:g}); they would silently become '
            f'"ignore". Are these the labels of another dataset (config.data.dataset = '
            f'{dataset!r}), or train-id or colour maps instead of the stored label ids?')
      warnings.append(f'{where}: {_describe_values(unknown)}, {share:.4%} of their pixels '
                      f'(within data.unknown_label_tolerance = {tolerance:g}): they are '
                      'ignored in training and evaluation.')
    if total and not trainable and split == 'train':
      raise ValueError(
          f'every label pixel of split {split} of {dataset} is void or unknown (values '
          f'{_describe_values(counts)}): nothing to learn from. Are these the right label maps?')
  if num_classes != spec.info.num_classes:
    ids = f' (its labels hold train ids {min(present)}..{max(present)})' if present else ''
    raise ValueError(
        f'data.num_classes = {num_classes}, but {dataset} has {spec.info.num_classes} '
        f'classes{ids}: set --config.data.num_classes={spec.info.num_classes}.')
  return warnings


def check_crop(census: dict[str, Any], split: str, crop_size: Sequence[int],
               scales: Sequence[float]) -> str | None:
  """A warning when the training crop is larger than the images of `split` (at scale 1)."""
  info = census.get(pipeline.split_name(split))
  if not info or not info['image_min']:
    return None
  crop_h, crop_w = (int(crop_size), int(crop_size)) if np.isscalar(crop_size) else map(
      int, crop_size)
  (min_h, min_w), (max_h, max_w) = info['image_min'], info['image_max']
  if crop_h <= min_h and crop_w <= min_w:
    return None
  scales = tuple(scales) or (1.0,)

  def padding(h, w, s):   # the share of a crop outside an image of h x w scaled by s
    return 1 - min(round(h * s), crop_h) * min(round(w * s), crop_w) / (crop_h * crop_w)
  least = padding(max_h, max_w, max(scales))
  most = padding(min_h, min_w, min(scales))
  return (f'data.crop_size {crop_h}x{crop_w} is larger than the images of split {split} '
          f'({min_h}x{min_w} to {max_h}x{max_w}, height x width): at scales {min(scales):g} to '
          f'{max(scales):g}, {least:.0%} to {most:.0%} of each crop is padding (ignored). A crop '
          'no larger than the images wastes none.')


__all__ = ['CENSUS_FILE', 'check_crop', 'check_labels', 'load_or_take_census', 'take_census']
