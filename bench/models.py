r"""What the distilled student buys: size, compute, speed and memory of each teacher and student.

    python bench/models.py [--configs=configs/cityscapes.py,configs/cityscapes_cirkd.py,configs/demo.py]
        [--size=H,W] [--batch=N] [--repeats=N] [--warmup=N] [--dtype=bfloat16] [--no_timing]

For the teacher and the student of each experiment config (random weights: speed does not depend
on them) it prints a markdown table of

* parameters: all of the network's, and those inference uses (the auxiliary head, a training
  loss only, is left out);
* GFLOPs per image at the evaluation size (the whole image: 1024x2048 for Cityscapes, the
  synthetic image size for the demo; ``--size`` overrides), XLA's cost analysis of the compiled
  computation, which counts a multiply-add as 2 FLOPs (and skips the taps that fall in a
  convolution's zero padding): of the network alone (its logits at 1/8), and of the whole
  inference as `skd_jax.export` ships it (uint8 image -> normalisation -> network -> align_corners
  upsampling to the input size -> argmax);
* images/s of that inference at batch 1 and at a throughput batch (``--batch``): the batch over
  the median of ``--repeats`` timed calls after ``--warmup`` untimed ones;
* peak memory of the inference at each batch: XLA's memory analysis of the compiled computation
  (temporaries + arguments, the weights included, + outputs - aliased);
* the published Cityscapes val mIoU of the network (for the demo, the mIoU of the README's run).

On whatever device JAX runs on (named in the output). A computation whose XLA peak memory would
not fit in 80% of a CPU host's memory is compiled and analysed but not run. On a small CPU the
1024x2048 R101 forward takes about a minute: limit the work with --repeats=1 --warmup=0
--batch=2, or --no_timing for the counts alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from skd_jax import export  # pylint: disable=g-import-not-at-top
from skd_jax import train  # pylint: disable=g-import-not-at-top
from skd_jax import experiment
from skd_jax import inference
# Scripts beside this one (argparse here, so throughput's absl flags are never parsed).
from pair_wise import fmt_bytes, physical_memory  # pylint: disable=g-import-not-at-top
from throughput import hardware, peak_bytes, xla_flops  # pylint: disable=g-import-not-at-top

DEFAULT_CONFIGS = ('configs/cityscapes.py', 'configs/cityscapes_cirkd.py', 'configs/demo.py')
# Evaluation image size (H, W) of each real dataset; synthetic data uses its own size.
EVAL_SIZES = {'cityscapes': (1024, 2048)}
# Published val mIoU (%), by config file and network; /work/shared/reference/skd-reference.md
# section 8 (SKD reference code, CIRKD protocol) and the README's demo run.
PUBLISHED_MIOU = {
    ('cityscapes', 'teacher'): '78.56 (SKD reference code)',
    ('cityscapes', 'student'): '69.10 alone, 74.08 with SKD (SKD reference code)',
    ('cityscapes_cirkd', 'teacher'): '78.07 (CIRKD)',
    ('cityscapes_cirkd', 'student'): '74.21 alone, 75.42 with SKD (CIRKD)',
    ('demo', 'teacher'): '25.84 (README demo, synthetic val)',
    ('demo', 'student'): '20.77 alone, 22.58 with SKD (README demo)',
}
MEMORY_SHARE = 0.8


def load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
  if spec is None or not (ROOT / path).is_file():
    raise SystemExit(f'error: --configs: no config file {path} (relative to {ROOT})')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def eval_size(config: ml_collections.ConfigDict, size: tuple[int, int] | None) -> tuple[int, int]:
  if size:
    return size
  if config.data.synthetic:
    return (config.data.synthetic_height, config.data.synthetic_width)
  if config.data.dataset not in EVAL_SIZES:
    raise SystemExit(f'error: no evaluation size known for data.dataset={config.data.dataset!r}: '
                     f'give --size=H,W')
  return EVAL_SIZES[config.data.dataset]


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def compiled_inference(model, variables, normalization: str, batch: int,
                       size: tuple[int, int]):
  """The export's computation, compiled for uint8 images [batch, H, W, 3]; variables an argument."""
  serve = jax.jit(export.serving_fn(model, normalization, inference.InferenceMode()))
  return serve.lower(variables, jax.ShapeDtypeStruct((batch, *size, 3), jnp.uint8)).compile()


def network_flops(model, variables, size: tuple[int, int]) -> float:
  """XLA's FLOPs of the network alone on one float32 image (logits at its own resolution)."""
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  return xla_flops(forward.lower(variables, jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))
                   .compile())


def time_calls(compiled, variables, images, warmup: int, repeats: int) -> list[float]:
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, images))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times


def measure(config: ml_collections.ConfigDict, which: str, size: tuple[int, int], args,
            log) -> dict[str, Any]:
  """Counts, and timings at batch 1 and args.batch, of the config's `which` network."""
  model = experiment.build_model(config, config[which])
  init = jax.jit(lambda: model.init(jax.random.key(0, impl='rbg'), jnp.zeros((1, 64, 64, 3)),
                                    train=False))
  full_variables = init()
  model, variables = export.without_aux_head(model, full_variables)
  result = {'params': count(full_variables['params']), 'inference_params': count(
      variables['params']), 'network_flops': network_flops(model, variables, size)}
  rng = np.random.default_rng(0)
  limit = MEMORY_SHARE * physical_memory() if jax.devices()[0].platform == 'cpu' else np.inf
  for batch in (1, args.batch):
    start = time.perf_counter()
    compiled = compiled_inference(model, variables, config.data.normalization, batch, size)
    peak = peak_bytes(compiled)
    result[f'peak_{batch}'] = peak
    if batch == 1:
      result['inference_flops'] = xla_flops(compiled)
    log(f'  batch {batch}: compiled in {time.perf_counter() - start:.1f} s, XLA peak '
        f'{fmt_bytes(peak)}')
    if args.no_timing or peak > limit:
      result[f'rate_{batch}'] = None if args.no_timing else 'too big'
      continue
    images = jnp.asarray(rng.integers(0, 256, (batch, *size, 3), dtype=np.uint8))
    times = time_calls(compiled, variables, images, args.warmup, args.repeats)
    result[f'rate_{batch}'] = batch / statistics.median(times)
    log(f'  batch {batch}: {", ".join(f"{t:.2f}" for t in times)} s per call')
  return result


def describe(section: ml_collections.ConfigDict) -> str:
  width = section.overrides.get('width_multiplier')
  return section.arch + (f' x{width:g}' if width is not None else '')


def rate(value) -> str:
  if value is None:
    return 'not timed'
  return value if isinstance(value, str) else f'{value:.3g}'


def table(rows: list[tuple[str, str, str, tuple[int, int], dict[str, Any]]], batch: int) -> str:
  lines = [f'| config | network | image | params (M), all / inference | GFLOPs (XLA), network / '
           f'inference | images/s, batch 1 / {batch} | peak memory (XLA), batch 1 / {batch} | '
           f'val mIoU (%), published |', '|---|---|---|---|---|---|---|---|']
  for config_name, which, name, size, r in rows:
    lines.append(
        f'| {config_name} | {which}: {name} | {size[0]}x{size[1]} | {r["params"] / 1e6:.2f} / '
        f'{r["inference_params"] / 1e6:.2f} | {r["network_flops"] / 1e9:.1f} / '
        f'{r["inference_flops"] / 1e9:.1f} | {rate(r["rate_1"])} / {rate(r[f"rate_{batch}"])} | '
        f'{fmt_bytes(r["peak_1"])} / {fmt_bytes(r[f"peak_{batch}"])} | '
        f'{PUBLISHED_MIOU.get((config_name, which), "")} |')
  return '\n'.join(lines)


def ratios(rows, batch: int) -> list[str]:
  """One line per config with both networks: what the student costs against its teacher."""
  by_config = {}
  for config_name, which, _, _, r in rows:
    by_config.setdefault(config_name, {})[which] = r
  lines = []
  for config_name, pair in by_config.items():
    if len(pair) < 2:
      continue
    t, s = pair['teacher'], pair['student']
    line = (f'{config_name}: the student has {s["inference_params"] / t["inference_params"]:.2f}x '
            f'the teacher\'s inference parameters and {s["inference_flops"] / t["inference_flops"]:.2f}x '
            f'its FLOPs')
    speed = [f'{s[f"rate_{b}"] / t[f"rate_{b}"]:.1f}x at batch {b}' for b in (1, batch)
             if all(isinstance(r[f'rate_{b}'], float) for r in (s, t))]
    lines.append(line + (f', and runs {" and ".join(speed)}' if speed else '') + '.')
  return lines


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--configs', default=','.join(DEFAULT_CONFIGS),
                      help='comma-separated experiment configs')
  parser.add_argument('--networks', default='teacher,student', help='teacher, student or both')
  parser.add_argument('--size', default='', help='H,W instead of each config\'s evaluation size')
  parser.add_argument('--batch', type=int, default=8, help='the throughput batch')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls (the median is used)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls after compilation')
  parser.add_argument('--dtype', default='', help='compute dtype instead of config.dtype')
  parser.add_argument('--no_timing', action='store_true',
                      help='counts and memory only: compile, do not run')
  args = parser.parse_args(argv)
  try:
    args.size = tuple(int(v) for v in args.size.split(',')) if args.size else None
  except ValueError:
    args.size = ()
  if args.size is not None and (len(args.size) != 2 or min(args.size) < 1):
    parser.error('--size: give H,W, two positive ints, e.g. --size=512,1024')
  args.networks = [n.strip() for n in args.networks.split(',')]
  if not set(args.networks) <= {'teacher', 'student'} or not args.networks:
    parser.error('--networks: teacher, student or teacher,student')
  if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
    parser.error('--batch and --repeats must be >= 1, --warmup >= 0')
  return args


def main(argv=None):
  args = parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  load_start = os.getloadavg()[0]
  rows = []
  for path in args.configs.split(','):
    config = load_config(path.strip())
    if args.dtype:
      config.dtype = args.dtype
    size = eval_size(config, args.size)
    for which in args.networks:
      name = describe(config[which])
      log(f'{path}: {which} {name} at {size[0]}x{size[1]} ...')
      rows.append((pathlib.Path(path).stem, which, name, size, measure(config, which, size, args,
                                                                       log)))
  print(f'Command: python bench/models.py {" ".join(sys.argv[1:] if argv is None else argv)}')
  print(f'Hardware: {hardware()}; 1-minute load average {load_start:.1f} at the start, '
        f'{os.getloadavg()[0]:.1f} at the end')
  print(f'Random weights; uint8 RGB in, labels and logits at the input size out; images/s over '
        f'the median of {args.repeats} calls after {args.warmup} warm-up call(s); FLOPs as XLA '
        f'counts them (2 per multiply-add).\n')
  print(table(rows, args.batch))
  print('\n' + '\n'.join(ratios(rows, args.batch)))


if __name__ == '__main__':
  main()
