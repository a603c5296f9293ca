"""Faults done to real runs of the programs: kill -9, SIGTERM, non-finite values, bad inputs.

Every run here is a subprocess of the command a user runs (`python -m skd_jax.main ...`), or of
tests/fault_launcher.py, which starts the same program after wrapping orbax's commit of a
checkpoint folder so that the process SIGKILLs itself at an exact moment (before or after a
given commit). The tiny test config trains a 1/16-width student with a 1/8-width teacher and the
discriminator; the runs share one prepared dataset, one teacher export and one persistent XLA
compilation cache, so that each costs its start-up and little more.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from skd_jax import checkpoint as ckpt_lib
from test_train import data_dirs, teacher_export  # noqa: F401  pylint: disable=unused-import

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / 'tests' / 'fault_launcher.py'
NUM_STEPS = 8
# Every 2 steps a checkpoint and an evaluation (so a best checkpoint at most of them).
RUN_FLAGS = ('--config=configs/test.py', f'--config.optim.num_steps={NUM_STEPS}',
             '--config.checkpoint.every_steps=2', '--config.eval.every_steps=2',
             '--config.log.every_steps=1')


@pytest.fixture(scope='module')
def environ(tmp_path_factory):
  """The subprocesses' environment: CPU, and one persistent compilation cache for all of them."""
  cache = tmp_path_factory.mktemp('xla_cache')
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def main_command(workdir, data_dirs, teacher, *flags, launcher=False):  # pylint: disable=redefined-outer-name
  program = [str(LAUNCHER), 'skd_jax.main'] if launcher else ['-m', 'skd_jax.main']
  return [sys.executable, *program, *RUN_FLAGS, f'--workdir={workdir}',
          f'--config.data.manual_dir={data_dirs[0]}', f'--config.data.tfds_data_dir={data_dirs[1]}',
          f'--config.teacher.checkpoint={teacher}', *flags]


class Run:
  """A program started in the background, its stderr in a file."""

  def __init__(self, command, environ, log):  # pylint: disable=redefined-outer-name
    self.log = pathlib.Path(log)
    self.started = time.monotonic()
    with open(self.log, 'w') as out:
      self.process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=out,
                                      stderr=subprocess.STDOUT)

  def text(self) -> str:
    return self.log.read_text()

  def wait(self, timeout=600) -> int:
    try:
      return self.process.wait(timeout)
    finally:
      if self.process.poll() is None:
        self.process.kill()
        self.process.wait()

  def wait_for(self, condition, timeout=300, poll=0.02) -> bool:
    """Polls `condition()` while the process runs; whether it came true."""
    deadline = time.monotonic() + timeout
    while self.process.poll() is None and time.monotonic() < deadline:
      if condition():
        return True
      time.sleep(poll)
    return False


def run(command, environ, log, **faults) -> tuple[int, str]:  # pylint: disable=redefined-outer-name
  r = Run(command, dict(environ, **faults), log)
  return r.wait(), r.text()


def state_arrays(step_dir) -> dict[str, np.ndarray]:
  """Every array of the training state saved in a step folder, by path."""
  item = pathlib.Path(step_dir) / 'state'
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ckpt_lib.saved_tree(item))
  state = ocp.StandardCheckpointer().restore(item, target)
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(state)}


def steps(folder) -> list[int]:
  return sorted(int(p.name) for p in pathlib.Path(folder).iterdir() if p.name.isdigit())


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
  assert a.keys() == b.keys(), what
  different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
  assert not different, f'{what}: {len(different)} of {len(a)} arrays differ, e.g. {different[:3]}'


def best_steps_of(log_text: str) -> list[int]:
  """The evaluation steps whose mIoU was a new best (where a best checkpoint is written)."""
  best, out = -1.0, []
  for step, miou in re.findall(r'step (\d+): student mIoU ([\d.]+)', log_text):
    if float(miou) > best:
      best, out = float(miou), out + [int(step)]
  return out


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, data_dirs, teacher_export, environ):  # pylint: disable=redefined-outer-name
  """An uninterrupted run of the test config: its workdir and log."""
  workdir = tmp_path_factory.mktemp('straight')
  code, text = run(main_command(workdir, data_dirs, teacher_export), environ,
                   workdir.parent / 'straight.log')
  assert code == 0, text[-3000:]
  return workdir, text


def test_kills_at_every_kind_of_moment_resume_to_the_same_final_state(
    straight_run, data_dirs, teacher_export, environ, tmp_path):  # pylint: disable=redefined-outer-name
  """One workdir, killed again and again at the moments that can break a resume, then finished.

  The kill points, in this order (each run resumes from what the previous one left):
    1. SIGKILL after the best checkpoint of step S committed, while the periodic checkpoint of S
       is written (S: the first evaluation step from 4 on with a new best mIoU, else 2): the
       window that wedged every rerun with orbax's StepAlreadyExistsError;
    2. SIGTERM (a preempted spot VM) once step S + 1 has run: a checkpoint of the step it
       stopped at, exit status 143, one `stopped:` line;
    3. SIGKILL at a random moment after a random later step (seeded, printed);
    4. SIGKILL right after the final checkpoint committed (before result.json);
    5. a last run that finds the run finished and reports it.
  Then every array of the final state, and of the best checkpoint, equals the uninterrupted
  run's bit for bit, and no unfinished write is left.
  """
  workdir = tmp_path / 'killed'
  command = main_command(workdir, data_dirs, teacher_export, launcher=True)
  logs = iter(tmp_path / f'run_{i}.log' for i in range(10))
  window = ([s for s in best_steps_of(straight_run[1]) if 4 <= s < NUM_STEPS - 2] + [2])[0]

  code, text = run(command, environ, next(logs), SKD_TEST_KILL_BEFORE_COMMIT=f'checkpoints/{window}',
                   SKD_TEST_WAIT_FOR=f'best/{window}')
  assert code == -signal.SIGKILL, text[-3000:]
  assert (workdir / 'best' / str(window)).is_dir()
  assert not (workdir / 'checkpoints' / str(window)).exists()

  preempted = Run(command, environ, next(logs))
  assert preempted.wait_for(lambda: f'[{window + 1}] train/' in preempted.text())
  preempted.process.send_signal(signal.SIGTERM)
  code, text = preempted.wait(), preempted.text()
  assert code == 143, text[-3000:]
  assert f'{workdir / "best"} already holds step {window}' in text   # the window's replay
  last_line = text.strip().splitlines()[-1]
  stopped_at = int(re.fullmatch(r'stopped: SIGTERM received at step (\d+): saved the checkpoint '
                                r'of step \1 in .*; run the same command again to resume from it\.',
                                last_line)[1])
  assert (workdir / 'checkpoints' / str(stopped_at)).is_dir() and window < stopped_at < NUM_STEPS
  assert 'Traceback' not in text

  rng = np.random.default_rng(11)
  # After the resume point and before the last two steps (whose saves the next kill needs).
  if stopped_at + 1 < NUM_STEPS - 1:
    kill_step, delay = int(rng.integers(stopped_at + 1, NUM_STEPS - 1)), float(rng.uniform(0, 0.3))
    print(f'random kill: {delay:.3f} s after step {kill_step} was logged')
    randomly = Run(command, environ, next(logs))
    assert randomly.wait_for(lambda: f'[{kill_step}] train/' in randomly.text())
    time.sleep(delay)
    randomly.process.kill()
    assert randomly.wait() == -signal.SIGKILL

  code, text = run(command, environ, next(logs),
                   SKD_TEST_KILL_AFTER_COMMIT=f'checkpoints/{NUM_STEPS}')
  assert code == -signal.SIGKILL, text[-3000:]
  assert not (workdir / 'result.json').exists()

  code, text = run(command, environ, next(logs))
  assert code == 0, text[-3000:]
  assert f'Resumed from {workdir / "checkpoints"} at step {NUM_STEPS}' in text
  assert (workdir / 'result.json').exists()

  straight = straight_run[0]
  assert steps(workdir / 'best') == steps(straight / 'best')
  for folder, step in (('checkpoints', NUM_STEPS), ('best', steps(straight / 'best')[-1])):
    assert_bitwise_equal(state_arrays(straight / folder / str(step)),
                         state_arrays(workdir / folder / str(step)), f'{folder}/{step}')
  assert not [p for f in ('checkpoints', 'best') for p in (workdir / f).iterdir()
              if not p.name.isdigit()]
