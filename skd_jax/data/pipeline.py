"""The host-side input pipeline: a tfds dataset -> tf.data -> NumPy batches.

Any dataset of `skd_jax.data.datasets` (Cityscapes, CamVid, Pascal VOC + SBD, ADE20K; every
function takes its name, 'cityscapes' by default). Preparation runs its tfds builder on the files
in the manual directory (for Cityscapes the real builder `cityscapes/semantic_segmentation` on the
two official archives, or the synthetic stand-ins from `skd_jax.data.synthetic`) and stores the
splits as ArrayRecord, which has random access. Reading then never goes through the builder's
image features (Cityscapes' declare 1024x2048 and so reject any other size): the encoded bytes are
read as they are (`tfds.decode.SkipDecoding`) and decoded here, images with `tf.io.decode_jpeg`
(which reads PNG too, and decodes JPEG with the accurate IDCT, as PIL and OpenCV do), label maps
with `tf.io.decode_png`; the dataset's lookup table turns the stored label values into train ids.

Training stream: the global batch of step t, and the augmentation of each of its examples, are a
pure function of (seed, t, position in the global batch) -- and of the split size and the global
batch size G, but not of how many processes or devices share the work:

  * an epoch is S = N // G steps; each epoch draws a permutation of the whole split from
    (seed, epoch) and takes its first S * G examples (so which examples an epoch leaves out
    changes from epoch to epoch, and never depends on where a run was resumed);
  * step t is batch t % S of epoch t // S: position j of its global batch is example
    permutation[(t % S) * G + j]; the augmentation of an example (scale, crop position, flip) is
    drawn from (seed, epoch, example index);
  * each process yields its rows of that global batch (`rows`: by default process p of P the
    block [p * B, (p + 1) * B), B = G / P; `skd_jax.sharding.process_rows` gives the rows a
    mesh's devices hold).

So 1 process, 8 devices and 2 processes of 4 devices train on the same batches, and
`start_step=s` starts the same stream at batch s, at the cost of one permutation of the split's
indices: nothing before it is read or decoded.

The iterators are `NumpyIterator`s: close them (or use them in a `with` block) to stop their
background threads early; any still open at interpreter exit are closed by an atexit hook, since
a tf.data pipeline that is still running Python code at shutdown aborts or hangs the process.
TensorFlow only runs here on the host CPU; it is hidden from accelerators on import.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import re
import shutil
import tempfile
import weakref
import zipfile
from typing import Callable, Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

try:
  # tf.data only: TensorFlow must not grab GPU memory that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # Devices already initialised, or no such device type.
  pass

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,g-bad-import-order

from skd_jax.data import datasets  # pylint: disable=g-bad-import-order
from skd_jax.data import spec as spec_lib
from skd_jax.data import builder as builder_lib

Batch = dict[str, np.ndarray]

# Caffe-style input of both reference codes: BGR, 0..255, minus this mean (B, G, R), no std.
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
# torchvision-style input: RGB / 255, minus the ImageNet mean, divided by its std (R, G, B).
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ('caffe_bgr', 'imagenet_rgb')


# ---------------------------------------------------------------------------------------------
# Preparation.


def _builder(data_dir: str, dataset: str = 'cityscapes', **kwargs) -> tfds.core.DatasetBuilder:
  # data_dir always passed: nothing goes to ~/tensorflow_datasets unless asked.
  return tfds.builder(datasets.get(dataset).builder_name, data_dir=os.fspath(data_dir), **kwargs)


def prepare_dataset(name: str, manual_dir: str, data_dir: str, *,
                    file_format: str = 'array_record') -> dict[str, int]:
  """Prepares the registered dataset `name` in `data_dir` from the files in `manual_dir`.

  Runs its tfds builder, offline. Does nothing when the dataset is already prepared in `data_dir`
  (the manual directory is then not needed); otherwise checks the manual directory first, so that
  a missing or incomplete one stops here with one message naming what is missing and where. What
  a builder extracts (the Cityscapes archives: 11 GB) goes to a temporary folder under `data_dir`
  (under the system's temporary directory when `data_dir` is remote), removed afterwards.

  Args:
    name: 'cityscapes', 'camvid', 'voc' or 'ade20k' (see `skd_jax.data.datasets`).
    manual_dir: the downloads, as the dataset's module describes.
    data_dir: tfds data directory to prepare into.
    file_format: 'array_record' (random access, what the training iterator wants) or 'tfrecord'
      (then read through an in-memory copy of each process's examples).

  Returns:
    {split name: number of examples}, split names as tfds has them ('train', 'validation',
    'test').
  """
  data_dir = os.fspath(data_dir)
  builder = _builder(data_dir, name, file_format=file_format)
  if not builder.is_prepared():
    datasets.get(name).check_manual_dir(manual_dir)
    tf.io.gfile.makedirs(data_dir)
    downloads = os.path.join(data_dir, 'downloads')
    had_downloads = tf.io.gfile.exists(downloads)
    # Extracted next to the data (same disk, which has room for it), unless that is remote.
    extract_dir = tempfile.mkdtemp(prefix=f'{name}_extracted_',
                                   dir=None if '://' in data_dir else data_dir)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir=os.fspath(manual_dir), extract_dir=extract_dir,
              try_download_gcs=False))
    finally:
      shutil.rmtree(extract_dir, ignore_errors=True)
      # tfds creates an (here unused) download folder; leave data_dir as clean as it was.
      if not had_downloads and tf.io.gfile.isdir(downloads) and not tf.io.gfile.listdir(downloads):
        tf.io.gfile.rmtree(downloads)
  else:
    logging.info('%s already prepared in %s', datasets.get(name).builder_name, data_dir)
  return {str(split): int(info.num_examples) for split, info in builder.info.splits.items()}


def prepare_cityscapes(manual_dir: str, data_dir: str, *,
                       file_format: str = 'array_record') -> dict[str, int]:
  """`prepare_dataset('cityscapes', ...)`: `manual_dir` holds leftImg8bit_trainvaltest.zip and
  gtFine_trainvaltest.zip."""
  return prepare_dataset('cityscapes', manual_dir, data_dir, file_format=file_format)


def tfds_split(split: str) -> str:
  """The tfds name of a split ('val' -> 'validation'; slices such as 'val[:10]' kept)."""
  # The datasets call it 'val'; tfds calls it 'validation'. Both work here, slices included.
  if split == 'val' or split.startswith('val['):
    return 'validation' + split[3:]
  return split


def prepared_builder(data_dir: str, dataset: str = 'cityscapes') -> tfds.core.DatasetBuilder:
  """The tfds builder of `dataset` prepared in `data_dir`; FileNotFoundError saying how if not."""
  builder = _builder(data_dir, dataset)
  if not builder.is_prepared():
    how = (f'call skd_jax.data.pipeline.prepare_dataset({dataset!r}, manual_dir, data_dir) first '
           '(config.data.dataset and config.data.manual_dir, in a training run)')
    if dataset == 'cityscapes':
      how = ('call skd_jax.data.pipeline.prepare_cityscapes(manual_dir, data_dir) first, or '
             '`python -m skd_jax.data.synthetic --out=MANUAL_DIR --data_dir=DATA_DIR` for '
             'synthetic data')
    raise FileNotFoundError(
        f'{datasets.get(dataset).builder_name} is not prepared in {data_dir} (looked for '
        f'{builder.data_path}): {how}.')
  return builder


def num_examples(data_dir: str, split: str, dataset: str = 'cityscapes') -> int:
  """Number of examples of a prepared split ('train', 'val' / 'validation', 'test', or a slice)."""
  return int(prepared_builder(data_dir, dataset).info.splits[tfds_split(split)].num_examples)


def image_sizes(data_dir: str, split: str, dataset: str = 'cityscapes') -> dict | None:
  """{'max': [H, W], 'uniform': bool} of a prepared split's images, as its builder recorded them
  (the builders of `skd_jax.data.datasets`); None when not recorded (Cityscapes)."""
  builder = prepared_builder(data_dir, dataset)
  split = tfds_split(split).split('[')[0]
  return (builder.info.metadata or {}).get(builder_lib.IMAGE_SIZES_KEY, {}).get(split)


def steps_per_epoch(num_examples_in_split: int, batch_size: int, process_count: int = 1) -> int:
  """Training steps per epoch: full global batches of `batch_size` * `process_count` examples."""
  return num_examples_in_split // (batch_size * process_count)


def num_eval_batches(num_examples_in_split: int, batch_size: int, process_count: int = 1) -> int:
  """Batches of one evaluation pass, the same for every process (short ones are padded)."""
  per_process = -(-num_examples_in_split // process_count)
  return -(-per_process // batch_size)


def split_name(split: str) -> str:
  """The tfds name of the whole split that `split` (a config's 'val', 'train[:100]', ...) is of."""
  return tfds_split(split).split('[')[0]


def encoded_examples(data_dir: str, split: str, dataset: str = 'cityscapes'
                     ) -> Iterator[tuple[str, bytes, bytes]]:
  """(image id, encoded image, encoded label map) of each example of a prepared split, in turn."""
  builder = prepared_builder(data_dir, dataset)
  spec = datasets.get(dataset)
  split = tfds_split(split)
  if 'array_record' in _file_formats(builder):
    source = builder.as_data_source(split, decoders=_skip_decoding(spec))
    examples = (source[i] for i in range(len(source)))
  else:
    examples = builder.as_dataset(split=split, decoders=_skip_decoding(spec),
                                  shuffle_files=False).as_numpy_iterator()
  for example in examples:
    yield _text(example[spec.id_key]), example[spec.image_key], example[spec.label_key]


def example_ids(data_dir: str, split: str, dataset: str = 'cityscapes') -> Callable[[int], str]:
  """Example index in a prepared split -> its image id (Cityscapes: '<city>_<seq>_<frame>').

  The index is the 'index' of `make_eval_iterator`'s batches: the id is read from the same source
  in the same order (ArrayRecord random access, else the split's stored order). Images and label
  maps stay encoded.
  """
  builder = prepared_builder(data_dir, dataset)
  spec = datasets.get(dataset)
  if 'array_record' in _file_formats(builder):
    source = builder.as_data_source(tfds_split(split), decoders=_skip_decoding(spec))
    return lambda index: _text(source[int(index)][spec.id_key])
  ids = [image_id for image_id, _, _ in encoded_examples(data_dir, split, dataset)]
  return lambda index: ids[int(index)]


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def decode_image(image_bytes: bytes) -> np.ndarray:
  """What training and evaluation decode from an encoded image: [H, W, 3] uint8 RGB. Raises
  `tf.errors.InvalidArgumentError` for a damaged file."""
  return _decode_image(tf.constant(image_bytes)).numpy()


def decode_label(label_png: bytes) -> np.ndarray:
  """What training and evaluation decode from an encoded label map: the stored values [H, W]
  uint8. Raises `tf.errors.InvalidArgumentError` for a damaged file."""
  return _decode_label(tf.constant(label_png)).numpy()


# ---------------------------------------------------------------------------------------------
# Random access to the encoded examples.


class _Source:
  """Random access to a split's encoded examples: `get(i)` -> (image PNG, label PNG) bytes."""

  def __len__(self) -> int:
    raise NotImplementedError

  def get(self, index: int) -> tuple[bytes, bytes]:
    raise NotImplementedError


def _skip_decoding(spec: spec_lib.Dataset) -> dict[str, tfds.decode.SkipDecoding]:
  return {spec.image_key: tfds.decode.SkipDecoding(), spec.label_key: tfds.decode.SkipDecoding()}


class _ArrayRecordSource(_Source):
  """Reads records on demand; array_record's reader is shared and thread-safe."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, spec: spec_lib.Dataset):
    self._source = builder.as_data_source(split, decoders=_skip_decoding(spec))
    self._keys = (spec.image_key, spec.label_key)

  def __len__(self) -> int:
    return len(self._source)

  def get(self, index: int) -> tuple[bytes, bytes]:
    example = self._source[int(index)]
    return example[self._keys[0]], example[self._keys[1]]


class _InMemorySource(_Source):
  """Holds the encoded examples of the indices in `keep` (a TFRecord preparation has no random
  access); reads the whole split once, decoding nothing."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, keep: Callable[[int], bool],
               spec: spec_lib.Dataset):
    logging.warning(
        '%s in %s is stored as %s, which has no random access: holding this process\'s encoded '
        'examples of split %r in memory. Prepare it with file_format="array_record" to avoid it.',
        spec.builder_name, builder.data_dir, builder.info.file_format, split)
    self._length = int(builder.info.splits[split].num_examples)
    self._examples: dict[int, tuple[bytes, bytes]] = {}
    ds = builder.as_dataset(split=split, decoders=_skip_decoding(spec), shuffle_files=False)
    for index, example in enumerate(ds.as_numpy_iterator()):
      if keep(index):
        self._examples[index] = (example[spec.image_key], example[spec.label_key])

  def __len__(self) -> int:
    return self._length

  def get(self, index: int) -> tuple[bytes, bytes]:
    return self._examples[int(index)]


def _open_source(data_dir: str, split: str, keep: Callable[[int], bool],
                 dataset: str = 'cityscapes') -> _Source:
  builder = prepared_builder(data_dir, dataset)
  spec = datasets.get(dataset)
  split = tfds_split(split)
  if 'array_record' in _file_formats(builder):
    return _ArrayRecordSource(builder, split, spec)
  return _InMemorySource(builder, split, keep, spec)


def _file_formats(builder: tfds.core.DatasetBuilder) -> set[str]:
  return {f.value for f in builder.info.available_file_formats()} | {
      builder.info.file_format.value}


# ---------------------------------------------------------------------------------------------
# Iterators that end cleanly.

# Iterators not yet closed. A tf.data pipeline still running Python (the record reads) when the
# interpreter shuts down aborts the process ("terminate called without an active exception",
# exit status 134); closing them first, while Python is intact, avoids that.
_LIVE_ITERATORS: weakref.WeakSet[NumpyIterator] = weakref.WeakSet()


class NumpyIterator:
  """Iterator over the NumPy batches of a tf.data pipeline, closed before the interpreter exits.

  `close()` (or leaving a `with` block) stops the pipeline's background work and frees its
  buffers; an iterator still open at exit is closed by an `atexit` hook.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = dataset.as_numpy_iterator()
    _LIVE_ITERATORS.add(self)

  def __iter__(self) -> NumpyIterator:
    return self

  def __next__(self) -> Batch:
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self) -> None:
    # Dropping the only reference destroys the tf.data iterator, which cancels its work and
    # waits for its threads.
    self._iterator = None

  def __enter__(self) -> NumpyIterator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE_ITERATORS):
    iterator.close()
  gc.collect()


# ---------------------------------------------------------------------------------------------
# Decoding and transforms (TensorFlow, per example).


def _fetch(source: _Source, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded (image, label) of example `index`, read in Python (the only non-TF step)."""

  def get(i):
    image_png, label_png = source.get(int(i))
    # Object arrays: NumPy's fixed-width bytes would drop trailing NUL bytes.
    return np.array(image_png, dtype=object), np.array(label_png, dtype=object)

  image_png, label_png = tf.numpy_function(get, [index], (tf.string, tf.string), stateful=False)
  image_png.set_shape([])
  label_png.set_shape([])
  return image_png, label_png


def _decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded image (PNG or JPEG) -> [H, W, 3] uint8 RGB."""
  # decode_jpeg reads PNGs too; for JPEGs, the accurate IDCT gives PIL's and OpenCV's pixels
  # (TensorFlow's default, the fast one, differs from them by up to a few levels).
  return tf.io.decode_jpeg(image_bytes, channels=3, dct_method='INTEGER_ACCURATE')


def _decode_label(label_png: tf.Tensor) -> tf.Tensor:
  """Label PNG -> raw ids [H, W] uint8."""
  return tf.io.decode_png(label_png, channels=1)[..., 0]


def _decode(image_bytes: tf.Tensor, label_png: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded image (PNG or JPEG), label PNG -> image [H, W, 3] uint8 RGB, raw ids [H, W] uint8."""
  return _decode_image(image_bytes), _decode_label(label_png)


def _to_train_ids(label_ids: tf.Tensor, label_lut: np.ndarray) -> tf.Tensor:
  """Raw label ids [...] (any integer dtype) -> train ids [...] int32, 255 for ignored ids.

  label_lut: [256] the dataset's train id of each stored value.
  """
  label_ids = tf.cast(label_ids, tf.int32)
  lut = tf.constant(label_lut, dtype=tf.int32)
  # uint8 PNGs cannot hold ids outside 0..255, but a wider dtype could: those are ignored too.
  valid = (label_ids >= 0) & (label_ids < lut.shape[0])
  train_ids = tf.gather(lut, tf.clip_by_value(label_ids, 0, lut.shape[0] - 1))
  return tf.where(valid, train_ids, spec_lib.IGNORE_LABEL)


def normalize(image: tf.Tensor, normalization: str) -> tf.Tensor:
  """RGB image [..., 3] (uint8 or float, 0..255) -> normalised float32 [..., 3].

  'caffe_bgr': channels reversed to BGR, minus CAFFE_BGR_MEAN, 0..255 scale (both reference
  codes). 'imagenet_rgb': RGB / 255, minus IMAGENET_RGB_MEAN, divided by IMAGENET_RGB_STD.
  """
  image = tf.cast(image, tf.float32)
  if normalization == 'caffe_bgr':
    return image[..., ::-1] - tf.constant(CAFFE_BGR_MEAN, tf.float32)
  if normalization == 'imagenet_rgb':
    return ((image / 255.0 - tf.constant(IMAGENET_RGB_MEAN, tf.float32))
            / tf.constant(IMAGENET_RGB_STD, tf.float32))
  raise ValueError(f'unknown normalization {normalization!r}, expected one of {NORMALIZATIONS}')


def _augment(image: tf.Tensor, label_ids: tf.Tensor, scale: tf.Tensor, offset_y: tf.Tensor,
             offset_x: tf.Tensor, flip: tf.Tensor, *, crop_size: tuple[int, int],
             normalization: str, label_lut: np.ndarray
             ) -> tuple[tf.Tensor, tf.Tensor]:
  """The reference training transform, image and label always together.

  Scale (image bilinear, label nearest; both with half-pixel centres, so they stay aligned),
  normalise, pad bottom / right up to the crop (image 0 after normalisation, label 255), crop at
  the drawn position, flip. Computed as scale, crop, normalise, pad, which gives the same values
  while normalising, padding and mapping ids only on the crop (at scale 2 a Cityscapes image is
  8.4 M pixels, the crop 0.26 M).

  Args:
    image: [H, W, 3] uint8 RGB.
    label_ids: [H, W] uint8 raw label ids.
    scale: scalar float32 factor.
    offset_y, offset_x: scalar float32 in [0, 1): crop position as a fraction of the free range.
    flip: scalar bool.
    crop_size: (height, width).
    normalization: see `normalize`.
    label_lut: [256] the dataset's train id of each raw label value.

  Returns:
    image [crop_h, crop_w, 3] float32 normalised, label [crop_h, crop_w] int32 train ids.
  """
  crop_h, crop_w = crop_size
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  # cv2.resize(fx=s, fy=s) of the reference rounds the new size to the nearest integer.
  new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
  image = tf.image.resize(image, new_size, method='bilinear')  # float32
  label_ids = tf.image.resize(label_ids[..., None], new_size, method='nearest')[..., 0]
  # The crop window lives in the padded image (padding is at the bottom / right only): its
  # position ranges over [0, max(new - crop, 0)].
  free_h = tf.maximum(new_size[0] - crop_h, 0) + 1
  free_w = tf.maximum(new_size[1] - crop_w, 0) + 1
  y0 = tf.minimum(tf.cast(offset_y * tf.cast(free_h, tf.float32), tf.int32), free_h - 1)
  x0 = tf.minimum(tf.cast(offset_x * tf.cast(free_w, tf.float32), tf.int32), free_w - 1)
  # Slicing stops at the image's edge: what is missing is the padding.
  image = normalize(image[y0:y0 + crop_h, x0:x0 + crop_w], normalization)
  label = _to_train_ids(label_ids[y0:y0 + crop_h, x0:x0 + crop_w], label_lut)
  pad_h = crop_h - tf.shape(label)[0]
  pad_w = crop_w - tf.shape(label)[1]
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=0.0)
  label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=spec_lib.IGNORE_LABEL)
  # Both branches are crop-sized: selecting is cheaper than a tf.cond here and needs no lambdas.
  image = tf.where(flip, image[:, ::-1], image)
  label = tf.where(flip, label[:, ::-1], label)
  image.set_shape([crop_h, crop_w, 3])
  label.set_shape([crop_h, crop_w])
  return image, label


# ---------------------------------------------------------------------------------------------
# The training stream.


def _entropy(seed: int) -> int:
  # SeedSequence takes non-negative integers; any Python int seed maps to one.
  return int(seed) % (1 << 64)


def epoch_order(seed: int, epoch: int, num_examples_in_split: int) -> np.ndarray:
  """Example indices [N] of epoch `epoch` in stream order, whatever the process count.

  The first `steps_per_epoch(...) * global batch size` of them are the epoch's examples.
  """
  rng = np.random.default_rng([_entropy(seed), 1, epoch])
  return rng.permutation(num_examples_in_split).astype(np.int64)


def augmentation_params(seed: int, epoch: int, index: int, *, scales: Sequence[float] | None,
                        scale_range: tuple[float, float] | None,
                        flip: bool) -> tuple[float, float, float, bool]:
  """(scale, crop offset y in [0, 1), crop offset x in [0, 1), flip) of one example in one epoch.

  Drawn from (seed, epoch, example index) alone, so they do not depend on batch composition,
  parallelism or where a run was resumed.
  """
  rng = np.random.default_rng([_entropy(seed), 2, epoch, index])
  if scale_range is not None:
    scale = rng.uniform(scale_range[0], scale_range[1])
  elif scales:
    scale = scales[int(rng.integers(len(scales)))]
  else:
    scale = 1.0
  offset_y, offset_x = rng.random(2)
  do_flip = bool(rng.random() < 0.5) if flip else False
  return float(scale), float(offset_y), float(offset_x), do_flip


def _pair(size: int | Sequence[int], name: str = 'crop_size') -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f'{name} must be an int or (height, width), got {size!r}')
  return size


def _check_process(process_index: int, process_count: int):
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')


def _global_rows(rows: Sequence[int] | None, batch_size: int, process_index: int,
                 process_count: int) -> np.ndarray:
  """This process's positions [batch_size] in the global batch of batch_size * process_count."""
  if rows is None:
    return np.arange(process_index * batch_size, (process_index + 1) * batch_size)
  rows = np.asarray(rows, np.int64)
  size = batch_size * process_count
  if rows.shape != (batch_size,) or rows.min() < 0 or rows.max() >= size or len(
      set(rows.tolist())) != batch_size:
    raise ValueError(f'rows must be {batch_size} distinct positions in [0, {size}), got '
                     f'{rows.tolist()}')
  return rows


def make_train_iterator(*, data_dir: str, split: str = 'train', batch_size: int,
                        crop_size: int | Sequence[int], scales: Sequence[float] | None,
                        flip: bool, normalization: str, seed: int, start_step: int = 0,
                        process_index: int = 0, process_count: int = 1,
                        rows: Sequence[int] | None = None,
                        scale_range: tuple[float, float] | None = None,
                        include_index: bool = False,
                        prefetch: int = 2, dataset: str = 'cityscapes') -> NumpyIterator:
  """Infinite iterator over this process's rows of the augmented global training batches.

  The stream is a pure function of (seed, step, position in the global batch) (see the module
  docstring); `start_step=s` yields exactly what a fresh iterator yields from its s-th batch
  (0-based) on, reading nothing before.

  Args:
    data_dir: tfds data directory with the dataset prepared (`prepare_dataset`).
    split: tfds split ('train', 'val', a slice like 'train[:100]', ...).
    batch_size: per-process batch size B (the global batch is B * process_count).
    crop_size: crop (height, width), or an int for a square crop.
    scales: random scale drawn uniformly from this list (reference: 0.7, 0.8, ..., 2.1); None or
      empty with no `scale_range`: no scaling.
    flip: random horizontal flip with p = 0.5.
    normalization: 'caffe_bgr' or 'imagenet_rgb' (see `normalize`).
    seed: data seed.
    start_step: the first step to yield.
    process_index, process_count: this process's place (jax.process_index(), jax.process_count()).
    rows: the B positions of the global batch this process yields, in order (default: block
      `process_index`; `skd_jax.sharding.process_rows` for a mesh).
    scale_range: (min, max): scale drawn uniformly from this range instead of from `scales`.
    include_index: also yield 'index' [B] int32, the example indices (for tests and debugging).
    prefetch: batches prepared ahead.
    dataset: the registered dataset to read (`skd_jax.data.datasets`; config.data.dataset).

  Yields:
    {'image': [B, crop_h, crop_w, 3] float32 normalised, 'label': [B, crop_h, crop_w] int32 train
    ids (255 ignored)}, plus 'index' [B] int32 with `include_index`.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'unknown normalization {normalization!r}, expected one of {NORMALIZATIONS}')
  if scales and scale_range is not None:
    raise ValueError('give either scales (a list) or scale_range (min, max), not both')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  _check_process(process_index, process_count)
  rows = _global_rows(rows, batch_size, process_index, process_count)
  global_batch = batch_size * process_count
  crop = _pair(crop_size)
  scales = tuple(float(s) for s in scales) if scales else None
  scale_range = tuple(float(s) for s in scale_range) if scale_range is not None else None
  # Any example may fall in this process's rows.
  source = _open_source(data_dir, split, lambda i: True, dataset)
  label_lut = datasets.get(dataset).label_lut
  total = len(source)
  per_epoch = steps_per_epoch(total, batch_size, process_count)
  if per_epoch < 1:
    raise ValueError(
        f'split {split!r} of {data_dir} has {total} examples: fewer than one global batch of '
        f'{global_batch} ({batch_size} per process for {process_count} process(es))')

  # Permutations of the last few epochs: a batch never spans more than two.
  order_of_epoch = functools.lru_cache(maxsize=4)(
      lambda epoch: epoch_order(seed, epoch, total))

  def plan(position):
    # Position p of this process's stream (p = step * B + slot) in index space: which example,
    # and how it is augmented. A pure function of p; nothing before p is ever computed.
    step, slot = divmod(int(position), batch_size)
    epoch, k = divmod(step, per_epoch)
    index = int(order_of_epoch(epoch)[k * global_batch + rows[slot]])
    scale, offset_y, offset_x, do_flip = augmentation_params(
        seed, epoch, index, scales=scales, scale_range=scale_range, flip=flip)
    return (np.int64(index), np.float32(scale), np.float32(offset_y), np.float32(offset_x),
            np.bool_(do_flip))

  def load(position):
    index, scale, offset_y, offset_x, do_flip = tf.numpy_function(
        plan, [position], (tf.int64, tf.float32, tf.float32, tf.float32, tf.bool),
        stateful=False)
    for t in (index, scale, offset_y, offset_x, do_flip):
      t.set_shape([])
    image, label = _decode(*_fetch(source, index))
    image, label = _augment(image, label, scale, offset_y, offset_x, do_flip, crop_size=crop,
                            normalization=normalization, label_lut=label_lut)
    example = {'image': image, 'label': label}
    if include_index:
      example['index'] = tf.cast(index, tf.int32)
    return example

  ds = tf.data.Dataset.range(start_step * batch_size, np.iinfo(np.int64).max)
  # deterministic=True: parallel decoding, results in stream order.
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(prefetch)
  return NumpyIterator(ds)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def eval_pad_size(data_dir: str, split: str, dataset: str = 'cityscapes',
                  pad_size: int | Sequence[int] | None = None) -> tuple[int, int] | None:
  """The (height, width) that evaluation pads the images of a split to, or None (as stored).

  `pad_size` when given (then at least the split's largest image, when that was recorded); else
  the split's largest image when its images vary in size (VOC, ADE20K: recorded at preparation);
  else None (Cityscapes, CamVid: one size).
  """
  sizes = image_sizes(data_dir, split, dataset)
  # () is how a config says none (a ConfigDict field keeps its type).
  if pad_size is None or (not isinstance(pad_size, (int, np.integer)) and not len(pad_size)):
    return tuple(sizes['max']) if sizes and not sizes['uniform'] else None
  pad = _pair(pad_size, 'pad_size (config.data.eval_pad_size)')
  if sizes and (sizes['max'][0] > pad[0] or sizes['max'][1] > pad[1]):
    raise ValueError(
        f'pad_size (config.data.eval_pad_size) {pad} is smaller than the largest image of split '
        f'{split!r} of {dataset}, {sizes["max"][0]}x{sizes["max"][1]} (height x width): give at '
        'least that, or none to pad to it.')
  return pad


def _pad_bottom_right(example: dict[str, tf.Tensor], pad: tuple[int, int], index: tf.Tensor,
                      what: str) -> dict[str, tf.Tensor]:
  """Pads 'image' (with 0), 'raw_image' (0) and 'label' (255) of one example to `pad` (H, W)."""
  height, width = tf.shape(example['label'])[0], tf.shape(example['label'])[1]
  fits = tf.debugging.Assert(
      (height <= pad[0]) & (width <= pad[1]),
      [f'An image of {what} is larger than the evaluation pad size {pad}: set pad_size '
       '(config.data.eval_pad_size) to at least its size. Example index, height, width:',
       index, height, width])
  with tf.control_dependencies([fits]):
    paddings = [[0, pad[0] - height], [0, pad[1] - width]]
  padded = {
      'image': tf.pad(example['image'], paddings + [[0, 0]]),
      'raw_image': tf.pad(example['raw_image'], paddings + [[0, 0]]),
      'label': tf.pad(example['label'], paddings, constant_values=spec_lib.IGNORE_LABEL),
  }
  for key, value in padded.items():
    value.set_shape([*pad, 3] if key != 'label' else pad)
  return {**example, **padded}


def make_eval_iterator(*, data_dir: str, split: str = 'val', batch_size: int,
                       normalization: str, process_index: int = 0, process_count: int = 1,
                       prefetch: int = 2, dataset: str = 'cityscapes',
                       pad_size: int | Sequence[int] | None = None) -> NumpyIterator:
  """One pass over this process's share of a split: whole images, no augmentation.

  Process p reads the examples with index i % process_count == p, in index order. Every process
  yields the same number of batches, `num_eval_batches(...)`; the missing places of the last
  one(s) are padding (image 0, raw image 0, label 255, mask False, index -1), so no image is
  dropped or duplicated.

  A batch has one shape, so images of varying sizes (VOC, ADE20K) are padded at the bottom and
  right to one size (`eval_pad_size`: the split's largest image unless `pad_size` says more):
  image 0 after normalisation (the mean colour), raw image 0, label 255, so padded pixels never
  count in the metrics. Batches then compile once. The network does see the padding: context
  pooled over the whole image (PSP, ASPP image pooling) differs from that of the unpadded image,
  where the references evaluate one image at a time at its own size.

  Args:
    data_dir, split, normalization, process_index, process_count, prefetch, dataset: as for
      `make_train_iterator`.
    batch_size: per-process batch size.
    pad_size: (height, width) or int to pad every image to; None: see above.

  Yields:
    {'image': [B, H, W, 3] float32 normalised, 'label': [B, H, W] int32 train ids (255 ignored),
     'mask': [B] bool (False for padding), 'raw_image': [B, H, W, 3] uint8 RGB as stored,
     'index': [B] int32 example index in the split (-1 for padding)}; H, W the pad size, if any.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'unknown normalization {normalization!r}, expected one of {NORMALIZATIONS}')
  _check_process(process_index, process_count)
  source = _open_source(data_dir, split, lambda i: i % process_count == process_index, dataset)
  label_lut = datasets.get(dataset).label_lut
  pad = eval_pad_size(data_dir, split, dataset, pad_size)
  total = len(source)
  local = np.arange(process_index, total, process_count, dtype=np.int64)
  if total == 0:
    raise ValueError(f'split {split!r} of {data_dir} is empty')
  num_batches = num_eval_batches(total, batch_size, process_count)
  indices = np.full((num_batches * batch_size,), -1, np.int64)
  indices[:local.shape[0]] = local
  # Padding is decoded from a real example (for its shape) and then blanked.
  pad_source_index = int(local[0]) if local.shape[0] else 0

  def load(index):
    is_real = index >= 0
    image_png, label_png = _fetch(source, tf.where(is_real, index, pad_source_index))
    raw_image, label_ids = _decode(image_png, label_png)
    image = normalize(raw_image, normalization)
    label = _to_train_ids(label_ids, label_lut)
    example = {
        'image': tf.where(is_real, image, tf.zeros_like(image)),
        'label': tf.where(is_real, label, tf.fill(tf.shape(label), spec_lib.IGNORE_LABEL)),
        'mask': is_real,
        'raw_image': tf.where(is_real, raw_image, tf.zeros_like(raw_image)),
        'index': tf.cast(index, tf.int32),
    }
    if pad is not None:
      example = _pad_bottom_right(example, pad, index, f'split {split!r} of {dataset}')
    return example

  ds = tf.data.Dataset.from_tensor_slices(indices)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.prefetch(prefetch)
  return NumpyIterator(ds)


def dataset_info(name: str = 'cityscapes') -> spec_lib.DatasetInfo:
  """The class table (names, colours, ignore label) of a registered dataset."""
  return datasets.get(name).info


__all__ = [
    'CAFFE_BGR_MEAN', 'IMAGENET_RGB_MEAN', 'IMAGENET_RGB_STD', 'NORMALIZATIONS', 'NumpyIterator',
    'augmentation_params', 'dataset_info', 'decode_image', 'decode_label', 'encoded_examples',
    'epoch_order', 'eval_pad_size', 'example_ids', 'image_sizes', 'make_eval_iterator',
    'make_train_iterator', 'normalize', 'num_eval_batches', 'num_examples', 'prepare_cityscapes',
    'prepare_dataset', 'prepared_builder', 'split_name', 'steps_per_epoch', 'tfds_split',
]
