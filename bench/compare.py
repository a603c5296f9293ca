r"""skd_jax's train step side by side with the same step in PyTorch, alternating, in one invocation.

    python bench/compare.py --config=configs/cityscapes.py --batch=1 \
        --torch_python=/path/to/torch-venv/bin/python [--rounds=5] [--torch_modes=eager,compile]

For each step (the configured SKD step and the student-alone step, `--step`), it compiles ours
exactly as `bench/throughput.py` does (`skd_jax.train`'s step over the config's mesh, random
inputs, random teacher), starts `bench/torch_step.py --serve` once per PyTorch mode in the
interpreter given by `--torch_python` (its own environment: `bench/requirements-torch.txt`) with
the same networks, shapes and losses, and then alternates: `--steps_per_round` steps of ours, the
same of each PyTorch mode, `--rounds` times. Alternating in one run is what makes the ratio
meaningful on a machine whose load changes (a shared CI machine): both see the same conditions.
It prints the hardware and a markdown table of images/s (global batch / median step time) of
each and the ratio ours / PyTorch, and the same ratio from the median process CPU seconds per
step (all threads): on a shared machine the load of other processes moves wall-clock times by 2x
from step to step, CPU time much less (measured), so the two ratios bracket the truth.

PyTorch runs with `OMP_WAIT_POLICY=PASSIVE` unless `--torch_env` says otherwise: on a shared
machine its spinning OpenMP threads otherwise lose their time slices (measured: a tiny step 35x
slower under load), which would flatter us.

Only the reference networks and losses are stated in PyTorch: PSPNet students and teachers
(any depth, `width_multiplier` as the only override), the reference discriminator (any widths,
`disc.min_input_size`), the WGAN-GP with SGD, pixel-wise, pair-wise with the reference's node
pooling and global graph, either pixel-wise reduction. Other configs get a one-line error.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from skd_jax import config_base  # pylint: disable=g-import-not-at-top
from skd_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from skd_jax import train  # pylint: disable=g-import-not-at-top
# bench/throughput.py, beside this script (it defines --config, --crop, --batch, --steps,
# --warmup and --step, shared here).
import throughput  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('torch_python', os.environ.get('SKD_TORCH_PYTHON', ''),
                    'Python interpreter of an environment with torch (bench/requirements-torch.txt); '
                    'default $SKD_TORCH_PYTHON.')
flags.DEFINE_list('torch_modes', ['eager', 'compile'], 'PyTorch modes: eager and/or compile.')
flags.DEFINE_string('torch_device', 'cpu', 'PyTorch device (cpu, cuda).')
flags.DEFINE_string('torch_env', 'OMP_WAIT_POLICY=PASSIVE',
                    'Space-separated VAR=VALUE environment of the PyTorch processes.')
flags.DEFINE_integer('rounds', 5, 'Alternating rounds; the median over all timed steps is shown.')
flags.DEFINE_integer('steps_per_round', 1, 'Steps of each implementation per round.')

TORCH_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torch_step.py')
# Loss settings torch_step.py states (the reference's); anything else is refused.
REFERENCE_LOSS = dict(aux_weight=0.4, lambda_pi=10.0, lambda_pa=0.5, lambda_ho=0.1, lambda_d=0.1,
                      lambda_gp=10.0, gan_loss='wgan_gp', pi_temperature=1.0, pa_pool='max',
                      pa_pool_scale=0.5, pa_pool_kernel=0, pa_alpha=0, pa_detach_norm=True,
                      ohem=False)


def _depth(section: ml_collections.ConfigDict, what: str) -> int:
  arch = section.arch
  if not arch.startswith('pspnet_resnet'):
    raise app.UsageError(f'--config.{what}.arch={arch}: bench/torch_step.py states PSPNet '
                         f'(pspnet_resnet18/34/50/101) only.')
  unknown = sorted(set(section.overrides) - {'width_multiplier'})
  if unknown:
    raise app.UsageError(f'--config.{what}.overrides has {unknown}: bench/torch_step.py states '
                         f'only width_multiplier; drop them to compare.')
  return int(arch[len('pspnet_resnet'):])


def torch_args(config: ml_collections.ConfigDict, distil: bool) -> list[str]:
  """torch_step.py's command-line flags for the same networks, shapes and losses as `config`."""
  loss = config.loss
  if distil:
    bad = {k: loss[k] for k, v in REFERENCE_LOSS.items() if loss[k] != v}
    if config.disc.image_conditioned or config.disc.optimizer != 'sgd':
      bad['disc'] = 'image_conditioned / adam'
    if bad:
      raise app.UsageError(f'bench/torch_step.py states the reference losses only; this config '
                           f'changes {bad}.')
  h, w = config.data.crop_size
  args = [f'--crop={h},{w}', f'--batch={config.optim.batch_size}',
          f'--variant={"skd" if distil else "student"}', f'--num_classes={config.data.num_classes}',
          f'--student_depth={_depth(config.student, "student")}',
          f'--student_width={config.student.overrides.get("width_multiplier") or 1.0}',
          f'--dtype={config.dtype}', f'--device={FLAGS.torch_device}',
          f'--num_steps={config.optim.num_steps}', f'--pi_reduction={loss.pi_reduction}']
  if distil:
    args += [f'--teacher_depth={_depth(config.teacher, "teacher")}',
             f'--teacher_width={config.teacher.overrides.get("width_multiplier") or 1.0}',
             f'--disc_features={",".join(str(f) for f in config.disc.features)}',
             f'--disc_min_input_size={config.disc.min_input_size}']
  return args


class TorchStep:
  """A `torch_step.py --serve` subprocess: `run(n)` times n steps there."""

  def __init__(self, python: str, args: list[str], log):
    env = dict(os.environ)
    env.update(kv.split('=', 1) for kv in FLAGS.torch_env.split() if '=' in kv)
    self.command = [python, TORCH_STEP, '--serve', *args]
    log(f'  starting {" ".join(shlex.quote(a) for a in self.command[1:])}')
    self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self.info = self._read()['ready']
    self.cpu_times: list[float] = []   # process CPU seconds of every step run so far

  def _read(self) -> dict[str, Any]:
    for line in self.proc.stdout:
      if line.startswith('{'):
        return json.loads(line)
    raise RuntimeError(f'{" ".join(self.command)} exited with {self.proc.wait()} (see its '
                       f'output above)')

  def run(self, steps: int) -> tuple[list[float], dict[str, float]]:
    self.proc.stdin.write(f'run {steps}\n')
    self.proc.stdin.flush()
    reply = self._read()
    self.cpu_times += reply['cpu_times']
    return reply['times'], reply['losses']

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write('quit\n')
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def alternate(runners: dict[str, Any], rounds: int, steps: int, warmup: int, log
              ) -> dict[str, tuple[list[float], list[float]]]:
  """(wall-clock, process CPU) seconds of each runner's steps, `steps` at a time in turn for
  `rounds` rounds after `warmup` steps each."""
  for runner in runners.values():
    runner.run(warmup)
  first = {name: len(runner.cpu_times) for name, runner in runners.items()}
  times = {name: [] for name in runners}
  for r in range(rounds):
    for name, runner in runners.items():
      times[name] += runner.run(steps)[0]
    log(f'  round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.1f}): ' + ', '.join(
        f'{name} {t[-1] * 1e3:.0f} ms' for name, t in times.items()))
  return {name: (times[name], runners[name].cpu_times[first[name]:]) for name in runners}


def compare_step(config: ml_collections.ConfigDict, distil: bool, mesh, log
                 ) -> tuple[dict[str, list[float]], dict[str, str]]:
  """Alternated step times of ours and of each PyTorch mode, and their descriptions."""
  local_batch = sharding_lib.check_batch_size(config.optim.batch_size, mesh, '--batch')
  rng = np.random.default_rng(config.seed + jax.process_index())
  batches = [throughput.random_batch(rng, local_batch, tuple(config.data.crop_size),
                                     config.data.num_classes) for _ in range(2)]
  teacher = teacher_variables = teacher_sharding = None
  if distil:
    teacher, teacher_variables, teacher_sharding = throughput.random_teacher(config, mesh)
  ours = throughput.compile_step(config, teacher, teacher_variables, teacher_sharding, mesh,
                                 batches)
  log(f'  skd_jax step compiled in {ours.compile_s:.1f} s')
  runners = {'skd_jax': ours}
  torch_runners, failed = {}, {}
  try:
    for mode in FLAGS.torch_modes:
      name = f'torch {mode}'
      try:
        torch_runners[name] = TorchStep(
            FLAGS.torch_python, torch_args(config, distil) + [f'--mode={mode}'], log)
        torch_runners[name].run(1)   # compiles (torch.compile) or fails here
      except RuntimeError as e:
        failed[name] = str(e).splitlines()[0]
        log(f'  {name} does not run: {failed[name]}')
        torch_runners.pop(name, None)
    runners.update(torch_runners)
    hardware = {name: r.info['hardware'] for name, r in torch_runners.items()}
    times = alternate(runners, FLAGS.rounds, FLAGS.steps_per_round, FLAGS.warmup, log)
  finally:
    for runner in torch_runners.values():
      runner.close()
  return times, hardware, failed


def table(rows: list[tuple[str, dict[str, tuple[list[float], list[float]]]]], batch: int) -> str:
  """Images/s (median wall clock) of each and the ratios; then the same from process CPU time."""
  torch_names = list(rows[0][1])[1:]
  header = ['step', 'skd_jax images/s'] + [f'{n} images/s' for n in torch_names] + [
      f'skd_jax / {n}' for n in torch_names] + [
      f'skd_jax / {n}, CPU time' for n in torch_names]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for step_name, times in rows:
    rate = {n: batch / statistics.median(wall) for n, (wall, _) in times.items()}
    cpu = {n: statistics.median(c) for n, (_, c) in times.items()}
    cells = ([step_name, f'{rate["skd_jax"]:.3f}'] + [f'{rate[n]:.3f}' for n in torch_names]
             + [f'{rate["skd_jax"] / rate[n]:.2f}x' for n in torch_names]
             + [f'{cpu[n] / cpu["skd_jax"]:.2f}x' for n in torch_names])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.torch_python:
    raise app.UsageError('--torch_python is required: the interpreter of an environment with '
                         'torch (pip install -r bench/requirements-torch.txt), e.g. '
                         '--torch_python=/opt/torch-venv/bin/python.')
  if not os.path.exists(FLAGS.torch_python):
    raise app.UsageError(f'--torch_python={FLAGS.torch_python} does not exist.')
  unknown = sorted(set(FLAGS.torch_modes) - {'eager', 'compile'})
  if unknown or not FLAGS.torch_modes:
    raise app.UsageError(f'--torch_modes={",".join(FLAGS.torch_modes)}: give eager and/or '
                         f'compile.')
  if FLAGS.rounds < 1 or FLAGS.steps_per_round < 1:
    raise app.UsageError('--rounds and --steps_per_round must be >= 1.')
  config = throughput.configure(FLAGS.config)
  mesh = sharding_lib.make_mesh(shape=config.mesh)
  log = lambda msg: print(msg, flush=True)
  variants = []
  if train.loss_config(config).uses_teacher and FLAGS.step in ('both', 'skd'):
    variants.append((throughput.describe(config, alone=False), config, True))
  if FLAGS.step in ('both', 'student'):
    variants.append((throughput.describe(config, alone=True),
                     config_base.distillation_off(config.copy_and_resolve_references()), False))
  for _, variant, distil in variants:
    torch_args(variant, distil)   # refuse what torch_step.py does not state before any work
  rows, hardware, failures = [], {}, []
  start = time.perf_counter()
  for name, variant, distil in variants:
    log(f'comparing {name} ...')
    times, step_hardware, failed = compare_step(variant, distil, mesh, log)
    hardware.update(step_hardware)
    failures += [f'{mode} did not run the {name} step: {why}' for mode, why in failed.items()]
    rows.append((name, times))
  # Columns for the implementations that ran every step.
  common = [n for n in rows[0][1] if all(n in times for _, times in rows)]
  rows = [(name, {n: times[n] for n in common}) for name, times in rows]
  crop, batch = config.data.crop_size, config.optim.batch_size
  steps = FLAGS.rounds * FLAGS.steps_per_round
  log('\n' + '\n'.join([
      f'Command: python bench/compare.py {" ".join(sys.argv[1:])}',
      f'Hardware: skd_jax on {throughput.hardware()}; PyTorch on '
      f'{next(iter(hardware.values()), "?")} ({FLAGS.torch_env or "default environment"})',
      f'Crop {crop[0]}x{crop[1]}, global batch {batch}, dtype {config.dtype}; median of {steps} '
      f'steps each, alternating {FLAGS.steps_per_round} step(s) of each per round after '
      f'{FLAGS.warmup} warm-up step(s); {time.perf_counter() - start:.0f} s in all.', '',
      table(rows, batch)] + failures))


if __name__ == '__main__':
  app.run(main)
