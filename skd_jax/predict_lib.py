"""Prediction on a user's own images: find and read them, batch them by size, write three PNGs each.

What `python -m skd_jax.predict` runs (`predict_images`). Per image, under ``OUT``:

  labels/<name>.png   one 8-bit grey channel: the train id of each pixel (0..C-1, the argmax of the
                      logits), or with ``label_ids=True`` the dataset's own label ids (Cityscapes:
                      the 34 raw ids, the test server's format), 16-bit where they exceed 255;
  color/<name>.png    RGB, each pixel its class's colour in the dataset's palette;
  overlay/<name>.png  RGB, ``round((1 - opacity) * photo + opacity * colour)``.

``<name>`` is the image's path relative to the folder or glob it was found through (a file given
by itself: its file name), without its extension: ``leftImg8bit/val/`` keeps the city subfolders
and the ``<city>_<seq>_<frame>_leftImg8bit`` names the Cityscapes server reads.

Images are decoded by Pillow (JPEG, PNG, and whatever else it reads; grey, palette and RGBA files
become RGB, the alpha dropped), turned upright by their EXIF orientation (as a photo viewer shows
them; training data has none), at any size. The network sees exactly what `evaluate` would:
the config's normalisation, its inference mode (whole image, sliding window, scales, flip, at the
image's own size) and the argmax, through `export.serving_fn` (which calls `inference.predict`).

Mixed sizes are **grouped by size**, not padded: each batch holds images of one size only. Padding
to a common size would change the prediction (the network's receptive field and the pyramid
pooling's global averages would see the padding, and the logits' align_corners upsampling depends
on the input size), so a padded image would not get the labels `evaluate` gives it. A group's last
partial batch is filled up (with copies of its last image, rows being independent in inference) to
the next power of two, so a size compiles at most log2(batch_size) + 1 times. The cost: one
compilation per distinct size, which on a folder of photos of all different sizes dominates;
resize them to a few sizes first for speed.

An image that cannot be read (corrupt, truncated, not an image) is reported by name and skipped;
the others are written, and `predict_images` ends with `ImagesFailed` saying how many and which.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageOps
import tensorflow as tf

from skd_jax import experiment
from skd_jax import export as export_lib
from skd_jax import inference
from skd_jax.data import datasets
from skd_jax.data import pipeline
from skd_jax.data import spec
from skd_jax.paths import as_path

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
OUTPUT_DIRS = ('labels', 'color', 'overlay')
DEFAULT_OPACITY = 0.5
# Pillow's errors for a file that is not a readable image (SyntaxError: some broken PNG chunks).
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError)
_GLOB_CHARS = frozenset('*?[')


class ImagesFailed(ValueError):
  """Some images could not be read: they were skipped, the others written. Exit status 2."""
  exit_code = 2


@dataclasses.dataclass(frozen=True)
class InputImage:
  """An image to predict: where it is, and the name of its outputs (relative, no extension)."""
  path: str
  name: str


# ---------------------------------------------------------------------------------------------
# Finding the images.


def _stem(relative: str) -> str:
  return os.path.splitext(relative.replace(os.sep, '/'))[0]


def _glob_root(pattern: str) -> str:
  """The folder of `pattern` above its first wildcard component ('' if the first is one)."""
  parts = pattern.split('/')
  fixed = []
  for part in parts[:-1]:
    if _GLOB_CHARS & set(part):
      break
    fixed.append(part)
  return '/'.join(fixed)


def _images_in_folder(folder: str) -> tuple[list[InputImage], int]:
  """The images (by extension) under `folder`, recursively, and the count of other files."""
  found, others = [], 0
  for root, _, names in sorted(tf.io.gfile.walk(folder)):
    for name in sorted(names):
      path = os.path.join(root, name)
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(InputImage(path, _stem(os.path.relpath(path, folder))))
      else:
        others += 1
  return found, others


def find_images(inputs: Sequence[str]) -> list[InputImage]:
  """The images that `inputs` (files, folders, globs) name, each once, in the order given.

  A folder is searched recursively for .jpg, .jpeg and .png files (any case); a file given by
  itself or matched by a glob is read whatever its extension. A ValueError names an input that
  matches nothing, and two images whose outputs would have the same name.
  """
  if not inputs:
    raise ValueError('give the images to predict: files, folders or globs after the flags '
                     '(e.g. `photos/*.jpg`) or as --input=PATH (repeatable).')
  images: list[InputImage] = []
  for given in inputs:
    if tf.io.gfile.isdir(given):
      found, others = _images_in_folder(given)
      if others:
        logging.info('%s: %d files that are not %s left out', given, others,
                     '/'.join(IMAGE_EXTENSIONS))
      if not found:
        raise ValueError(f'--input={given}: no {"/".join(IMAGE_EXTENSIONS)} file in this folder '
                         f'(searched recursively); give a folder of images, files or a glob.')
    elif _GLOB_CHARS & set(given):
      root = _glob_root(given)
      found = [InputImage(p, _stem(os.path.relpath(p, root or '.')))
               for p in sorted(tf.io.gfile.glob(given)) if not tf.io.gfile.isdir(p)]
      if not found:
        raise ValueError(f'--input={given}: the pattern matches no file (from {os.getcwd()}).')
    elif tf.io.gfile.exists(given):
      found = [InputImage(given, _stem(os.path.basename(given)))]
    else:
      raise ValueError(f'--input={given}: no such file or folder (from {os.getcwd()}); give '
                       f'image files, folders of images or a glob.')
    images.extend(found)
  unique, by_name = [], {}
  for image in images:
    key = os.path.abspath(image.path) if '://' not in image.path else image.path
    other = by_name.get(image.name)
    if other is not None and other[0] == key:
      continue   # the same file through two inputs
    if other is not None:
      raise ValueError(f'{other[1]} and {image.path} would both be written as {image.name}.png: '
                       f'rename one, or give their folders so that their outputs keep the '
                       f'subfolders apart.')
    by_name[image.name] = (key, image.path)
    unique.append(image)
  return unique


# ---------------------------------------------------------------------------------------------
# Reading and grouping.


def _open(path: str) -> Image.Image:
  with tf.io.gfile.GFile(path, 'rb') as f:
    return Image.open(io.BytesIO(f.read()))


def image_size(path: str) -> tuple[int, int]:
  """(height, width) of the upright image, from its header (no pixels decoded)."""
  with _open(path) as image:
    width, height = image.size
    # EXIF orientations 5..8 rotate by 90 degrees (`ImageOps.exif_transpose`).
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
      width, height = height, width
  return height, width


def read_image(path: str) -> np.ndarray:
  """The image at `path` as uint8 RGB [H, W, 3], upright by its EXIF orientation."""
  with _open(path) as image:
    upright = ImageOps.exif_transpose(image)
    return np.asarray(upright.convert('RGB'))


def reason(error: BaseException) -> str:
  """Why an image could not be read, in a few words."""
  if isinstance(error, Image.UnidentifiedImageError):
    return 'not an image file that Pillow can decode'   # its text names a BytesIO object
  return ' '.join(str(error).split()) or type(error).__name__


def batch_rows(count: int, batch_size: int) -> int:
  """Rows of a batch that holds `count` images: the next power of two, at most `batch_size`."""
  return min(batch_size, 1 << max(count - 1, 0).bit_length())


def size_batches(sized: Sequence[tuple[InputImage, tuple[int, int]]], batch_size: int
                 ) -> list[list[InputImage]]:
  """Batches of at most `batch_size` images of one size, the sizes in order of first appearance."""
  groups: dict[tuple[int, int], list[InputImage]] = {}
  for image, size in sized:
    groups.setdefault(size, []).append(image)
  return [group[i:i + batch_size] for group in groups.values()
          for i in range(0, len(group), batch_size)]


# ---------------------------------------------------------------------------------------------
# The network.


@dataclasses.dataclass(frozen=True)
class Predictor:
  """What predicts, and what the outputs need to know about its classes.

  Attributes:
    labels: uint8 RGB images [N, H, W, 3] -> train ids [N, H, W] (asynchronous: a jax.Array).
    dataset: the dataset whose classes it predicts (``config.data.dataset``).
    num_classes: C.
    palette: [C, 3] uint8 RGB colour of each class.
    description: the network, its source and its inference, for the log.
    input_shape: (N, H, W) of an export, each an int where fixed, None where any.
  """
  labels: Callable[[np.ndarray], jax.Array]
  dataset: str
  num_classes: int
  palette: np.ndarray
  description: str
  input_shape: tuple[int | None, int | None, int | None] = (None, None, None)


def generated_palette(num_classes: int) -> np.ndarray:
  """[C, 3] uint8 distinct colours, for classes the dataset's palette does not cover.

  Class c's bits, three at a time, go to the high bits of red, green and blue (the PASCAL VOC
  scheme): 0 is black, neighbouring ids get very different colours.
  """
  palette = np.zeros((num_classes, 3), np.uint8)
  for c in range(num_classes):
    value, shift = c, 7
    while value:
      for channel in range(3):
        palette[c, channel] |= ((value >> channel) & 1) << shift
      value >>= 3
      shift -= 1
  return palette


def class_palette(dataset: str, num_classes: int) -> np.ndarray:
  """The dataset's palette, or `generated_palette` when it has other classes than the network."""
  palette = np.asarray(pipeline.dataset_info(dataset).palette, np.uint8)
  if len(palette) == num_classes:
    return palette
  logging.warning('the %s palette has %d colours, the network %d classes: colours generated',
                  dataset, len(palette), num_classes)
  return generated_palette(num_classes)


def label_id_table(dataset: str, num_classes: int) -> np.ndarray:
  """[C] the dataset's label id of each train id: the smallest stored value that maps to it.

  Inverts the dataset's table (``datasets.Dataset.label_lut``); Cityscapes: its
  ``TRAIN_ID_TO_LABEL_ID`` (7 road, 8 sidewalk, ...).
  """
  lut = datasets.get(dataset).label_lut
  table = []
  for train_id in range(num_classes):
    values = np.flatnonzero(lut == train_id)
    if not len(values):
      raise ValueError(f'--label_ids: the {dataset} table has no label id for train id '
                       f'{train_id} (the network predicts {num_classes} classes, the dataset has '
                       f'{int((lut != spec.IGNORE_LABEL).sum())}); write train ids instead '
                       f'(leave out --label_ids).')
    table.append(values[0])
  return np.asarray(table, np.int32)


def describe_network(fields: dict[str, Any]) -> str:
  """E.g. 'Segmenter ResNet-18, psp head, width x0.0625' from `export.network_fields`."""
  return (f'{fields.get("module")} ResNet-{fields.get("depth")}, {fields.get("head")} head, '
          f'width x{fields.get("width_multiplier")}')


def is_serving_export(path: str) -> bool:
  return tf.io.gfile.exists(os.path.join(path, export_lib.METADATA_FILE)) and not \
      tf.io.gfile.exists(os.path.join(path, 'skd_jax.json'))


def _platform() -> str:
  return {'gpu': 'cuda'}.get(jax.default_backend(), jax.default_backend())


def export_predictor(path: str) -> Predictor:
  """A `Predictor` from a folder of `skd_jax.export` (its jax_exported.bin and model.json)."""
  meta = json.loads(tf.io.gfile.GFile(os.path.join(path, export_lib.METADATA_FILE)).read())
  binary = os.path.join(path, export_lib.JAX_FILE)
  if not tf.io.gfile.exists(binary):
    raise ValueError(f'--checkpoint={path}: this export has no {export_lib.JAX_FILE} (only '
                     f'{", ".join(meta.get("files", {}).values()) or "model.json"}); export '
                     f'again with --formats=jax.')
  with tf.io.gfile.GFile(binary, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  if _platform() not in exported.platforms:
    raise ValueError(f'--checkpoint={path} was exported for {", ".join(exported.platforms)}, '
                     f'not for this machine\'s {_platform()}: export again with '
                     f'--platforms={_platform()}.')
  shape = tuple(None if jax.export.is_symbolic_dim(d) else int(d)
                for d in exported.in_avals[0].shape[:3])
  num_classes = len(meta['class_names'])
  palette = (np.asarray(meta['palette'], np.uint8) if meta.get('palette')
             else class_palette(meta['dataset'], num_classes))
  net = meta['network']
  call = jax.jit(lambda images: exported.call(images)['labels'])
  return Predictor(labels=call, dataset=meta['dataset'], num_classes=num_classes, palette=palette,
                   description=f'{net.get("which", "network")} {describe_network(net)}, exported '
                               f'to {path} ({meta["normalization"]} normalisation, '
                               f'{meta["inference"]})',
                   input_shape=shape)


def model_predictor(config: ml_collections.ConfigDict, checkpoint: str,
                    which: str = 'student') -> Predictor:
  """A `Predictor` from a run's workdir (best, else latest), a step folder, a convert export or a
  PyTorch .pth, with the config's normalisation and inference (``config.eval``)."""
  mode = inference.InferenceMode(**inference.inference_options(config))
  if config.data.normalization not in pipeline.NORMALIZATIONS:
    raise ValueError(f'unknown data.normalization {config.data.normalization!r}, expected one of '
                     f'{pipeline.NORMALIZATIONS}')
  model, variables = export_lib.without_aux_head(
      *experiment.load_model(config, config[which], checkpoint))
  serve = export_lib.serving_fn(model, config.data.normalization, mode)
  variables = jax.device_put(variables)
  labels = jax.jit(lambda v, images: serve(v, images)['labels'])
  num_classes = config.data.num_classes
  return Predictor(labels=lambda images: labels(variables, images), dataset=config.data.dataset,
                   num_classes=num_classes,
                   palette=class_palette(config.data.dataset, num_classes),
                   description=f'{which} {describe_network(export_lib.network_fields(model))} '
                               f'from {checkpoint} '
                               f'({config.data.normalization} normalisation, {mode.describe()})')


def check_source(checkpoint: str, config: ml_collections.ConfigDict | None) -> None:
  """A ValueError naming `checkpoint` if it is missing, or needs the `config` not given."""
  if not checkpoint:
    raise ValueError('give the network: --checkpoint=a run\'s workdir, a step folder, an export '
                     'of `skd_jax.export` or `skd_jax.convert`, or a PyTorch .pth')
  if not tf.io.gfile.exists(checkpoint):
    raise ValueError(f'--checkpoint={checkpoint}: no such file or folder (from {os.getcwd()}); '
                     f'give a run\'s workdir, a step folder, an export of `skd_jax.export` or '
                     f'`skd_jax.convert`, or a PyTorch .pth.')
  if config is None and not (tf.io.gfile.isdir(checkpoint) and is_serving_export(checkpoint)):
    raise ValueError(f'--checkpoint={checkpoint} is a network\'s weights: give its training '
                     f'config too (--config=configs/....py: classes, normalisation, inference).')


def load_predictor(checkpoint: str, config: ml_collections.ConfigDict | None,
                   which: str = 'student') -> Predictor:
  """The `Predictor` of `checkpoint`: an `skd_jax.export` folder, or what `experiment.load_model`
  reads (which needs the training config)."""
  check_source(checkpoint, config)
  if tf.io.gfile.isdir(checkpoint) and is_serving_export(checkpoint):
    return export_predictor(checkpoint)
  return model_predictor(config, checkpoint, which)


# ---------------------------------------------------------------------------------------------
# The outputs.


def colour_mask(train_ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """[H, W] train ids -> [H, W, 3] uint8 RGB in `palette`."""
  return spec.colorize(train_ids, palette)


def overlay(photo: np.ndarray, mask: np.ndarray, opacity: float) -> np.ndarray:
  """``round((1 - opacity) * photo + opacity * mask)``, [H, W, 3] uint8."""
  blend = (1.0 - opacity) * photo.astype(np.float32) + opacity * mask.astype(np.float32)
  return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def label_map(train_ids: np.ndarray, id_table: np.ndarray | None) -> np.ndarray:
  """The label PNG's pixels: train ids, or `id_table[train_ids]`; uint8, uint16 above 255."""
  values = train_ids if id_table is None else id_table[train_ids]
  return values.astype(np.uint8 if values.max(initial=0) < 256 else np.uint16)


def _write_png(path, pixels: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  path.write_bytes(buffer.getvalue())


def write_outputs(out_dir, name: str, photo: np.ndarray, train_ids: np.ndarray,
                  palette: np.ndarray, id_table: np.ndarray | None, opacity: float) -> None:
  """The three PNGs of one image (see the module docstring)."""
  mask = colour_mask(train_ids, palette)
  labels_dir, color_dir, overlay_dir = (out_dir / d for d in OUTPUT_DIRS)
  _write_png(labels_dir / f'{name}.png', label_map(train_ids, id_table))
  _write_png(color_dir / f'{name}.png', mask)
  _write_png(overlay_dir / f'{name}.png', overlay(photo, mask, opacity))


# ---------------------------------------------------------------------------------------------
# The program.


def _fits(size: tuple[int, int], input_shape) -> str | None:
  """Why an export of `input_shape` cannot take an image of `size`, or None."""
  fixed_h, fixed_w = input_shape[1:3]
  if (fixed_h is not None and size[0] != fixed_h) or (fixed_w is not None and size[1] != fixed_w):
    return (f'its size is {size[0]}x{size[1]}, the export takes only '
            f'{fixed_h or "any"}x{fixed_w or "any"} (export with --input_shape=b,h,w)')
  return None


def predict_images(inputs: Sequence[str], out: str, *, checkpoint: str,
                   config: ml_collections.ConfigDict | None = None, which: str = 'student',
                   label_ids: bool = False, opacity: float = DEFAULT_OPACITY,
                   batch_size: int | None = None) -> dict[str, Any]:
  """Predicts every image of `inputs` and writes its three PNGs under `out`.

  The flags are checked before the network is read. Returns {'written': n, 'failed': [(path,
  why)]}; raises `ImagesFailed` (after writing all the others) if any image could not be read.
  """
  if not 0.0 <= opacity <= 1.0:
    raise ValueError(f'--opacity={opacity}: give the colour mask\'s weight in the overlay, from '
                     f'0 (the photo) to 1 (the mask alone).')
  if batch_size is not None and batch_size < 1:
    raise ValueError(f'--batch_size={batch_size}: give a positive number of images per batch.')
  images = find_images(inputs)
  check_source(checkpoint, config)
  # The user gives these files deliberately: no limit on their size (Pillow's default refuses
  # images above 179 M pixels as a "decompression bomb").
  Image.MAX_IMAGE_PIXELS = None
  out_dir = export_lib.writable_dir(out)
  predictor = load_predictor(checkpoint, config, which)
  id_table = label_id_table(predictor.dataset, predictor.num_classes) if label_ids else None
  batch_size = (predictor.input_shape[0] or batch_size
                or (config.eval.batch_size if config is not None else 8))
  print(f'{len(images)} images, {predictor.description}', flush=True)

  failed: list[tuple[str, str]] = []

  def fail(path: str, why: str) -> None:
    failed.append((path, why))
    print(f'skipped {path}: {why}', file=sys.stderr, flush=True)

  sized = []
  for image in images:
    try:
      size = image_size(image.path)
    except _UNREADABLE as e:
      fail(image.path, f'cannot read the image ({reason(e)})')
      continue
    mismatch = _fits(size, predictor.input_shape)
    if mismatch:
      fail(image.path, mismatch)
    else:
      sized.append((image, size))

  written = 0
  start = last_report = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:

    def decode(image):
      try:
        return read_image(image.path)
      except _UNREADABLE as e:
        fail(image.path, f'cannot read the image ({reason(e)})')
        return None

    def write(batch, photos, labels) -> int:
      labels = np.asarray(labels)
      list(pool.map(lambda i: write_outputs(out_dir, batch[i].name, photos[i], labels[i],
                                            predictor.palette, id_table, opacity),
                    range(len(batch))))
      return len(batch)

    pending = None   # the previous batch, whose labels the device may still be computing
    for batch in size_batches(sized, batch_size):
      photos = list(pool.map(decode, batch))
      good = [i for i, p in enumerate(photos) if p is not None]
      if good:
        batch, photos = [batch[i] for i in good], [photos[i] for i in good]
        rows = predictor.input_shape[0] or batch_rows(len(photos), batch_size)
        stacked = np.stack(photos + [photos[-1]] * (rows - len(photos)))
        labels = predictor.labels(stacked)   # dispatched: runs while the previous batch is written
      if pending is not None:
        written += write(*pending)
        pending = None
      if good:
        pending = (batch, photos, labels)
      now = time.perf_counter()
      if now - last_report >= 1.0:
        last_report = now
        print(f'{written + len(failed)}/{len(images)} images ({len(failed)} failed), '
              f'{written / (now - start):.2f} images/s', flush=True)
    if pending is not None:
      written += write(*pending)
  seconds = time.perf_counter() - start
  print(f'{written + len(failed)}/{len(images)} images ({len(failed)} failed), '
        f'{written / max(seconds, 1e-9):.2f} images/s; wrote {written} x '
        f'{"/".join(OUTPUT_DIRS)} PNGs to {out_dir}', flush=True)
  if failed:
    names = ', '.join(path for path, _ in failed[:5]) + (
        f' and {len(failed) - 5} more' if len(failed) > 5 else '')
    raise ImagesFailed(f'{len(failed)} of {len(images)} images could not be predicted and were '
                       f'skipped ({names}: see the "skipped" lines above); the other {written} '
                       f'were written to {out_dir}.')
  return {'written': written, 'failed': failed}
