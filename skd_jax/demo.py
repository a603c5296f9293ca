"""The whole SKD story in one command: teacher, student alone, student with SKD, and a table.

Runs three trainings of `train.train_and_evaluate` in subfolders of the workdir, sharing one
dataset:
  teacher/      the config's teacher architecture trained alone (every distillation weight 0);
  student/      the student trained alone, the baseline;
  student_skd/  the student distilled from teacher/ with the config's weights.
Then prints teacher / student / student+SKD mIoU and writes them to WORKDIR/demo_results.json.
Each phase resumes like any run, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time

from absl import logging
import jax
import ml_collections

from skd_jax import config_base
from skd_jax import train
from skd_jax.paths import as_path

PHASES = ('teacher', 'student', 'student_skd')


def phase_config(config: ml_collections.ConfigDict, phase: str,
                 workdir) -> ml_collections.ConfigDict:
  """The config of one phase: a plain run config (no `demo.phases`)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.demo.phases = ()
  c.data.manual_dir = c.data.manual_dir or str(workdir / 'data' / 'manual')
  c.data.tfds_data_dir = c.data.tfds_data_dir or str(workdir / 'data' / 'tfds')
  if phase == 'teacher':
    c.student.arch = config.teacher.arch
    c.student.overrides = ml_collections.ConfigDict(config.teacher.overrides.to_dict())
    c.optim.num_steps = config.demo.teacher_num_steps
    config_base.distillation_off(c)
  elif phase == 'student':
    config_base.distillation_off(c)
  elif phase == 'student_skd':
    c.teacher.checkpoint = str(workdir / 'teacher')
  else:
    raise ValueError(f'unknown phase {phase!r}; known: {PHASES}')
  return c


def run_phases(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs `config.demo.phases` in order and returns {phase: final mIoU}."""
  workdir = as_path(workdir)
  results, timings = {}, {}
  for phase in config.demo.phases:
    start = time.time()
    logging.info('=== demo phase %s ===', phase)
    result = train.train_and_evaluate(phase_config(config, phase, workdir), workdir / phase)
    results[phase] = result['student_miou']
    timings[phase] = time.time() - start
  table = format_results(results)
  print(table, flush=True)
  if jax.process_index() == 0:
    (workdir / 'demo_results.json').write_text(json.dumps(
        {'miou': results, 'seconds': timings}, indent=2))
  return results


def format_results(results: dict[str, float]) -> str:
  names = {'teacher': 'teacher', 'student': 'student alone', 'student_skd': 'student + SKD'}
  lines = ['| model | mIoU (%) |', '|---|---|']
  lines += [f'| {names.get(k, k)} | {100 * v:.2f} |' for k, v in results.items()]
  return '\n'.join(lines)
