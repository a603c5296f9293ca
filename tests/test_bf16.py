"""Mixed precision: ``config.dtype = 'bfloat16'`` through the whole SKD train step (tiny config).

What bfloat16 must and must not touch: the student's and the teacher's convolutions and
activations run in bfloat16; parameters, optimiser states, BatchNorm statistics, every loss (CE,
pixel-wise, pair-wise, the critic's and its gradient penalty) and every metric stay float32. The
discriminator computes in float32 (train.discriminator does not pass config.dtype): its gradient
penalty differentiates it twice, and it costs little next to the segmenters.

Checked on the program JAX hands to XLA (the jaxpr and the lowered StableHLO). The CPU backend's
compiled HLO has no bfloat16 convolutions at all: XLA:CPU converts them to float32 and back, so on
CPU bfloat16 saves nothing; the GPU and TPU backends have bfloat16 convolutions.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from skd_jax import sharding as sharding_lib
from skd_jax import train
from skd_jax import experiment
from test_train import load_test_config

# The test config's global batch. Smaller batches make the comparison meaningless, not the code
# wrong: the PSP head's 1x1 bin is batch-normalised over B values per channel, and with B = 2 two
# nearly equal values give a gradient of up to 1 / sqrt(eps) that bfloat16 rounding of their
# difference changes by 2x (seen: student gradient norm 19 vs 45 in float32 vs bfloat16).
BATCH = 8
CROP = 64
TRAIN_STEPS = 50

# Tolerances of |bf16 - f32| <= rtol * |f32| + atol for the first step's metrics (same init, same
# batch). bfloat16 keeps 8 significant bits (unit roundoff u = 2^-9 ~ 2e-3).
#   EXACT: terms formed from float32 values only (learning rates).
#   CLOSE: pixel averages over the float32 classifier's logits (CE, the batch-summed pixel-wise
#     soft CE) and their weighted sum. At initialisation the logits are small (classifier init
#     std 0.01), so these sit near log(19), and bfloat16 features move them by < 5e-5 relative.
#     rtol = u: bfloat16 errors in the activations must not reach these sums by more than one
#     bfloat16 rounding. (That the losses are computed in float32 is checked on the program, by
#     test_bfloat16_computes_in_the_networks_only.)
#   LOOSE: everything that contrasts two bfloat16 networks' features or goes through the critic:
#     pair-wise similarities, the KL (soft CE minus the teacher's entropy), critic scores and their
#     differences, gradient norms. Differences of nearly equal quantities amplify the ~u relative
#     error of the activations, and max-pooled pair-wise nodes may pick other pixels: seen up to
#     3.3e-3 absolute (6% relative) on the pair-wise term of ~0.05, 3.8e-3 absolute on critic
#     terms of size 0.002..0.08, 0.4% on the gradient norms.
# Both runs take one step from the same state and batch, so the difference is bfloat16's rounding
# of these inputs' activations, not float32 noise grown over steps. Over 5 seeds (state, teacher
# and batch; Intel Xeon, the step in the reference order), the largest share of its tolerance a
# term used was 2.3% (CLOSE, the pixel-wise term) and 19% (LOOSE, the discriminator's gradient
# norm; 19% also for the Wasserstein term), i.e. margins of 40x and 5x.
EXACT = (0.0, 0.0)
CLOSE = (2.0**-9, 0.0)
LOOSE = (5e-2, 1e-2)
TOLERANCES = {
    'lr/student': EXACT, 'lr/disc': EXACT,
    'loss/ce': CLOSE, 'loss/aux_ce': CLOSE, 'loss/pixel_wise': CLOSE, 'loss/total': CLOSE,
    'loss/pair_wise': LOOSE, 'loss/pixel_kl': LOOSE, 'loss/adversarial': LOOSE,
    'disc/real_score': LOOSE, 'disc/fake_score': LOOSE, 'disc/wasserstein': LOOSE,
    'disc/gradient_penalty': LOOSE, 'disc/loss': LOOSE,
    'grad_norm/student': LOOSE, 'grad_norm/disc': LOOSE,
}


def step_context(dtype: str) -> train.StepContext:
  """The full SKD objective of configs/test.py (every weight > 0), computing in `dtype`."""
  config = load_test_config()
  config.dtype = dtype
  config.optim.num_steps = TRAIN_STEPS  # The poly schedule reaches lr 0 at num_steps.
  teacher = experiment.build_model(config, config.teacher)
  ctx = train.make_step_context(config, teacher)
  assert ctx.loss.uses_teacher and ctx.loss.uses_disc and ctx.loss.lambda_pa > 0
  return ctx


def random_batch(seed: int) -> dict[str, np.ndarray]:
  """image: [B, H, W, 3] float32 (the Caffe-BGR scale), label: [B, H, W] int32, a few ignored."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 19, (BATCH, CROP, CROP)).astype(np.int32)
  label[:, :4] = 255
  return {'image': rng.normal(0.0, 50.0, (BATCH, CROP, CROP, 3)).astype(np.float32),
          'label': label}


def walk(jaxpr, prefix: str = ''):
  """(equation, full name stack) of every equation in `jaxpr` and its sub-jaxprs.

  A sub-jaxpr's name stacks are relative to the equation that calls it, hence the prefix.
  """
  for eqn in jaxpr.eqns:
    where = f'{prefix}/{eqn.source_info.name_stack}'
    yield eqn, where
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from walk(sub, where)


def conv_dtypes(jaxpr) -> list[tuple[str, str]]:
  """(operand dtype, name stack) of every convolution of the program."""
  return [(str(eqn.invars[0].aval.dtype), where) for eqn, where in walk(jaxpr)
          if eqn.primitive.name == 'conv_general_dilated']


def bf16_outside_networks(jaxpr) -> list[str]:
  """Equations outside the segmenters that compute in bfloat16 (casts and stop_gradient do not)."""
  return [f'{eqn.primitive.name} at {where}' for eqn, where in walk(jaxpr)
          if 'Segmenter' not in where
          and eqn.primitive.name not in ('convert_element_type', 'stop_gradient')
          and any(getattr(v.aval, 'dtype', None) == jnp.bfloat16 for v in eqn.outvars)]


def num_kernels(params, exclude: str = '', pointwise: bool | None = None) -> int:
  """Number of conv kernels (4-D leaves) of a parameter tree, those under `exclude` left out;
  only the 1x1 ones with ``pointwise=True``, only the others with ``pointwise=False``."""
  return sum(1 for path, x in jax.tree_util.tree_leaves_with_path(params)
             if x.ndim == 4 and not (exclude and exclude in jax.tree_util.keystr(path))
             and (pointwise is None or pointwise == (x.shape[:2] == (1, 1))))


def float_dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def initial_state(ctx: train.StepContext, abstract: bool = False):
  """(train state, teacher variables) on host, or their shapes; the same for either dtype."""
  make_state = functools.partial(train.create_train_state, ctx, (BATCH, CROP, CROP, 3), 0)
  init_teacher = lambda: ctx.teacher.init(jax.random.key(7, impl='rbg'),
                                          jnp.zeros((1, CROP, CROP, 3)), train=False)
  if abstract:
    return jax.eval_shape(make_state), jax.eval_shape(init_teacher)
  return jax.device_get((jax.jit(make_state)(), jax.jit(init_teacher)()))


def test_bfloat16_computes_in_the_networks_only():
  """dtypes of the state, activations and every convolution of the traced and lowered step."""
  ctx32, ctx16 = step_context('float32'), step_context('bfloat16')
  state, teacher_variables = initial_state(ctx16, abstract=True)
  batch = random_batch(0)
  # Parameters, BN statistics and optimiser states are float32, as with float32 compute.
  assert float_dtypes(state) == float_dtypes(teacher_variables) == {'float32'}
  assert jax.tree.leaves(state) == jax.tree.leaves(initial_state(ctx32, abstract=True)[0])

  # Activations: bfloat16 out of every stage and the pair-wise feature; logits float32.
  logits, aux_logits, features = jax.eval_shape(
      lambda v: ctx16.student.apply(v, jnp.zeros((BATCH, CROP, CROP, 3)), train=False),
      {'params': state.student_params, 'batch_stats': state.student_batch_stats})
  assert logits.dtype == aux_logits.dtype == jnp.float32
  assert {k: str(v.dtype) for k, v in features.items()} == {k: 'bfloat16' for k in features}

  # Convolutions, counted from the parameter trees independently of the traced program: every
  # segmenter conv but the two float32 classifiers runs in bfloat16, in the teacher's forward and
  # in the student's forward and its two gradients (none for the input of the first conv).
  jaxpr = jax.make_jaxpr(functools.partial(train.train_step, ctx=ctx16))(
      state, batch, teacher_variables).jaxpr
  convs = conv_dtypes(jaxpr)
  student = num_kernels(state.student_params, exclude='classifier')
  teacher = num_kernels(teacher_variables['params'], exclude='classifier')
  assert sum(d == 'bfloat16' for d, _ in convs) == teacher + 3 * student - 1
  assert all('Segmenter' in where and 'classifier' not in where
             for d, where in convs if d == 'bfloat16')
  assert all(d == 'float32' for d, where in convs if 'Discriminator' in where)
  # BatchNorm statistics (and their gradients) are sums in float32.
  bn_sums = [str(eqn.outvars[0].aval.dtype) for eqn, where in walk(jaxpr)
             if eqn.primitive.name == 'reduce_sum' and re.search(r'/(\w+_)?bn\d?(/|$)', where)]
  assert bn_sums and set(bn_sums) == {'float32'}
  # Losses, the critic, metrics and the optimiser compute nothing in bfloat16.
  outside = bf16_outside_networks(jaxpr)
  assert not outside, outside[:5]

  # The StableHLO handed to XLA: the same, less the teacher's aux head, whose output the step
  # does not use (lowering drops it); on CPU the 1x1 convolutions are matrix products
  # (`ops.pointwise_conv`), bfloat16 too. Nothing bfloat16 at all in the float32 step.
  mesh = sharding_lib.make_mesh()
  text = train.jit_train_step(ctx16, mesh).lower(state, batch, teacher_variables).as_text()
  hlo_convs = re.findall(r'stablehlo\.convolution.*-> tensor<[^>]*x(bf16|f32)>', text)
  hlo_dots = re.findall(r'stablehlo\.dot_general.*-> tensor<[^>]*x(bf16|f32)>', text)
  teacher_aux = num_kernels(teacher_variables['params']['aux_head'], exclude='classifier')
  spatial = lambda params: num_kernels(params, exclude='classifier', pointwise=False)
  pointwise = lambda params: num_kernels(params, exclude='classifier', pointwise=True)
  assert hlo_convs.count('bf16') == (spatial(teacher_variables['params']) - teacher_aux
                                     + 3 * spatial(state.student_params) - 1)
  assert hlo_dots.count('bf16') >= (pointwise(teacher_variables['params'])
                                    + 3 * pointwise(state.student_params))
  text = train.jit_train_step(ctx32, mesh).lower(state, batch, teacher_variables).as_text()
  assert 'stablehlo.convolution' in text and 'bf16' not in text


def test_bfloat16_step_matches_float32_and_trains_50_steps_finite():
  ctx32, ctx16 = step_context('float32'), step_context('bfloat16')
  state, teacher_variables = initial_state(ctx32)
  mesh = sharding_lib.make_mesh()
  repl = sharding_lib.replicated(mesh)
  batch = random_batch(0)
  steps = {name: train.jit_train_step(ctx, mesh)
           for name, ctx in (('float32', ctx32), ('bfloat16', ctx16))}
  # The first step from the same state on the same batch; copies, as the step donates its state.
  metrics = {name: jax.device_get(step(jax.device_put(state, repl), batch, teacher_variables)[1])
             for name, step in steps.items()}
  assert float_dtypes(metrics['bfloat16']) == {'float32'}
  assert sorted(metrics['bfloat16']) == sorted(TOLERANCES)
  for key, (rtol, atol) in TOLERANCES.items():
    want, got = float(metrics['float32'][key]), float(metrics['bfloat16'][key])
    assert abs(got - want) <= rtol * abs(want) + atol, (key, want, got)

  # 50 steps of bfloat16 training at the reference learning rates, a new batch each step.
  state16 = jax.device_put(state, repl)
  history = []
  for step in range(TRAIN_STEPS):
    state16, out = steps['bfloat16'](state16, random_batch(step + 1), teacher_variables)
    history.append(out)
  history, final = jax.device_get((history, state16))
  bad = sorted({k for m in history for k, v in m.items() if not np.isfinite(v)})
  assert not bad, f'non-finite metrics within {TRAIN_STEPS} bfloat16 steps: {bad}'
  assert int(final.step) == TRAIN_STEPS
  assert float_dtypes(final) == {'float32'}
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final) if x.dtype == np.float32)
  # It did train: every student parameter moved away from its initialisation.
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(final.student_params),
                                                  jax.tree.leaves(state.student_params))]
  assert min(moved) > 0
