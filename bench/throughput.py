r"""Training throughput of a config: the full SKD step and the student-alone step.

    python bench/throughput.py --config=configs/cityscapes.py [--crop=H,W] [--batch=N] \
        [--steps=N] [--warmup=N] [--step=both|skd|student] [--profile=N] \
        [--config.dtype=bfloat16 ...]
    python bench/throughput.py --config=configs/cityscapes.py --sweep \
        [--sweep_crops=512x512,512x1024] [--sweep_batches=1,2,4,8,16] [--sweep_run_max_pixels=N]

For each of the two steps (the configured objective; the same with every distillation weight 0,
where neither the teacher nor the discriminator is compiled) it builds exactly what
`skd_jax.train.train_and_evaluate` runs -- `train.make_step_context`, `train.create_train_state`,
`train.jit_train_step` over the mesh of `config.mesh` (every device) with the batch sharded by
`skd_jax.sharding` -- feeds it random inputs (no dataset) and a randomly initialised teacher, and
prints a markdown table:

* images/s: global batch / the median step time over `--steps` steps after `--warmup` steps;
* compile: seconds to trace, lower and compile the step (XLA);
* GFLOP/step: the FLOPs XLA's cost analysis counts in the compiled step (per device: the
  partitioned program), and the rate they were executed at;
* peak memory: XLA's memory analysis of the compiled step, per device: temporaries + arguments +
  outputs - aliased (the donated state, counted once).

`--profile=N` also runs `--steps` steps under `jax.profiler` and prints the N slowest XLA ops of
each step with the model path they come from, and the time per kind of op (`xla_profile.py`).

`--sweep` compiles the steps over crops x per-device batches and prints XLA's peak memory and
FLOPs of each, and images/s of those it executes: every point that fits in memory, except, on
CPU, those larger than one 512x512 crop per device (`--sweep_run_max_pixels`), which would take
minutes a step. It ends with the largest swept batch per device that fits.

The same command runs on CPUs, GPUs and TPUs. `--crop` and `--batch` default to the config's
crop and global batch (which must divide over the devices of the mesh's 'data' axis). Crops
giving logits smaller than the discriminator's 64x64 minimum need
``--config.disc.min_input_size=64`` (D then sees upsampled maps, as in configs/test.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from skd_jax import config_base  # pylint: disable=g-import-not-at-top
from skd_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from skd_jax import train  # pylint: disable=g-import-not-at-top
from skd_jax.models import discriminator as disc_lib  # pylint: disable=g-import-not-at-top
from skd_jax import experiment
# bench/pair_wise.py, beside this script.
from pair_wise import fmt_bytes  # pylint: disable=g-import-not-at-top
import xla_profile  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_list('crop', None, 'H,W of the random crops (default: config.data.crop_size).')
flags.DEFINE_integer('batch', None, 'Global batch size (default: config.optim.batch_size).')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant; the median is reported.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation, per variant.')
flags.DEFINE_enum('step', 'both', ['both', 'skd', 'student'],
                  'Which step to measure: the configured (SKD) one, the student alone, or both.')
flags.DEFINE_bool('sweep', False, 'Sweep --sweep_crops x --sweep_batches (per device) instead of '
                  'one --crop/--batch: XLA\'s peak memory and FLOPs of each, and images/s where '
                  'executed.')
flags.DEFINE_list('sweep_crops', ['512x512', '512x1024'], 'Crops of the sweep, HxW.')
flags.DEFINE_list('sweep_batches', ['1', '2', '4', '8', '16'], 'Per-device batches of the sweep.')
flags.DEFINE_integer('sweep_run_max_pixels', -1,
                     'Execute a sweep point only if batch/device x H x W is at most this (0: no '
                     'limit; -1: one 512x512 crop on CPU, no limit elsewhere); larger points are '
                     'compiled for the memory analysis only. Points that do not fit in memory are '
                     'never executed.')
flags.DEFINE_integer('profile', 0, 'If > 0: also profile each step (XLA per-op timings over '
                     '--steps steps) and print its slowest N ops.')
flags.DEFINE_float('peak_tflops', 0.0, 'Peak dense TFLOP/s of one device at the step\'s dtype '
                   '(bench/device_check.sh looks it up by device kind); if > 0 the table adds '
                   'the model FLOP utilisation (MFU): XLA\'s FLOPs per device per second / peak.')
flags.mark_flags_as_required(['config'])


def parse_crop(values: list[str] | None, default: tuple[int, ...]) -> tuple[int, int]:
  """(H, W) from ``--crop=H,W`` (or one value for a square), else the config's crop size."""
  if values is None:
    return tuple(int(v) for v in default)
  try:
    crop = tuple(int(v) for v in values)
  except ValueError:
    crop = ()
  if len(crop) == 1:
    crop = crop * 2
  if len(crop) != 2 or min(crop) < 1:
    raise app.UsageError(f'--crop={",".join(values)}: give two positive ints H,W, e.g. '
                         f'--crop=512,1024.')
  return crop


def hardware() -> str:
  """The devices in words: count, kind, and on CPU the processor model and usable cores."""
  devices = jax.devices()
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    model = platform.processor() or 'unknown CPU'
    try:
      with open('/proc/cpuinfo') as f:
        model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
      pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    kind = f'{model}, {cores} cores'
  return (f'{len(devices)} x {devices[0].platform} ({kind}), {jax.process_count()} process(es), '
          f'JAX {jax.__version__}')


def random_batch(rng: np.random.Generator, batch: int, crop: tuple[int, int],
                 num_classes: int) -> dict[str, np.ndarray]:
  """image [B, H, W, 3] float32 on the Caffe-BGR scale, label [B, H, W] int32 in [0, C)."""
  return {'image': rng.normal(0.0, 60.0, (batch, *crop, 3)).astype(np.float32),
          'label': rng.integers(0, num_classes, (batch, *crop)).astype(np.int32)}


def random_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(teacher module, randomly initialised variables placed as the trainer places them)."""
  model = experiment.build_model(config, config.teacher)
  init = lambda: model.init(jax.random.key(config.seed + 1, impl='rbg'),
                            jnp.zeros((1, 64, 64, 3)), train=False)
  sharding = sharding_lib.model_parallel(jax.eval_shape(init), mesh)
  return model, jax.jit(init, out_shardings=sharding)(), sharding


def check_discriminator_input(config: ml_collections.ConfigDict, crop: tuple[int, int]) -> None:
  """A clear error, naming the fix, when the crop's logits are too small for the critic."""
  if not train.loss_config(config).uses_disc or config.disc.min_input_size:
    return
  student = experiment.build_model(config, config.student)
  images = jnp.zeros((1, *crop, 3))
  logits = jax.eval_shape(lambda: student.apply(
      student.init(jax.random.key(0, impl='rbg'), images, train=False), images, train=False))[0]
  h, w = logits.shape[1:3]
  if min(h, w) < disc_lib.MIN_INPUT_SIZE:
    raise app.UsageError(
        f'--crop={crop[0]},{crop[1]} gives {h}x{w} logits, smaller than the discriminator\'s '
        f'{disc_lib.MIN_INPUT_SIZE}x{disc_lib.MIN_INPUT_SIZE} minimum: add '
        f'--config.disc.min_input_size={disc_lib.MIN_INPUT_SIZE} (D sees upsampled maps) or use '
        f'a larger --crop (512,512 gives 65x65).')


def xla_flops(compiled) -> float:
  """FLOPs of one call by XLA's cost analysis (a dict, or a one-element list in older jax)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def peak_bytes(compiled) -> float:
  """Device memory of one call by XLA: temporaries + arguments + outputs - aliased buffers."""
  mem = compiled.memory_analysis()
  if mem is None:
    return float('nan')
  return float(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)


@dataclasses.dataclass
class CompiledStep:
  """One compiled train step with its state, batches and teacher, ready to be timed.

  `run` chains the state from call to call, so that steps of several `CompiledStep`s (or of
  another framework) can be interleaved in one process and timed alternately.
  """
  compiled: Any
  state: Any
  batches: list[dict[str, jax.Array]]
  teacher_variables: Any
  compile_s: float
  calls: int = 0
  # Process CPU seconds of every step run so far (all threads; on CPU, a measure of the work
  # that the load of other processes on a shared machine changes less than wall-clock time).
  cpu_times: list[float] = dataclasses.field(default_factory=list)

  def run(self, steps: int) -> tuple[list[float], dict[str, float]]:
    """Seconds of each of `steps` steps and the last step's metrics."""
    times, metrics = [], {}
    for _ in range(steps):
      start, cpu_start = time.perf_counter(), time.process_time()
      self.state, metrics = self.compiled(self.state, self.batches[self.calls % len(self.batches)],
                                          self.teacher_variables)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      self.cpu_times.append(time.process_time() - cpu_start)
      self.calls += 1
    return times, jax.device_get(metrics)

  def analysis(self) -> dict[str, float]:
    return {'compile_s': self.compile_s, 'flops': xla_flops(self.compiled),
            'peak_bytes': peak_bytes(self.compiled)}

  def profile(self, steps: int) -> list[xla_profile.OpRow]:
    return xla_profile.profile_ops(self.compiled, lambda: self.run(1), steps)


def compile_step(config: ml_collections.ConfigDict, teacher, teacher_variables, teacher_sharding,
                 mesh: jax.sharding.Mesh, batches: list[dict[str, np.ndarray]]) -> CompiledStep:
  """The configured train step compiled as the trainer compiles it, with a fresh state.

  batches: host-local {'image': [b, H, W, 3], 'label': [b, H, W]}.
  """
  ctx = train.make_step_context(config, teacher)
  make_state = functools.partial(train.create_train_state, ctx, batches[0]['image'].shape)
  state_sharding = train.state_shardings(jax.eval_shape(make_state, config.seed), mesh,
                                         config.mesh_shard_student)
  state = jax.jit(make_state, out_shardings=state_sharding)(config.seed)
  if ctx.teacher is None:
    teacher_variables, teacher_sharding = {}, {}
  step_fn = train.jit_train_step(ctx, mesh, state_sharding, teacher_sharding)
  global_batches = [sharding_lib.global_batch(b, mesh) for b in batches]
  start = time.perf_counter()
  compiled = step_fn.lower(state, global_batches[0], teacher_variables).compile()
  return CompiledStep(compiled, state, global_batches, teacher_variables,
                      time.perf_counter() - start)


def summarise(times: list[float], analysis: dict[str, float]) -> dict[str, Any]:
  """Median, min and max step time, and the FLOP rate at the median."""
  step_s = statistics.median(times)
  return dict(analysis, step_s=step_s, min_s=min(times), max_s=max(times),
              flop_rate=analysis['flops'] / step_s)


def measure(config: ml_collections.ConfigDict, teacher, teacher_variables, teacher_sharding,
            mesh: jax.sharding.Mesh, batches: list[dict[str, np.ndarray]], steps: int,
            warmup: int, profile: bool = False) -> dict[str, Any]:
  """Compiles the configured train step as the trainer does, runs it, returns timings and XLA's
  analyses (and, with `profile`, its per-op profile over `steps` more steps)."""
  step = compile_step(config, teacher, teacher_variables, teacher_sharding, mesh, batches)
  step.run(warmup)
  times, metrics = step.run(steps)
  result = summarise(times, step.analysis())
  result['non_finite'] = [k for k, v in metrics.items() if not np.isfinite(v)]
  if profile:
    result['profile'] = step.profile(steps)
  return result


def describe(config: ml_collections.ConfigDict, alone: bool) -> str:
  """'SKD: teacher -> student + D' or 'student alone: student', with their overrides."""
  def net(section):
    overrides = ', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}'
                          for k, v in section.overrides.items())
    return f'{section.arch} ({overrides})' if overrides else section.arch
  remat = f', remat={config.remat}' if config.get('remat', 'none') != 'none' else ''
  if alone:
    return f'student alone: {net(config.student)}{remat}'
  return f'SKD: {net(config.teacher)} -> {net(config.student)}{remat} + D'


def table(rows: list[tuple[str, dict[str, float]]], batch: int, steps: int,
          peak_tflops: float = 0.0) -> str:
  """Markdown table of `measure`'s results; an MFU column (XLA's FLOP rate per device over
  `peak_tflops`) when a peak is given."""
  mfu_head, mfu_rule = (f' MFU (of {peak_tflops:g} TFLOP/s) |', '---|') if peak_tflops else ('', '')
  lines = [f'| step | images/s | step time (median of {steps}) | compile | GFLOP / step (XLA, '
           f'per device) | achieved GFLOP/s |{mfu_head} peak memory (XLA, per device) |',
           f'|---|---|---|---|---|---|{mfu_rule}---|']
  for name, r in rows:
    mfu = f' {100 * r["flop_rate"] / (peak_tflops * 1e12):.1f}% |' if peak_tflops else ''
    lines.append(
        f'| {name} | {batch / r["step_s"]:.2f} | {r["step_s"] * 1e3:.1f} ms '
        f'({r["min_s"] * 1e3:.1f}-{r["max_s"] * 1e3:.1f}) | {r["compile_s"]:.1f} s | '
        f'{r["flops"] / 1e9:.1f} | {r["flop_rate"] / 1e9:.1f} |{mfu} '
        f'{fmt_bytes(r["peak_bytes"])} |')
  return '\n'.join(lines)


def configure(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with the command line's crop and batch, checked."""
  if FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise app.UsageError(f'--steps={FLAGS.steps} must be >= 1 and --warmup={FLAGS.warmup} >= 0.')
  config.data.crop_size = parse_crop(FLAGS.crop, config.data.crop_size)
  check_discriminator_input(config, config.data.crop_size)
  if FLAGS.batch is not None:
    config.optim.batch_size = FLAGS.batch
  # Past num_steps the jitted poly schedule is NaN (count * (1 / num_steps) rounds above 1 and
  # pow(negative, 0.9) follows), and NaNs could change the timings: run within the schedule.
  config.optim.num_steps = max(config.optim.num_steps, FLAGS.warmup + FLAGS.steps + 1)
  return config


def step_variants(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, log):
  """([(name, config)] of the steps `--step` selects, and (teacher, variables, sharding)).

  The configured (SKD) step comes first when it distils, then the student alone (every
  distillation weight 0: neither the teacher nor the discriminator is compiled).
  """
  variants = []
  if FLAGS.step in ('both', 'student'):
    variants.append((describe(config, alone=True),
                     config_base.distillation_off(config.copy_and_resolve_references())))
  teacher = (None, None, None)
  if train.loss_config(config).uses_teacher and FLAGS.step in ('both', 'skd'):
    start = time.perf_counter()
    teacher = random_teacher(config, mesh)
    jax.block_until_ready(teacher[1])
    log(f'random teacher initialised in {time.perf_counter() - start:.1f} s')
    variants.insert(0, (describe(config, alone=False), config))
  return variants, teacher


def host_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> list[dict[str, np.ndarray]]:
  local_batch = sharding_lib.check_batch_size(config.optim.batch_size, mesh, '--batch')
  rng = np.random.default_rng(config.seed + jax.process_index())
  return [random_batch(rng, local_batch, tuple(config.data.crop_size), config.data.num_classes)
          for _ in range(2)]


def run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, log
        ) -> list[tuple[str, dict[str, Any]]]:
  """(name, measurements) of the configured step and, if it distils, of the student alone."""
  batches = host_batches(config, mesh)
  variants, teacher = step_variants(config, mesh, log)
  rows = []
  for name, variant in variants:
    log(f'measuring {name} ...')
    result = measure(variant, *teacher, mesh, batches, FLAGS.steps, FLAGS.warmup,
                     profile=FLAGS.profile > 0)
    if result['non_finite']:
      log(f'  warning: non-finite {result["non_finite"]}: the timings may not be those of a '
          f'healthy run')
    if 'profile' in result:
      log(f'\nProfile of {name} (XLA per-op times, {FLAGS.steps} steps):\n' +
          xla_profile.format_top(result['profile'], result['step_s'], FLAGS.profile) + '\n')
    rows.append((name, result))
  return rows


def memory_limit_bytes() -> tuple[float, str]:
  """Memory one device may use, and where the figure comes from."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return float(stats['bytes_limit']), 'the device\'s bytes_limit'
  physical = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return physical / 2, 'half the host\'s physical memory'


def parse_sweep_crops(values: list[str]) -> list[tuple[int, int]]:
  crops = []
  for v in values:
    try:
      h, w = (int(x) for x in v.lower().split('x'))
    except ValueError:
      raise app.UsageError(f'--sweep_crops: {v!r} is not HxW, e.g. 512x1024.') from None
    crops.append((h, w))
  return crops


def sweep(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, log) -> str:
  """The `--sweep` table: XLA's peak memory, FLOPs and (where executed) images/s over crops x
  per-device batches, for each step `--step` selects."""
  devices = mesh.shape['data']
  limit, limit_source = memory_limit_bytes()
  on_cpu = jax.devices()[0].platform == 'cpu'
  max_pixels = FLAGS.sweep_run_max_pixels
  if max_pixels < 0:
    max_pixels = 512 * 512 if on_cpu else 0
  variants, teacher = step_variants(config, mesh, log)
  lines = ['| crop | batch / device | step | peak memory (XLA, per device) | GFLOP / step | '
           'compile | images/s (global) |', '|---|---|---|---|---|---|---|']
  fits = {}
  for crop in parse_sweep_crops(FLAGS.sweep_crops):
    for per_device in (int(b) for b in FLAGS.sweep_batches):
      for name, variant in variants:
        point = variant.copy_and_resolve_references()
        point.data.crop_size = crop
        point.optim.batch_size = per_device * devices
        check_discriminator_input(point, crop)
        log(f'{crop[0]}x{crop[1]}, batch {per_device}/device: {name} ...')
        step = compile_step(point, *teacher, mesh, host_batches(point, mesh))
        analysis = step.analysis()
        run_it = analysis['peak_bytes'] < limit and (
            not max_pixels or per_device * crop[0] * crop[1] <= max_pixels)
        rate = 'compiled only'
        if analysis['peak_bytes'] >= limit:
          rate = f'does not fit ({fmt_bytes(limit)})'
        elif run_it:
          step.run(FLAGS.warmup)
          times, _ = step.run(FLAGS.steps)
          rate = f'{point.optim.batch_size / statistics.median(times):.3f}'
        if analysis['peak_bytes'] < limit:
          fits[(name, crop)] = max(fits.get((name, crop), 0), per_device)
        lines.append(f'| {crop[0]}x{crop[1]} | {per_device} | {name} | '
                     f'{fmt_bytes(analysis["peak_bytes"])} | {analysis["flops"] / 1e9:.0f} | '
                     f'{analysis["compile_s"]:.0f} s | {rate} |')
        del step
  lines += ['', f'Memory limit per device: {fmt_bytes(limit)} ({limit_source}). Largest swept '
            f'batch per device that fits:']
  lines += [f'- {name}, {crop[0]}x{crop[1]}: {b}' for (name, crop), b in fits.items()]
  if max_pixels:
    lines += [f'Configurations of more than {max_pixels} pixels per device were compiled for '
              f'XLA\'s memory analysis but not executed (--sweep_run_max_pixels).']
  return '\n'.join(lines)


def report(rows: list[tuple[str, dict[str, Any]]], config: ml_collections.ConfigDict,
           mesh: jax.sharding.Mesh) -> str:
  crop, batch = config.data.crop_size, config.optim.batch_size
  lines = [f'Command: python bench/throughput.py {" ".join(sys.argv[1:])}',
           f'Hardware: {hardware()}',
           f'Crop {crop[0]}x{crop[1]}, global batch {batch}, dtype {config.dtype}, mesh '
           f'{dict(mesh.shape)}; median of {FLAGS.steps} steps after {FLAGS.warmup} warm-up '
           f'steps.', '', table(rows, batch, FLAGS.steps, FLAGS.peak_tflops)]
  if len(rows) == 2:
    lines += ['', f'The SKD step takes {rows[0][1]["step_s"] / rows[1][1]["step_s"]:.2f}x the '
              f'time of the student-alone step.']
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # A TPU pod slice or a multi-task Slurm / MPI job: one process per host, all devices used.
  if FLAGS.profile > 0:
    xla_profile.enable_cpu_op_events()   # before JAX starts its CPU backend
  sharding_lib.initialize_distributed()
  config = configure(FLAGS.config)
  mesh = sharding_lib.make_mesh(shape=config.mesh)
  log = lambda msg: print(msg, flush=True) if jax.process_index() == 0 else None
  if FLAGS.sweep:
    table_text = sweep(config, mesh, log)
    log('\n' + '\n'.join([
        f'Command: python bench/throughput.py {" ".join(sys.argv[1:])}',
        f'Hardware: {hardware()}',
        f'dtype {config.dtype}, mesh {dict(mesh.shape)}; images/s from the median of '
        f'{FLAGS.steps} steps after {FLAGS.warmup} warm-up steps.', '', table_text]))
    return
  rows = run(config, mesh, log)
  log('\n' + report(rows, config, mesh))


if __name__ == '__main__':
  app.run(main)
