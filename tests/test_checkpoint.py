"""skd_jax.checkpoint's guarantees, and the diagnosis and error lines built on them.

In-process and small: a step is never written twice, rotation happens only after a commit, an
unreadable checkpoint is set aside for the previous one, a checkpoint of another network is an
error before restoring; the non-finite diagnosis against hand-made metrics; `cli.error_line`
on the errors a disk gives. The same behaviours on real killed, full and read-only runs are in
tests/test_faults.py.
"""

from __future__ import annotations

import errno
import functools
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import checkpoint as ckpt_lib
from skd_jax import cli
from skd_jax import config_base
from skd_jax import train
from test_train import load_test_config


@pytest.fixture(scope='module')
def tiny_state():
  """A student-alone training state of the test config (a few hundred kB)."""
  config = config_base.distillation_off(load_test_config())
  ctx = train.make_step_context(config, None)
  return jax.jit(functools.partial(train.create_train_state, ctx, (1, 64, 64, 3)))(3)


def plus(state, value: float):
  """`state` with `value` added to every float array: distinguishable checkpoints."""
  return jax.tree.map(lambda x: x + value if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def corrupt(step_dir: pathlib.Path) -> None:
  """Truncates the largest data file of a step's state to half (a torn copy, a bad sector)."""
  data = max((p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


MODEL = {'arch': 'pspnet_resnet18', 'num_classes': 19, 'overrides': {'width_multiplier': 0.0625}}


def save_steps(directory, state, steps, keep=None):
  manager = ckpt_lib.open_manager(directory)
  for step in steps:
    assert ckpt_lib.save_train_state(manager, step, plus(state, step), dict(MODEL, step=step),
                                     keep=keep)
  ckpt_lib.finish_saves(manager, keep=keep)


def test_round_trip_and_nothing_non_finite_is_ever_written(tiny_state, tmp_path):
  """(From tests/test_train.py.) A state comes back as it went, as a `TrainState`."""
  manager = ckpt_lib.open_manager(tmp_path / 'checkpoints')
  ckpt_lib.save_train_state(manager, 5, tiny_state, dict(MODEL, step=5))
  manager.wait_until_finished()
  restored, meta = ckpt_lib.restore_train_state(manager, 5, jax.eval_shape(lambda: tiny_state))
  assert meta['step'] == 5 and type(restored) is train.TrainState
  assert jax.tree.structure(restored) == jax.tree.structure(tiny_state)
  for x, y in zip(jax.tree.leaves(tiny_state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The student variables come back through the generic loader too, from the workdir.
  variables, _ = ckpt_lib.load_variables(tmp_path)
  np.testing.assert_array_equal(
      variables['params']['head']['classifier']['kernel'],
      np.asarray(tiny_state.student_params['head']['classifier']['kernel']))
  bad = tiny_state.replace(student_params=jax.tree.map(lambda x: x.at[...].set(jnp.nan),
                                                       tiny_state.student_params))
  with pytest.raises(FloatingPointError, match='non-finite values in .*student_params'):
    ckpt_lib.save_train_state(manager, 6, bad, {'step': 6})
  with pytest.raises(FloatingPointError, match='non-finite'):
    ckpt_lib.save_variables(tmp_path / 'export', {'params': bad.student_params}, metadata={})
  ckpt_lib.finish_saves(manager)
  assert ckpt_lib.open_manager(tmp_path / 'checkpoints').all_steps() == [5]


def test_a_step_is_never_written_twice_and_rotation_waits_for_the_commit(tiny_state, tmp_path,
                                                                         caplog):
  save_steps(tmp_path / 'checkpoints', tiny_state, [2, 4, 6], keep=2)
  manager = ckpt_lib.open_manager(tmp_path / 'checkpoints')
  assert manager.all_steps() == [4, 6]
  # A rerun after a kill replays steps that are on disk: kept, not rewritten (orbax would raise
  # StepAlreadyExistsError), and said so; an earlier step than the newest is not written either.
  for step in (6, 5):
    assert not ckpt_lib.save_train_state(manager, step, tiny_state, dict(MODEL, step=step))
  assert f'{tmp_path / "checkpoints"} already holds step 6' in caplog.text
  restored, meta = ckpt_lib.restore_train_state(manager, 6, jax.eval_shape(lambda: tiny_state))
  np.testing.assert_array_equal(restored.student_params['head']['classifier']['kernel'],
                                plus(tiny_state, 6).student_params['head']['classifier']['kernel'])

  # A save whose write fails rotates nothing away.
  assert ckpt_lib.save_train_state(manager, 8, tiny_state, dict(MODEL, step=8), keep=2)
  manager.wait_until_finished()
  def failed_write():
    raise ValueError('RESOURCE_EXHAUSTED: No space left on device')
  manager.wait_until_finished = failed_write
  with pytest.raises(ValueError, match='No space left'):
    ckpt_lib.finish_saves(manager, keep=1, close=False)
  assert manager.all_steps() == [4, 6, 8]


def test_an_unreadable_latest_checkpoint_is_set_aside_for_the_previous_one(tiny_state, tmp_path,
                                                                           caplog):
  save_steps(tmp_path / 'checkpoints', tiny_state, [2, 4, 6])
  corrupt(tmp_path / 'checkpoints' / '6')
  manager = ckpt_lib.open_manager(tmp_path / 'checkpoints')
  abstract = jax.eval_shape(lambda: tiny_state)
  state, meta = ckpt_lib.restore_latest(manager, abstract, MODEL)
  assert meta['step'] == 4 and manager.all_steps() == [2, 4]
  kernel = lambda s: np.asarray(s.student_params['head']['classifier']['kernel'])
  np.testing.assert_array_equal(kernel(state), kernel(plus(tiny_state, 4)))
  # Kept for inspection, out of the manager's way (the replay writes step 6 again).
  assert (tmp_path / 'checkpoints.unreadable' / '6' / 'state').is_dir()
  assert (f'checkpoint {tmp_path / "checkpoints"}/6 cannot be read' in caplog.text
          and f'moved to {tmp_path / "checkpoints.unreadable" / "6"}' in caplog.text)

  # When none can be read, nothing is moved and the error says what to do.
  for step in (2, 4):
    corrupt(tmp_path / 'checkpoints' / str(step))
  with pytest.raises(ValueError, match=r'no checkpoint in .*checkpoints can be read \(step 4: .*'
                                       r'move them elsewhere to start the run afresh'):
    ckpt_lib.restore_latest(ckpt_lib.open_manager(tmp_path / 'checkpoints'), abstract, MODEL)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '4']


def test_a_checkpoint_of_another_network_or_state_is_an_error_before_restoring(tiny_state,
                                                                               tmp_path):
  save_steps(tmp_path / 'checkpoints', tiny_state, [2])
  manager = ckpt_lib.open_manager(tmp_path / 'checkpoints')
  abstract = jax.eval_shape(lambda: tiny_state)
  other = dict(MODEL, arch='deeplabv3_resnet18')
  with pytest.raises(ValueError, match=(
      r'checkpoints/2 was written for pspnet_resnet18 \{.width_multiplier.: 0.0625\} with 19 '
      r'classes, but the config asks for deeplabv3_resnet18 .* give a new --workdir')):
    ckpt_lib.restore_latest(manager, abstract, other)
  # Same network, another training state (a discriminator the checkpoint does not have).
  bigger = abstract.replace(disc_params={'conv': {'kernel': jax.ShapeDtypeStruct((3, 3),
                                                                               jnp.float32)}})
  with pytest.raises(ValueError, match=r'does not fit the configured training state \(missing '
                                       r'disc_params/conv/kernel\): was it written with other'):
    ckpt_lib.restore_latest(manager, bigger, MODEL)
  assert manager.all_steps() == [2]   # a configuration error moves nothing


def test_non_finite_counts_of_the_state(tiny_state):
  state = tiny_state.replace(student_batch_stats=jax.tree.map(
      lambda x: x.at[:2].set(jnp.inf) if x.ndim else x, tiny_state.student_batch_stats))
  counts = jax.jit(train.non_finite_counts)(state)
  expected = sum(min(2, x.shape[0]) for x in jax.tree.leaves(tiny_state.student_batch_stats)
                 if x.ndim)
  assert float(counts['non_finite/student_batch_stats']) == expected > 0
  assert float(counts['non_finite/student_params']) == 0.0


def _config(**loss):
  config = load_test_config()
  for k, v in loss.items():
    config.loss[k] = v
  return config


FINE = {'loss/ce': 2.9, 'loss/aux_ce': 2.9, 'loss/pixel_wise': 0.3, 'loss/pair_wise': 0.04,
        'loss/adversarial': 0.1, 'loss/total': 10.0, 'grad_norm/student': 0.5,
        'disc/wasserstein': 0.2, 'disc/gradient_penalty': 0.5, 'grad_norm/disc': 0.1,
        **{f'non_finite/{f}': 0.0 for f in ('student_params', 'student_batch_stats',
                                            'student_opt_state', 'disc_params',
                                            'disc_batch_stats', 'disc_opt_state')}}


@pytest.mark.parametrize('changes, loss, first, expected', [
    ({}, {}, None, None),
    # A weighted term beyond float32 (the lambda_pa = 1e38 with a term of 5).
    ({'loss/pair_wise': 5.0, 'grad_norm/student': np.inf}, {'lambda_pa': 1e38}, None,
     'non-finite values in grad_norm/student at step 7: loss.lambda_pa * loss/pair_wise = '
     '1e+38 * 5 overflows float32; lower loss.lambda_pa (1e+38) or optim.lr (0.01).'),
    ({'loss/pixel_wise': np.nan, 'loss/total': np.nan}, {}, None,
     'non-finite values in loss/pixel_wise, loss/total at step 7: loss/pixel_wise is nan; lower '
     'loss.lambda_pi (10) or optim.lr (0.01).'),
    # Finite but dominant: its weight made the update explode.
    ({'loss/pair_wise': 0.04, 'grad_norm/student': np.inf, 'non_finite/student_params': 9.0},
     {'lambda_pa': 1e12}, None,
     "non-finite values in grad_norm/student, the student's parameters at step 7, while every "
     'loss term was finite: loss.lambda_pa * loss/pair_wise = 4e+10 dwarfs the cross-entropy '
     '(2.9): lower loss.lambda_pa (1e+12).'),
    # ... seen at the run's first step, before the blow-up inflated the cross-entropy too.
    ({'loss/ce': 1e9, 'loss/pair_wise': 0.3, 'non_finite/student_batch_stats': 4.0},
     {'lambda_pa': 1e12}, dict(FINE, **{'loss/pair_wise': 0.04}),
     "non-finite values in the student's BatchNorm statistics at step 7, while every loss term "
     'was finite: loss.lambda_pa * loss/pair_wise = 4e+10 at the first step dwarfs the '
     'cross-entropy (2.9): lower loss.lambda_pa (1e+12).'),
    # The optim.lr = 30: BatchNorm variances overflow, every loss finite.
    ({'non_finite/student_batch_stats': 3.0}, {}, None,
     "non-finite values in the student's BatchNorm statistics at step 7, while every loss term "
     'was finite (largest weighted term: loss.lambda_pi * loss/pixel_wise = 3): the updates are '
     'too large: lower optim.lr (0.01).'),
    ({'non_finite/disc_params': 1.0, 'grad_norm/disc': np.inf}, {}, None,
     "non-finite values in grad_norm/disc, the discriminator's parameters at step 7, while every "
     'loss term was finite (largest weighted term: loss.lambda_pi * loss/pixel_wise = 3): the '
     "discriminator's updates are too large: lower disc.lr (0.0004) or loss.lambda_d (0.1)."),
])
def test_non_finite_values_are_described_by_their_cause(changes, loss, first, expected):
  metrics = dict(FINE, **changes)
  assert train.describe_non_finite(7, metrics, _config(**loss), first) == expected


@pytest.mark.parametrize('error, line', [
    (OSError(errno.ENOSPC, 'No space left on device', '/disk/run/checkpoints/4'),
     'error: no space left on the device being written (/disk/run/checkpoints/4): free space '
     'there or give a --workdir / --out on a larger disk (the checkpoints that had completed are '
     'intact: a training run resumes from the last).'),
    # As tensorstore reports it, inside orbax's error.
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "/disk/run/x": No space left on '
                "device [os_error_code='28']"),
     'error: no space left on the device being written (/disk/run/x): free space'),
    (OSError(errno.EROFS, 'Read-only file system', '/ro/run'),
     'error: cannot write to a read-only file system (/ro/run): give a writable --workdir / '
     '--out.'),
    (PermissionError(errno.EACCES, 'Permission denied', '/root/run'),
     'error: permission denied (/root/run): give a --workdir / --out this user can write to'),
    (ckpt_lib.Preempted('SIGTERM received at step 5: saved'),
     'stopped: SIGTERM received at step 5'),
    (FloatingPointError('non-finite values in x'), 'error: non-finite values in x'),
])
def test_error_lines_of_what_a_disk_or_a_run_can_raise(error, line):
  assert cli.error_line(error).startswith(line)


def test_a_library_error_says_where_to_see_it_and_a_bug_keeps_its_traceback():
  try:
    np.zeros(2).reshape(3)   # a ValueError raised inside NumPy
  except ValueError as e:
    assert cli.error_line(e).endswith(f'(raised in a library; {cli.TRACEBACK_ENV}=1 shows where)')
  config = config_base.base_config()
  config.loss.gan_loss = 'wgan'
  try:
    train.loss_config(config)   # raised by skd_jax: its message says what to do
  except ValueError as e:
    assert cli.error_line(e) == "error: loss.gan_loss must be 'wgan_gp' or 'hinge', got 'wgan'"
  assert cli.error_line(RuntimeError('a bug')) is None and cli.error_line(TypeError()) is None


def test_sigterm_on_one_process_is_a_preemption_notice():
  class Manager:
    def reached_preemption(self, step):
      return False
  previous = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.PreemptionNotice(Manager()) as notice:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(2) and notice.reason == 'SIGTERM received'
  assert signal.getsignal(signal.SIGTERM) == previous
