"""The methods SKD is compared with (logit KD, CWD, DIST) in the one train step, and their presets.

Each term's value in a whole step is checked against a float64 NumPy computation (the twins of
tests/test_losses.py) on the step's own student and teacher outputs, recomputed here from the same
state and batch; the CWD adapter's first update against SGD written out on the NumPy gradient.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from skd_jax import checkpoint as ckpt_lib
from skd_jax import config_base
from skd_jax import experiment
from skd_jax import train
from test_losses import np_cwd, np_cwd_grad, np_dist, np_logit_kd
from test_train import abstract_step_inputs, count_primitive, load_test_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every new term on, with settings off their defaults where a default would hide a missing one.
METHODS = dict(kd_weight=1.0, kd_temperature=2.0, cwd_logit_weight=3.0, cwd_feature_weight=50.0,
               cwd_temperature=4.0, dist_weight=1.0, dist_aux_weight=0.4, dist_groups=2)
TERM_WEIGHTS = {'kd': 'kd_weight', 'cwd_logit': 'cwd_logit_weight',
                'cwd_feature': 'cwd_feature_weight', 'dist': 'dist_weight',
                'dist_aux': 'dist_aux_weight'}
# A term in the step against its float64 NumPy value on the float32 outputs recomputed here: the
# step's forward and this one are the same XLA computation but compiled apart (other fusions), so
# the outputs differ in their last bits. Measured (Intel Xeon, this config): at most 1.3e-6
# relative over the five terms alone and combined; 1e-5 is a 7x margin, and a term computed on
# other outputs (the aux logits for the main, the feature before the adapter) is off by >1e-2.
VALUE_RTOL = 1e-5


def method_config(skd: bool, **loss) -> ml_collections.ConfigDict:
  """configs/test.py with a deterministic student (no dropout), SKD's terms on or off."""
  config = load_test_config()
  config.student.overrides.head_dropout = 0.0
  config.student.overrides.aux_dropout = 0.0
  if not skd:
    config_base.distillation_off(config)
  for key, value in loss.items():
    config.loss[key] = value
  return config


@pytest.fixture(scope='module')
def inputs():
  """(teacher module, its variables, one batch of 8) shared by every step here."""
  config = load_test_config()
  teacher = experiment.build_model(config, config.teacher)
  teacher_vars = jax.device_get(jax.jit(lambda: teacher.init(
      jax.random.key(3, impl='rbg'), jnp.zeros((1, 64, 64, 3)), train=False))())
  rng = np.random.default_rng(0)
  # Std 2, not the data's ~50: the randomly initialised teacher (BatchNorm at its initial
  # statistics) multiplies its input into features of ~3e3, whose softmax over positions at
  # T = 4 underflows in the NumPy twins (0 * log 0); at 2 they stay below ~1.5e2.
  batch = {'image': rng.normal(0, 2, (8, 64, 64, 3)).astype(np.float32),
           'label': rng.integers(0, 19, (8, 64, 64)).astype(np.int32)}
  batch['label'][:, :8] = 255
  return teacher, teacher_vars, batch


# SKD's three terms (with CIRKD's hinge critic: WGAN-GP's double backward triples the compile time)
# and all five new ones.
ALL_ON = dict(METHODS, gan_loss='hinge')


@pytest.fixture(scope='module')
def start(inputs):
  """(ctx, state) of seed 0 with every term on: its state holds the adapter and the critic."""
  ctx = train.make_step_context(method_config(skd=True, **ALL_ON), inputs[0])
  state = jax.jit(functools.partial(train.create_train_state, ctx, (8, 64, 64, 3)))(0)
  return ctx, jax.device_get(state)


def one_step(config, inputs, start):
  """(ctx, start state, new state, host metrics) of one step of `config` from `start`'s state,
  less the parts (critic, adapter) that `config` does not use."""
  teacher, teacher_vars, batch = inputs
  ctx = train.make_step_context(config, teacher)
  state = start[1]
  if ctx.disc is None:
    state = state.replace(disc_params={}, disc_batch_stats={}, disc_opt_state={})
  if ctx.adapter is None:
    state = state.replace(adapter_params={}, adapter_opt_state={})
  new_state, metrics = jax.jit(functools.partial(train.train_step, ctx=ctx))(
      state, batch, teacher_vars)
  return ctx, state, jax.device_get(new_state), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope='module')
def want(inputs, start):
  """Each new term in float64 NumPy (with `start`'s settings) on the outputs of the step's
  student (train mode, its batch statistics) and teacher (eval mode) for `start`'s state."""
  teacher, teacher_vars, batch = inputs
  ctx, state = start
  cfg = ctx.loss
  student = jax.jit(lambda p, s, x: ctx.student.apply(
      {'params': p, 'batch_stats': s}, x, train=True, mutable=['batch_stats'])[0])
  zs, zs_aux, fs = jax.device_get(student(state.student_params, state.student_batch_stats,
                                          batch['image']))
  zt, zt_aux, ft = jax.device_get(jax.jit(
      lambda v, x: teacher.apply(v, x, train=False))(teacher_vars, batch['image']))
  f64 = lambda x: np.asarray(x, np.float64)
  zs, zs_aux, zt, zt_aux = map(f64, (zs, zs_aux, zt, zt_aux))
  fs, ft = f64(fs['head']), f64(ft['head'])
  kernel = f64(state.adapter_params['conv']['kernel'])[0, 0]   # [Cs, Ct]
  return {
      'kd': np_logit_kd(zs, zt, cfg.kd_temperature),
      'cwd_logit': np_cwd(zs, zt, cfg.cwd_temperature),
      # The reference's divisor: N * Cs, the student's channels before the adapter.
      'cwd_feature': np_cwd(fs @ kernel, ft, cfg.cwd_temperature, divisor=fs.shape[-1]),
      'dist': sum(np_dist(zs, zt, cfg.dist_temperature, cfg.dist_groups)),
      'dist_aux': sum(np_dist(zs_aux, zt_aux, cfg.dist_temperature, cfg.dist_groups)),
      'feature': fs, 'teacher_feature': ft, 'kernel': kernel,
  }


def test_all_new_terms_with_skd_equal_numpy_and_sum_into_the_total(inputs, start, want):
  """SKD's three terms and the five new ones in one step: each new term is its NumPy value, the
  total is their weighted sum, and the adapter's update is SGD on the NumPy gradient."""
  ctx, state, new_state, metrics = one_step(method_config(skd=True, **ALL_ON), inputs, start)
  for term in TERM_WEIGHTS:
    assert metrics[f'loss/{term}'] == pytest.approx(want[term], rel=VALUE_RTOL), term
  cfg = ctx.loss
  total = (metrics['loss/ce'] + cfg.aux_weight * metrics['loss/aux_ce']
           + cfg.lambda_pi * metrics['loss/pixel_wise'] + cfg.lambda_pa * metrics['loss/pair_wise']
           + cfg.lambda_ho * metrics['loss/adversarial']
           + sum(getattr(cfg, w) * want[t] for t, w in TERM_WEIGHTS.items()))
  assert metrics['loss/total'] == pytest.approx(total, rel=VALUE_RTOL)
  assert 'disc/hinge' in metrics and np.isfinite(metrics['grad_norm/adapter'])

  # The adapter (student 8 -> teacher 16 channels) trains with the student's SGD: its first
  # update, from the closed-form gradient of 50 * CWD through the 1x1 conv, as torch.optim.SGD.
  fs, kernel = want['feature'], want['kernel']
  assert kernel.shape == (8, 16)
  d_map = np_cwd_grad(fs @ kernel, want['teacher_feature'], cfg.cwd_temperature,
                      divisor=fs.shape[-1])
  grad = cfg.cwd_feature_weight * np.einsum('nhwc,nhwo->co', fs, d_map)
  config = method_config(skd=True)
  rate = float(ctx.student_lr(0))
  assert rate == pytest.approx(config.optim.lr * (1 - 1 / config.optim.num_steps) ** 0.9)
  momentum = grad + config.optim.weight_decay * kernel          # buf = d_p at the first step
  new_kernel = np.asarray(new_state.adapter_params['conv']['kernel'], np.float64)[0, 0]
  change = np.abs(rate * momentum).max()
  # 1e-4 of the change: float32 against float64 on a sum over 8 * 8 * 8 positions (measured 2e-6).
  np.testing.assert_allclose(new_kernel, kernel - rate * momentum, rtol=0, atol=1e-4 * change)
  buf = jax.tree.leaves(new_state.adapter_opt_state)
  assert any(np.shape(b) == (1, 1, 8, 16) and np.allclose(np.asarray(b)[0, 0], momentum,
                                                          rtol=1e-4, atol=1e-4 * abs(momentum).max())
             for b in buf)


# Two of the five (each costs a compilation of the step): KD through the main logits, DIST
# through the aux head's. CWD on features moves the adapter by the NumPy gradient (above); all
# five equal NumPy in the step above.
@pytest.mark.parametrize('term', ['kd', 'dist_aux'])
def test_a_new_term_alone_is_its_numpy_value_and_moves_the_student(term, inputs, start, want):
  """The student alone plus one term: the term equals NumPy, no other distillation term is
  logged, and the student's update differs from the student-alone step's from the same state."""
  settings = {k: v for k, v in METHODS.items() if not k.endswith('_weight')}
  settings[TERM_WEIGHTS[term]] = METHODS[TERM_WEIGHTS[term]]
  ctx, state, new_state, metrics = one_step(method_config(skd=False, **settings), inputs, start)
  assert metrics[f'loss/{term}'] == pytest.approx(want[term], rel=VALUE_RTOL)
  logged = {k for k in metrics if k.startswith('loss/')}
  assert logged == {'loss/ce', 'loss/aux_ce', 'loss/total', f'loss/{term}'}
  assert (ctx.adapter is not None) == (term == 'cwd_feature')

  _, base_state, base_new, _ = _baseline_step(inputs, start)
  leaves = lambda s: [np.asarray(x, np.float64) for x in jax.tree.leaves(s.student_params)]
  change = max(np.abs(n - s).max() for n, s in zip(leaves(base_new), leaves(base_state)))
  diff = max(np.abs(n - b).max() for n, b in zip(leaves(new_state), leaves(base_new)))
  # The term's gradient moves the student: by >1% of the step (measured 6% to 60%), where float32
  # noise between two compilations of one step is below 1e-5 of it.
  assert diff > 1e-2 * change, (term, diff, change)


_BASELINE = {}   # the student-alone step, computed once for every term's comparison


def _baseline_step(inputs, start):
  if not _BASELINE:
    _BASELINE['step'] = one_step(method_config(skd=False), inputs, start)
  return _BASELINE['step']


def test_a_zero_weight_removes_its_term_from_the_compiled_step():
  """As the teacher and the discriminator (tests/test_train.py): from the traced step, each new
  term alone brings the teacher's forward (and CWD on features its adapter's conv, forward and
  both gradients) and its metric; at weight 0 the step has neither, nor the adapter's state."""
  config = load_test_config()
  teacher = experiment.build_model(config, config.teacher)
  teacher_vars = jax.eval_shape(lambda: teacher.init(jax.random.key(0, impl='rbg'),
                                                     jnp.zeros((1, 64, 64, 3)), train=False))
  teacher_convs = sum(1 for x in jax.tree.leaves(teacher_vars['params']) if x.ndim == 4)

  def traced(**loss):
    ctx = train.make_step_context(method_config(skd=False, **loss), teacher)
    state, batch, tv = abstract_step_inputs(ctx, teacher_variables=teacher_vars)
    closed, (_, metrics) = jax.make_jaxpr(functools.partial(train.train_step, ctx=ctx),
                                          return_shape=True)(state, batch, tv)
    jaxpr = closed.jaxpr
    return ctx, state, count_primitive(jaxpr, 'conv_general_dilated'), len(str(jaxpr)), metrics

  base_ctx, base_state, base_convs, base_size, base_metrics = traced()
  assert base_ctx.teacher is None and base_ctx.adapter is None
  assert base_state.adapter_params == {} and base_state.adapter_opt_state == {}
  for term, weight in TERM_WEIGHTS.items():
    ctx, state, convs, size, metrics = traced(**{weight: METHODS[weight]})
    assert f'loss/{term}' in metrics and f'loss/{term}' not in base_metrics
    assert ctx.teacher is not None
    adapter = term == 'cwd_feature'
    assert (ctx.adapter is not None) == adapter and (state.adapter_params != {}) == adapter
    assert convs == base_convs + teacher_convs + (3 if adapter else 0), term
    assert size > base_size
  # With SKD's terms on and every new one at 0, nothing new is traced either.
  ctx, state, _, _, metrics = traced(lambda_pi=1.0)
  assert ctx.adapter is None and not set(TERM_WEIGHTS) & {k[5:] for k in metrics}


def test_adapter_is_checkpointed_with_the_student_and_left_out_of_the_network(start, tmp_path):
  config = method_config(skd=True, **ALL_ON)
  ctx, state = start
  manager = ckpt_lib.open_manager(tmp_path / 'checkpoints')
  ckpt_lib.save_train_state(manager, 1, state, experiment.model_metadata(config))
  ckpt_lib.finish_saves(manager)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  restored, _ = ckpt_lib.restore_train_state(ckpt_lib.open_manager(tmp_path / 'checkpoints'), 1,
                                             abstract)
  for want, got in zip(jax.tree.leaves((state.adapter_params, state.adapter_opt_state)),
                       jax.tree.leaves((restored.adapter_params, restored.adapter_opt_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert restored.adapter_params['conv']['kernel'].shape == (1, 1, 8, 16)
  # What evaluation and export read is the network alone.
  variables, _ = ckpt_lib.load_variables(tmp_path / 'checkpoints')
  assert sorted(variables) == ['batch_stats', 'params']
  assert (jax.tree.structure(variables['params'])
          == jax.tree.structure(jax.device_get(state.student_params)))


def test_poly_schedule_floor_is_the_closed_form_in_both_optimisers():
  """DIST_KD's ``1e-4 + (lr - 1e-4) * (1 - t / T) ** 0.9``, iterations counted as the SKD
  reference's (update ``count`` has ``t = count + 1``), for the student and an SGD critic."""
  config = load_test_config()
  config.optim.num_steps = 40
  config.optim.min_lr = 1e-4
  config.disc.min_lr = 2e-5
  ctx = train.make_step_context(config, experiment.build_model(config, config.teacher))
  for schedule, lr, floor in ((ctx.student_lr, config.optim.lr, 1e-4),
                              (ctx.disc_lr, config.disc.lr, 2e-5)):
    for count in (0, 1, 20, 38, 39, 45):
      t = min(count + 1, 40)
      want = floor + (lr - floor) * (1 - t / 40) ** 0.9
      assert float(jax.jit(schedule)(jnp.asarray(count))) == pytest.approx(want, rel=1e-6)
  # The floor reaches the update: one SGD step at the last count moves a parameter by min_lr * g.
  tx, _ = train.poly_sgd(0.02, 0.0, 0.0, 4, 0.9, min_lr=1e-4)
  params = {'w': jnp.ones(3)}
  opt_state = tx.init(params)
  for _ in range(4):
    updates, opt_state = tx.update({'w': jnp.full(3, 2.0)}, opt_state, params)
  np.testing.assert_allclose(updates['w'], -1e-4 * 2.0, rtol=1e-6)


@pytest.mark.parametrize('term, weight', [('cwd_feature', 'cwd_feature_weight'),
                                          ('dist_aux', 'dist_aux_weight'), ('kd', 'kd_weight')])
def test_non_finite_diagnosis_names_the_new_terms(term, weight):
  config = load_test_config()
  config.loss[weight] = 1e38
  metrics = {'loss/ce': 2.9, 'loss/aux_ce': 2.9, 'loss/total': np.inf, f'loss/{term}': 5.0,
             'grad_norm/student': np.inf}
  assert train.describe_non_finite(7, metrics, config) == (
      f'non-finite values in loss/total, grad_norm/student at step 7: loss.{weight} * '
      f'loss/{term} = 1e+38 * 5 overflows float32; lower loss.{weight} (1e+38) or optim.lr '
      '(0.01).')


# Each preset's distillation terms (besides CE and aux CE), from its docstring's sources.
PRESETS = {'baseline': set(), 'kd': {'kd'}, 'skd': {'pixel_wise', 'pixel_kl', 'pair_wise',
                                                    'adversarial'},
           'cwd': {'kd', 'cwd_logit', 'cwd_feature', 'adversarial'}, 'dist': {'dist', 'dist_aux'}}


def load_preset(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('method', list(PRESETS))
def test_preset_documents_its_source_and_trains_two_tiny_steps(method):
  """Each preset opens with its command, source and published number, and its tiny variant (the
  widths, crop and batch of configs/test.py; a DeepLabV3-R18 teacher at 1/8 width standing in for
  the R101) trains 2 steps with exactly its terms, all finite."""
  name = f'cityscapes_cirkd_{method}'
  module = load_preset(name)
  doc = module.__doc__
  assert f'--config=configs/{name}.py' in doc and 'Source' in doc and 'published' in doc
  config = module.get_config()
  assert config.student.arch == 'deeplabv3_resnet18' and config.optim.batch_size == 16
  config.student.overrides.width_multiplier = 1 / 16
  config.teacher.arch = 'deeplabv3_resnet18'
  config.teacher.overrides.width_multiplier = 1 / 8
  config.disc.features = (8, 8, 16, 16)
  config.disc.min_input_size = 64
  config.optim.batch_size = 8
  config.optim.num_steps = 4
  cfg = train.loss_config(config)
  teacher = experiment.build_model(config, config.teacher) if cfg.uses_teacher else None
  ctx = train.make_step_context(config, teacher)
  state = jax.jit(functools.partial(train.create_train_state, ctx, (8, 64, 64, 3)))(0)
  teacher_vars = {} if teacher is None else jax.jit(lambda: teacher.init(
      jax.random.key(1, impl='rbg'), jnp.zeros((1, 64, 64, 3)), train=False))()
  step = jax.jit(functools.partial(train.train_step, ctx=ctx))
  rng = np.random.default_rng(0)
  for i in range(2):
    batch = {'image': rng.normal(0, 2, (8, 64, 64, 3)).astype(np.float32),
             'label': rng.integers(0, 19, (8, 64, 64)).astype(np.int32)}
    state, metrics = step(state, batch, teacher_vars)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    terms = {k[5:] for k in metrics if k.startswith('loss/')} - {'ce', 'aux_ce', 'total'}
    assert terms == PRESETS[method]
    # The rate of update i: the poly schedule (counted from 1) with the preset's floor.
    floor = config.optim.min_lr
    assert metrics['lr/student'] == pytest.approx(
        floor + (config.optim.lr - floor) * (1 - (i + 1) / 4) ** 0.9, rel=1e-6)
  assert int(state.step) == 2 and (state.adapter_params != {}) == (method == 'cwd')


def test_former_cirkd_config_name_is_the_skd_preset():
  old = load_preset('cityscapes_cirkd').get_config().to_dict()
  assert old == load_preset('cityscapes_cirkd_skd').get_config().to_dict()
