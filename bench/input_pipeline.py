"""Benchmark of the training input pipeline on full-size (1024x2048) Cityscapes-format PNGs.

    python bench/input_pipeline.py [--data_dir=DIR] [--num_images=8] [--batch_size=8] \
        [--warmup_batches=3] [--batches=12] [--crop=512]

Writes `--num_images` synthetic 1024x2048 street scenes in the official archive layout
(`skd_jax.data.synthetic`), prepares them with the real tfds builder (`pipeline.prepare_cityscapes`;
both are kept in `--data_dir` and reused by later runs), then times `pipeline.make_train_iterator`
with the reference augmentation (random scale from 0.7, 0.8, ..., 2.1, random 512x512 crop, random
flip, Caffe BGR normalisation) at the reference batch of 8: every crop decodes its full-size PNG
pair, scales the whole image and crops, as in training.

Prints crops per second after a warm-up, per CPU core (the cores this process may run on, which
is also the size of tf.data's AUTOTUNE thread pool), and per CPU-second the process used (what a
dedicated core delivers: the number to read on a shared machine), beside the target of ~40
images/s for an 8-core host (5 crops/s/core), which keeps one accelerator fed at the reference
batch size. Also prints the single-threaded cost of the PNG decoding alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from skd_jax import config_base  # pylint: disable=g-import-not-at-top
from skd_jax.data import cityscapes  # pylint: disable=g-import-not-at-top
from skd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from skd_jax.data import synthetic  # pylint: disable=g-import-not-at-top

import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order

FULL_H, FULL_W = 1024, 2048
# Throughput that keeps one accelerator busy at the reference batch: ~40 crops/s from 8 cores.
TARGET_CROPS_PER_S, TARGET_CORES = 40.0, 8


def usable_cores() -> int:
  """CPU cores this process may run on (what tf.data's AUTOTUNE thread pool is sized to)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def prepare(data_dir: str, num_images: int) -> str:
  """Writes and prepares the full-size synthetic dataset once; returns the tfds data dir."""
  manual, tfds_dir = os.path.join(data_dir, 'manual'), os.path.join(data_dir, 'tfds')
  if not all(os.path.exists(os.path.join(manual, z)) for z in cityscapes.CITYSCAPES_ZIPS):
    start = time.time()
    # The builder needs all three splits; only train is timed.
    synthetic.write_synthetic_cityscapes(manual, num_train=num_images, num_val=1, num_test=1,
                                         height=FULL_H, width=FULL_W, seed=0)
    print(f'wrote {num_images} synthetic {FULL_H}x{FULL_W} scenes in {time.time() - start:.0f} s')
  start = time.time()
  counts = pipeline.prepare_cityscapes(manual, tfds_dir)
  if counts['train'] != num_images:
    raise ValueError(f'{data_dir} holds {counts["train"]} training images, not {num_images}: '
                     'use another --data_dir or the same --num_images as before')
  print(f'prepared {counts} in {time.time() - start:.0f} s')
  return tfds_dir


def decode_seconds(manual_dir: str, repeats: int = 5) -> float:
  """Median single-threaded time to decode one full-size image + label PNG pair."""
  with zipfile.ZipFile(os.path.join(manual_dir, cityscapes.LEFT_IMAGE_ZIP)) as z:
    name = next(n for n in z.namelist() if n.endswith('_leftImg8bit.png'))
    image_png = z.read(name)
  gt_name = ('gtFine' + name[len('leftImg8bit'):-len('leftImg8bit.png')] + 'gtFine_labelIds.png')
  with zipfile.ZipFile(os.path.join(manual_dir, cityscapes.GT_FINE_ZIP)) as z:
    label_png = z.read(gt_name)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    tf.io.decode_png(image_png, channels=3).numpy()
    tf.io.decode_png(label_png, channels=1).numpy()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_pipeline(tfds_dir: str, *, batch_size: int, crop: int, warmup: int,
                  batches: int) -> tuple[float, float, list[float]]:
  """After a warm-up, over `batches` batches: (crops per wall-clock second, crops per CPU second
  of this process, wall-clock seconds of each batch)."""
  reference = config_base.base_config().data
  with pipeline.make_train_iterator(
      data_dir=tfds_dir, split='train', batch_size=batch_size, crop_size=(crop, crop),
      scales=tuple(reference.scales), flip=reference.flip,
      normalization=reference.normalization, seed=0) as it:
    for _ in range(warmup):
      batch = next(it)
    assert batch['image'].shape == (batch_size, crop, crop, 3), batch['image'].shape
    per_batch = []
    # Process CPU time counts every thread (tf.data's included): on a shared machine, crops per
    # CPU second is what one dedicated core would deliver, whatever the other processes take.
    cpu_start = time.process_time()
    start = last = time.perf_counter()
    for _ in range(batches):
      next(it)
      now = time.perf_counter()
      per_batch.append(now - last)
      last = now
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
  crops = batches * batch_size
  return crops / elapsed, crops / cpu, per_batch


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(),
                                                         'skd_bench_input_pipeline'),
                      help='where the synthetic archives and the tfds dataset are kept')
  parser.add_argument('--num_images', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--crop', type=int, default=512)
  parser.add_argument('--warmup_batches', type=int, default=3)
  parser.add_argument('--batches', type=int, default=12)
  args = parser.parse_args(argv)

  tfds_dir = prepare(args.data_dir, args.num_images)
  cores = usable_cores()
  decode = decode_seconds(os.path.join(args.data_dir, 'manual'))
  rate, per_cpu_second, per_batch = time_pipeline(
      tfds_dir, batch_size=args.batch_size, crop=args.crop, warmup=args.warmup_batches,
      batches=args.batches)
  target_per_core = TARGET_CROPS_PER_S / TARGET_CORES
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'machine: {cores} usable CPU cores (os.cpu_count() = {os.cpu_count()}), load average '
        f'{load:.1f} at the end, TensorFlow {tf.__version__}')
  print(f'PNG decode of one {FULL_H}x{FULL_W} image + label, one thread: {1e3 * decode:.0f} ms '
        f'(at most {1 / decode:.1f} crops/s/core from decoding alone)')
  print(f'batches of {args.batch_size} {args.crop}x{args.crop} crops, reference augmentation, '
        f'{args.batches} batches after {args.warmup_batches} warm-up: median '
        f'{statistics.median(per_batch):.2f} s/batch')
  print(f'throughput: {rate:.2f} crops/s = {rate / cores:.2f} crops/s/core (wall clock over '
        f'{cores} cores); {per_cpu_second:.2f} crops per CPU-second of this process (a dedicated '
        f'core\'s rate, independent of other load)')
  print(f'target: {TARGET_CROPS_PER_S:.0f} crops/s on {TARGET_CORES} cores = '
        f'{target_per_core:.1f} crops/s/core; per CPU-second / target per core = '
        f'{per_cpu_second / target_per_core:.2f}: an {TARGET_CORES}-core host would give '
        f'~{per_cpu_second * TARGET_CORES:.0f} crops/s if the pipeline scales linearly')


if __name__ == '__main__':
  main()
