"""Faults done to real runs of the programs: kill -9, SIGTERM, non-finite values, bad inputs.

Most runs here are subprocesses of the command a user runs (`python -m skd_jax.main ...`), or
of tests/fault_launcher.py, which starts the same program after wrapping orbax's commit of a
checkpoint folder so that the process SIGKILLs itself at an exact moment (before or after a
given commit). They train the test config's 1/16-width student alone (what is checkpointed,
killed and resumed does not depend on the loss terms: the discriminator's state is one more
subtree of the same `TrainState`), share one prepared dataset and one persistent XLA compilation
cache, and so cost their start-up and little more. The errors a run raises before its first step
are also checked in-process, through `cli.run_with_one_line_errors` as the programs use it.
"""

# pylint: disable=redefined-outer-name  (pytest fixtures)

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from skd_jax import checkpoint as ckpt_lib
from skd_jax import cli
from skd_jax import config_base
from skd_jax import train
from skd_jax.data import checks
from skd_jax.data import synthetic
from skd_jax import experiment
from test_convert import torch_zip
# Fixtures, shared with tests/test_train.py.
from test_train import data_dirs, load_test_config, teacher_export  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / 'tests' / 'fault_launcher.py'
NUM_STEPS = 10
# The student alone; every 2 steps a checkpoint and an evaluation (so a best checkpoint at most
# of them).
RUN_FLAGS = ('--config=configs/test.py', '--config.loss.lambda_pi=0', '--config.loss.lambda_pa=0',
             '--config.loss.lambda_ho=0', f'--config.optim.num_steps={NUM_STEPS}',
             '--config.checkpoint.every_steps=2', '--config.eval.every_steps=2',
             '--config.log.every_steps=1')


@pytest.fixture(scope='module')
def environ(tmp_path_factory):
  """The subprocesses' environment: CPU, and one persistent compilation cache for all of them."""
  cache = tmp_path_factory.mktemp('xla_cache')
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def main_command(workdir, data_dirs, *flags, launcher=False):
  program = [str(LAUNCHER), 'skd_jax.main'] if launcher else ['-m', 'skd_jax.main']
  return [sys.executable, *program, *RUN_FLAGS, f'--workdir={workdir}',
          f'--config.data.manual_dir={data_dirs[0]}', f'--config.data.tfds_data_dir={data_dirs[1]}',
          *flags]


class Run:
  """A program started in the background, its stderr in a file."""

  def __init__(self, command, environ, log):
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


def run(command, environ, log, **faults) -> tuple[int, str]:
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
def straight_run(tmp_path_factory, data_dirs, environ):
  """An uninterrupted run of the test config: its workdir and log."""
  workdir = tmp_path_factory.mktemp('straight')
  code, text = run(main_command(workdir, data_dirs), environ,
                   workdir.parent / 'straight.log')
  assert code == 0, text[-3000:]
  return workdir, text


def test_kills_at_every_kind_of_moment_resume_to_the_same_final_state(
    straight_run, data_dirs, environ, tmp_path):
  """One workdir, killed again and again at the moments that can break a resume, then finished.

  The faults, in this order (each run resumes from what the previous one left):
    1. SIGKILL after the best checkpoint of step S committed, while the periodic checkpoint of S
       is written (S = 4 if its evaluation was a new best, else 2): the window that wedged every
       rerun with orbax's StepAlreadyExistsError;
    2. SIGTERM (a preempted spot VM) once step S + 1 has run: a checkpoint of the step it
       stopped at, exit status 143, one `stopped:` line;
    3. SIGKILL at a random moment after a random later step (seeded, printed);
    4. SIGKILL right after the final checkpoint committed (before result.json);
    5. then that final checkpoint damaged (a data file truncated to half);
    6. a last run, which sets the damaged checkpoint aside, resumes from the one before and
       finishes.
  Then every array of the final state, and of the best checkpoint, equals the uninterrupted
  run's bit for bit, and no unfinished write is left.
  """
  workdir = tmp_path / 'killed'
  command = main_command(workdir, data_dirs, launcher=True)
  logs = iter(tmp_path / f'run_{i}.log' for i in range(10))
  window = 4 if 4 in best_steps_of(straight_run[1]) else 2

  code, text = run(command, environ, next(logs),
                   SKD_TEST_KILL_BEFORE_COMMIT=f'checkpoints/{window}',
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
  assert (workdir / 'checkpoints' / str(stopped_at)).is_dir() and window < stopped_at
  assert 'Traceback' not in text and not re.search(r'^error:', text, re.M)

  # Seeded (SKD_TEST_KILL_SEED repeats the trial at other random moments).
  rng = np.random.default_rng(int(os.environ.get('SKD_TEST_KILL_SEED', '11')))
  # After the resume point and before the last two steps (whose saves the next kill needs).
  assert stopped_at + 1 < NUM_STEPS - 1, stopped_at
  kill_step = int(rng.integers(stopped_at + 1, NUM_STEPS - 1))
  delay = float(rng.uniform(0, 0.3))
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

  damaged = workdir / 'checkpoints' / str(NUM_STEPS)
  data = max((p for p in (damaged / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  code, text = run(command, environ, next(logs))
  assert code == 0, text[-3000:]
  previous = max(steps(workdir / 'checkpoints')[:-1])
  assert re.search(f'checkpoint {damaged} cannot be read (.*): moved to '
                   f'{workdir / "checkpoints.unreadable" / str(NUM_STEPS)} for inspection; '
                   f'resuming from step {previous} instead', text)
  assert (workdir / 'result.json').exists()

  straight = straight_run[0]
  assert steps(workdir / 'best') == steps(straight / 'best')
  for folder, step in (('checkpoints', NUM_STEPS), ('best', steps(straight / 'best')[-1])):
    assert_bitwise_equal(state_arrays(straight / folder / str(step)),
                         state_arrays(workdir / folder / str(step)), f'{folder}/{step}')
  assert not [p for f in ('checkpoints', 'best') for p in (workdir / f).iterdir()
              if not p.name.isdigit()]


def last_error(text: str) -> str:
  """The one `error:` line of a run's output; fails unless it is the only one, and last."""
  lines = text.strip().splitlines()
  errors = [line for line in lines if line.startswith('error:')]
  assert len(errors) == 1 and lines[-1] == errors[0], text[-3000:]
  assert 'Traceback' not in text, text[-3000:]
  return errors[0]


def assert_finite_checkpoint(step_dir) -> None:
  arrays = state_arrays(step_dir)
  assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == 'f'), step_dir


def test_a_weighted_term_that_blows_up_is_named_and_the_checkpoint_being_written_is_kept(
    data_dirs, environ, tmp_path):
  """loss.aux_weight = 1e12: the weighted aux term dominates from step 1, the state overflows.

  (The issue's loss.lambda_pa = 1e38 is the same mechanism through another weight; the
  diagnosis of each weight is checked in tests/test_checkpoint.py.) A checkpoint every step,
  each commit slowed down by half a second (tests/fault_launcher.py): when the run stops, the
  checkpoint of the step before is still being written, and must be there, finite, once the
  program has ended.
  """
  workdir = tmp_path / 'run'
  code, text = run(main_command(workdir, data_dirs, '--config.loss.aux_weight=1e12',
                                '--config.checkpoint.every_steps=1', launcher=True),
                   environ, tmp_path / 'run.log', SKD_TEST_SLOW_COMMIT='0.5')
  assert code == 1
  line = last_error(text)
  match = re.fullmatch(
      r'error: non-finite values in .* at step (\d+), while every loss term was finite: '
      r'loss.aux_weight \* loss/aux_ce = \S+ (at the first step )?dwarfs the cross-entropy '
      r'\(\S+\): lower loss.aux_weight \(1e\+12\)\. Stopped before writing it to a checkpoint; '
      r'the last checkpoint, step (\d+), is intact\.', line)
  assert match, line
  stopped, kept = int(match[1]), int(match[3])
  assert kept == stopped - 1 and steps(workdir / 'checkpoints')[-1] == kept
  assert_finite_checkpoint(workdir / 'checkpoints' / str(kept))
  assert not [p for p in (workdir / 'checkpoints').iterdir() if not p.name.isdigit()]


def test_batchnorm_statistics_that_overflow_are_caught_at_the_step(data_dirs, environ, tmp_path):
  """optim.lr = 3000, student alone: the state overflows (BatchNorm statistics among it) while
  every loss is finite. No checkpoint before the end: the run must stop at that step, with the
  diagnosis, not at the final save on the checkpoint's own finiteness guard."""
  workdir = tmp_path / 'run'
  code, text = run(main_command(workdir, data_dirs, '--config.optim.lr=3000',
                                '--config.checkpoint.every_steps=100',
                                '--config.eval.every_steps=100'),
                   environ, tmp_path / 'run.log')
  assert code == 1
  line = last_error(text)
  match = re.fullmatch(
      r"error: non-finite values in (.*, )?the student's BatchNorm statistics(, .*)? at step "
      r'(\d+), while every loss term was finite \(largest weighted term: loss.aux_weight \* '
      r'loss/aux_ce = \S+\): the updates are too large: lower optim.lr \(3000\)\. Stopped before '
      r'writing it to a checkpoint; no checkpoint had been written\.', line)
  assert match and int(match[3]) < NUM_STEPS, line
  assert not steps(workdir / 'checkpoints')


# ---------------------------------------------------------------------------------------------
# The catalogue of bad inputs: each ends its program with one line, and loses nothing.


@pytest.mark.parametrize('program, flags, env, expected', [
    ('skd_jax.main', ['--config=configs/test.py', '--config.loss.lamda_pa=1'], {},
     'error: --config.loss.lamda_pa: configs/test.py has no key \'lamda_pa\'; did you mean '
     '"lambda_pa"?'),
    ('skd_jax.main', ['--config=configs/nope.py'], {},
     f'error: --config=configs/nope.py: no such file (from {ROOT}): give the path of a config '
     'file, e.g. configs/cityscapes.py.'),
    ('skd_jax.evaluate', ['--config=configs/test.py', '--config.optim.batch_sizes=2'], {},
     'error: --config.optim.batch_sizes: configs/test.py has no key \'batch_sizes\'; did you '
     'mean "batch_size"?'),
    ('skd_jax.main', ['--config=configs/test.py'],
     {'XLA_FLAGS': '--xla_force_host_platform_device_count=3'},
     'error: optim.batch_size = 8 does not divide over the 3 devices'),
    ('skd_jax.convert', ['--checkpoint=tests/data/parity/skd_student_r18.pth', '--num_classes=5',
                         '--arch=pspnet_resnet101'], {},
     'error: tests/data/parity/skd_student_r18.pth (skd_reference layout) does not fit '
     '--arch=pspnet_resnet101 with --num_classes=5 (missing from the checkpoint (415); wrong '
     'shape (34)): its tensors fit --arch=pspnet_resnet18'),
])
def test_command_line_errors_end_in_one_line(program, flags, env, expected, environ, tmp_path):
  out_flag = '--out' if program == 'skd_jax.convert' else '--workdir'
  out = subprocess.run([sys.executable, '-m', program, *flags, f'{out_flag}={tmp_path / "out"}'],
                       cwd=ROOT, env=dict(environ, **env), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert last_error(out.stderr).startswith(expected)
  assert not (tmp_path / 'out').exists() or program == 'skd_jax.main'   # nothing written


def test_a_config_file_with_an_unknown_loss_key_is_one_line_naming_it(environ, tmp_path):
  """The config file itself sets a key the step does not read (the command line's misspelling is
  caught by the locked config, above): the run stops before any work, naming the key."""
  config_file = tmp_path / 'typo.py'
  config_file.write_text(
      'import runpy\n\n\ndef get_config():\n'
      f'  c = runpy.run_path({str(ROOT / "configs" / "test.py")!r})["get_config"]()\n'
      '  c.loss.lamda_pa = 1.0\n  return c\n')
  out = subprocess.run([sys.executable, '-m', 'skd_jax.main', f'--config={config_file}',
                        f'--workdir={tmp_path / "out"}'], cwd=ROOT, env=environ,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  line = last_error(out.stderr)
  assert line.startswith('error: unknown loss setting(s) config.loss.lamda_pa: the loss settings '
                         'are aux_weight, cwd_divisor, '), line
  assert ' lambda_pa, ' in line and line.count('\n') == 0
  assert not (tmp_path / 'out' / 'checkpoints').exists()


def one_line_of(program, capsys) -> str:
  """The line `program()` ends with through `cli.run_with_one_line_errors`, as the programs do."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli.run_with_one_line_errors(program)
  assert exit_info.value.code == 1
  return last_error(capsys.readouterr().err)


def student_alone(data_dirs, **changes):
  config = config_base.distillation_off(load_test_config())
  config.data.manual_dir, config.data.tfds_data_dir = data_dirs
  for key, value in changes.items():
    section, name = key.split('__')
    config[section][name] = value
  return config


def test_wrong_architecture_or_classes_on_resume_are_one_line_before_restoring(
    straight_run, data_dirs, tmp_path, capsys):
  workdir = tmp_path / 'copy'
  shutil.copytree(straight_run[0], workdir)
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))
  config = student_alone(data_dirs, student__arch='deeplabv3_resnet18')
  line = one_line_of(lambda: train.train_and_evaluate(config, workdir), capsys)
  # As the meta records them: the overrides that are set (None = the preset's value).
  overrides = json.loads(json.dumps({k: v for k, v in config.student.overrides.items()
                                     if v is not None}))
  assert line == (
      f'error: {workdir / "checkpoints" / str(NUM_STEPS)} was written for pspnet_resnet18 '
      f'{overrides} with 19 classes, but the config asks for deeplabv3_resnet18 {overrides} '
      'with 19 classes: resume with the config this workdir was trained with, or give a new '
      '--workdir.')
  # Nothing lost or moved (the log writer may have opened a new, empty events file).
  assert set(before) <= {str(p.relative_to(workdir)) for p in workdir.rglob('*')}


def test_teacher_errors_are_one_line(data_dirs, teacher_export, tmp_path, capsys):
  config = student_alone(data_dirs)
  config.loss.lambda_pi = 10.0
  assert one_line_of(lambda: train.train_and_evaluate(config, tmp_path / 'a'), capsys) == (
      'error: the distillation weights are not all 0, so a teacher is needed: set '
      "--config.teacher.checkpoint to a teacher run's workdir, an export from `python -m "
      'skd_jax.convert`, or a PyTorch .pth file.')
  # A teacher of another class count.
  five = tmp_path / 'five_classes'
  shutil.copytree(teacher_export, five)
  metadata = json.loads((five / ckpt_lib.EXPORT_METADATA).read_text())
  (five / ckpt_lib.EXPORT_METADATA).write_text(json.dumps(dict(metadata, num_classes=5)))
  config.teacher.checkpoint = str(five)
  assert one_line_of(lambda: train.train_and_evaluate(config, tmp_path / 'b'), capsys) == (
      f'error: checkpoint {five} predicts 5 classes, but cityscapes has data.num_classes = 19: '
      'give a network trained on these classes (a teacher run of this config, or a converted '
      '.pth of this dataset).')
  # A pickle that would run a command when unpickled.
  evil = tmp_path / 'teacher.pth'
  torch_zip(evil, b'\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueR.')
  config.teacher.checkpoint = str(evil)
  line = one_line_of(lambda: train.train_and_evaluate(config, tmp_path / 'c'), capsys)
  assert line.startswith(f"error: {evil}: refusing to unpickle the global 'posix.system'")


def write_cityscapes(manual_dir, *, damage=None, unknown_pixels=0):
  """The test config's synthetic Cityscapes archives; `damage`: an image member to truncate;
  `unknown_pixels`: pixels of the first training label map set to 200 (not a Cityscapes id)."""
  examples = list(synthetic.synthetic_examples(num_train=4, num_val=2, num_test=1, height=32,
                                               width=64, seed=0))
  if unknown_pixels:
    first = examples[0]
    label = first.label_ids.copy()
    label.reshape(-1)[:unknown_pixels] = 200
    examples[0] = dataclasses.replace(first, label_ids=label)
  left, _ = synthetic.write_cityscapes_zips(str(manual_dir), examples)
  if damage:
    with zipfile.ZipFile(left) as archive:
      members = {name: archive.read(name) for name in archive.namelist()}
    members[damage] = members[damage][:len(members[damage]) // 2]
    with zipfile.ZipFile(left, 'w') as archive:
      for name, data in members.items():
        archive.writestr(name, data)
  return examples


def test_a_damaged_png_is_named_by_its_place_in_the_archive_before_training(tmp_path, capsys):
  manual = tmp_path / 'manual'
  examples = write_cityscapes(manual, damage=(
      'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png'))
  assert examples[0].image_id == 'aachen_000000_000019'
  config = student_alone((str(manual), str(tmp_path / 'tfds')))
  line = one_line_of(lambda: train.train_and_evaluate(config, tmp_path / 'run'), capsys)
  assert line == (
      f'error: 1 example(s) of cityscapes cannot be read: {manual / "leftImg8bit_trainvaltest.zip"}'
      ':leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png (Invalid PNG data). '
      f'Replace the damaged files in {manual} (a partial download?), then delete the prepared '
      f'copy {tmp_path / "tfds" / "cityscapes" / "semantic_segmentation" / "1.0.0"} so that it is '
      'prepared again.')
  assert not (tmp_path / 'run' / 'checkpoints').exists()   # before any training


def test_label_values_outside_the_table_are_counted_and_stop_the_run_above_the_tolerance(
    tmp_path, capsys, caplog):
  manual = tmp_path / 'manual'
  examples = write_cityscapes(manual, unknown_pixels=50)
  train_pixels = sum(e.label_ids.size for e in examples if e.split == 'train')
  share = 50 / train_pixels   # 0.98% of the training split's pixels
  config = student_alone((str(manual), str(tmp_path / 'tfds')))
  line = one_line_of(lambda: train.train_and_evaluate(config, tmp_path / 'run'), capsys)
  assert line == (
      'error: the label maps of split train of cityscapes hold values outside its table: 200 '
      f'(50 pixels), {share:.2%} of their pixels (more than data.unknown_label_tolerance = '
      '0.001); they would silently become "ignore". Are these the labels of another dataset '
      "(config.data.dataset = 'cityscapes'), or train-id or colour maps instead of the stored "
      'label ids?')
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  # Within the tolerance: a warning with the same count, and the run goes on.
  config.data.unknown_label_tolerance = 0.02
  assert experiment.prepare_data(config, tmp_path / 'run') == config.data.tfds_data_dir
  assert (f'hold values outside its table: 200 (50 pixels), {share:.4%} of their pixels (within '
          'data.unknown_label_tolerance = 0.02): they are ignored') in caplog.text


def test_class_count_and_crop_size_are_checked_against_the_data(data_dirs, tmp_path, capsys,
                                                                caplog):
  config = student_alone(data_dirs, data__num_classes=5)
  assert one_line_of(lambda: train.train_and_evaluate(config, tmp_path / 'run'), capsys) == (
      'error: data.num_classes = 5, but cityscapes has 19 classes (its labels hold train ids '
      '0..18): set --config.data.num_classes=19.')
  config = student_alone(data_dirs, data__crop_size=(128, 256))
  experiment.prepare_data(config, tmp_path / 'run')
  # The synthetic images are 64x128, the scales 0.75 .. 1.25: the share of a 128x256 crop
  # outside the largest image at 1.25 (80x160) and the smallest at 0.75 (48x96).
  least, most = 1 - 80 * 160 / (128 * 256), 1 - 48 * 96 / (128 * 256)
  assert (f'data.crop_size 128x256 is larger than the images of split train (64x128 to 64x128, '
          f'height x width): at scales 0.75 to 1.25, {least:.0%} to {most:.0%} of each crop is '
          'padding') in caplog.text


def test_a_split_with_nothing_to_learn_is_an_error():
  census = {'train': {'label_counts': {'0': 100, '3': 20}, 'num_examples': 1,
                      'image_min': [10, 12], 'image_max': [10, 12]}}
  with pytest.raises(ValueError, match=r'every label pixel of split train of cityscapes is void'):
    checks.check_labels(census, 'cityscapes', 19, 1e-3)


# ---------------------------------------------------------------------------------------------
# Full and read-only disks, in a private mount namespace.


NAMESPACE_SCRIPT = '''
set -u
mount -t tmpfs -o ro,size=64k tmpfs "$RO" || exit 90
mount -t tmpfs -o size="$FULL_SIZE" tmpfs "$FULL" || exit 90
mount -t tmpfs -o size=16k tmpfs "$TINY" || exit 90
mount --bind "$RUN" "$RO_RUN" && mount -o remount,bind,ro "$RO_RUN" || exit 90
run() { name=$1; shift; "$@" > "$OUT/$name.log" 2>&1; echo $? > "$OUT/$name.code"; }
run main_read_only "$PY" -m skd_jax.main $MAIN_FLAGS --workdir="$RO/run"
run main_full "$PY" -m skd_jax.main $MAIN_FLAGS --workdir="$FULL/run"
cp -r "$FULL/run" "$OUT/main_full_workdir"
run evaluate_read_only "$PY" -m skd_jax.evaluate $EVAL_FLAGS --workdir="$RO_RUN"
run convert_full "$PY" -m skd_jax.convert --checkpoint=tests/data/parity/skd_student_r18.pth \
    --arch=pspnet_resnet18 --num_classes=5 --out="$TINY/export"
'''


def test_full_and_read_only_disks_end_each_program_in_one_line(
    straight_run, data_dirs, environ, tmp_path):
  """Each program on a small tmpfs (full) and a read-only one, in `unshare --user --mount`.

  skd_jax.main writes its workdir to a tmpfs with room for the logs and the two checkpoints of
  step 2 (best and periodic), not for those of step 4 (sizes measured on the uninterrupted
  run): it must end with the disk-full line and leave step 2 intact. skd_jax.main and
  skd_jax.evaluate (whose report goes into the workdir) on read-only workdirs, and
  skd_jax.convert into a 16 kB tmpfs, end with their lines too.
  """
  if not shutil.which('unshare'):
    pytest.skip('no unshare(1) to make a private mount namespace for small and read-only disks')
  probe = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                          f'mount -t tmpfs -o size=4k tmpfs {tmp_path}'], capture_output=True,
                         text=True)
  if probe.returncode:
    pytest.skip(f'cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}')
  # What a tmpfs charges: whole 4 kB pages per file. The logs of the whole straight run bound
  # those of its first 2 steps.
  du = lambda path: sum(-(-p.stat().st_size // 4096) * 4096
                        for p in pathlib.Path(path).rglob('*') if p.is_file())
  checkpoint = du(straight_run[0] / 'checkpoints' / str(NUM_STEPS))
  full_size = du(straight_run[0] / 'logs') + int(2.5 * checkpoint)
  dirs = {name: tmp_path / name for name in ('RO', 'FULL', 'TINY', 'RO_RUN', 'OUT')}
  for path in dirs.values():
    path.mkdir()
  main_flags = ' '.join(f for f in main_command('W', data_dirs, '--config.optim.num_steps=4')[3:]
                        if not f.startswith('--workdir='))
  eval_flags = (f'--config=configs/test.py --config.data.manual_dir={data_dirs[0]} '
                f'--config.data.tfds_data_dir={data_dirs[1]}')
  env = dict(environ, **{k: str(v) for k, v in dirs.items()}, RUN=str(straight_run[0]),
             FULL_SIZE=str(full_size), PY=sys.executable, MAIN_FLAGS=main_flags,
             EVAL_FLAGS=eval_flags)
  done = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'bash', '-c',
                         NAMESPACE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr
  out = dirs['OUT']
  result = {p.stem: (int((out / f'{p.stem}.code').read_text()), p.read_text())
            for p in out.glob('*.log')}
  for name, (code, text) in result.items():
    assert code == 1, (name, text[-3000:])
  assert last_error(result['main_read_only'][1]) == (
      f'error: cannot write to a read-only file system ({dirs["RO"] / "run"}): give a writable '
      '--workdir / --out.')
  assert last_error(result['evaluate_read_only'][1]).startswith(
      'error: cannot write to a read-only file system '
      f'({dirs["RO_RUN"] / "eval_student_val.json"})')
  assert last_error(result['convert_full'][1]).startswith(
      f'error: no space left on the device being written ({dirs["TINY"] / "export"}')
  line = last_error(result['main_full'][1])
  assert line.startswith(f'error: no space left on the device being written ({dirs["FULL"]}/run/')
  assert line.endswith('(the checkpoints that had completed are intact: a training run '
                       'resumes from the last).')
  # What had completed before the disk filled: the checkpoints of step 2, readable and finite.
  written = out / 'main_full_workdir'
  assert steps(written / 'checkpoints') == [2] and steps(written / 'best') == [2]
  assert_finite_checkpoint(written / 'checkpoints' / '2')
