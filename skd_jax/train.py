"""Distillation training: the train state, one jitted train step, and the loop around it.

One step, in the reference order (skd-reference.md section 4), checked as a whole step against a
PyTorch statement of the reference (tests/test_step_parity.py):
  1. teacher forward, eval mode, no gradient -> teacher logits and pair-wise feature;
  2. student forward, train mode -> CE + aux CE + lambda_pi * pixel-wise + lambda_pa * pair-wise
     + lambda_ho * adversarial (D(student logits): the discriminator's parameters held fixed, its
     spectral-norm and BatchNorm state advanced), and the student's update;
  3. one discriminator update on the pre-update student logits (gradient stopped) against the
     teacher's: WGAN-GP or hinge, from D(teacher logits), then D(student logits), then (WGAN-GP)
     D(interpolation) for the gradient penalty, each call advancing the state of the one before.
Both optimisers count iterations from 1, as the reference's ``lr_poly`` (`poly_sgd`). Where the
step knowingly departs from the reference (spectral norm's backward, `disc.sn_backward`), the
README's faithfulness notes say so, with the measured size.
A weight of 0 removes its term from the compiled step: no teacher forward when every distillation
weight is 0, no discriminator when lambda_ho is 0. The student-alone baseline and teacher training
are this same program with those weights at 0.

The methods SKD is compared with are terms of the same step, each with its weight in
``config.loss`` (0 = absent), free to combine with SKD's three: logit KD (``kd_weight``), CWD on
the logits and on the pre-classifier features (``cwd_logit_weight``, ``cwd_feature_weight``; the
features through a learned 1x1 `ChannelAdapter` when the channel counts differ, whose parameters
are ``TrainState.adapter_params``) and DIST on the main and the aux logits (``dist_weight``,
``dist_aux_weight``); see `losses` for each formula and its source.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Iterator

from absl import logging
import flax
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from skd_jax import checkpoint as ckpt_lib
from skd_jax import evaluator as evaluator_lib
from skd_jax import experiment
from skd_jax import inference
from skd_jax import losses
from skd_jax import sharding as sharding_lib
from skd_jax.data import spec
from skd_jax.models.adapters import ChannelAdapter
from skd_jax.models import discriminator as disc_lib
from skd_jax.paths import as_path

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a training run updates; one pytree, replicated over the mesh.

  The teacher is not here: its variables are an argument of `train_step`, never optimised and
  never checkpointed with the run. Without a discriminator (lambda_ho = 0) its fields are empty
  dicts, and so are the adapter's without CWD on features through an adapter.

  The CWD feature adapter is trained by the student's optimiser from the student's loss, as CIRKD
  puts it in the student's SGD parameter list: the same transform (`StepContext.student_tx`:
  rate schedule, momentum, weight decay), whose updates are elementwise, so its state held apart
  (``adapter_opt_state``) gives the updates one joint state would; apart, the student's
  parameters stay exactly the network's (what evaluation and export read).
  """
  step: jax.Array                # int32 []
  rng: jax.Array                 # uint32 key data of a `jax.random.key`
  student_params: PyTree
  student_batch_stats: PyTree
  student_opt_state: PyTree
  disc_params: PyTree
  disc_batch_stats: PyTree       # spectral-norm vectors and the input BatchNorm's statistics
  disc_opt_state: PyTree
  adapter_params: PyTree = dataclasses.field(default_factory=dict)   # CWD's 1x1 conv, or {}
  adapter_opt_state: PyTree = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The loss weights and options of one step: ``config.loss`` (`config_base`, where each has its
  value and meaning) and ``config.data.ignore_label``. No defaults here: `loss_config` builds it."""
  aux_weight: float
  lambda_pi: float
  lambda_pa: float
  lambda_ho: float
  lambda_d: float
  lambda_gp: float
  gan_loss: str
  pi_temperature: float
  pi_reduction: str
  pa_pool: str
  pa_pool_scale: float
  pa_pool_kernel: int
  pa_alpha: int
  pa_detach_norm: bool
  ohem: bool
  ohem_thresh: float
  ohem_min_kept: int
  # The methods SKD is compared with (config_base explains each; weight 0 = absent from the step).
  kd_weight: float
  kd_temperature: float
  cwd_logit_weight: float
  cwd_feature_weight: float
  cwd_temperature: float
  cwd_divisor: str
  dist_weight: float
  dist_aux_weight: float
  dist_beta: float
  dist_gamma: float
  dist_temperature: float
  dist_groups: int
  ignore_label: int

  def __post_init__(self):
    if self.gan_loss not in ('wgan_gp', 'hinge'):
      raise ValueError(f"loss.gan_loss must be 'wgan_gp' or 'hinge', got {self.gan_loss!r}")
    if self.cwd_divisor not in ('student', 'compared'):
      raise ValueError(f"loss.cwd_divisor must be 'student' or 'compared', got "
                       f"{self.cwd_divisor!r}")

  @property
  def uses_teacher(self) -> bool:
    return any(w > 0 for w in (self.lambda_pi, self.lambda_pa, self.lambda_ho, self.kd_weight,
                               self.cwd_logit_weight, self.cwd_feature_weight, self.dist_weight,
                               self.dist_aux_weight))

  @property
  def uses_disc(self) -> bool:
    return self.lambda_ho > 0


@dataclasses.dataclass(frozen=True)
class StepContext:
  """The static parts of a step: modules, optimisers, loss settings."""
  student: nn.Module
  teacher: nn.Module | None
  disc: nn.Module | None
  student_tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation | None
  student_lr: optax.Schedule    # of the optimiser's count (= state.step): the rate it applies
  disc_lr: optax.Schedule | None
  loss: LossConfig
  disc_sn_backward: str = 'own'  # 'own' | 'last' (the reference's): see `config_base`
  # CWD on features: the student's feature -> the teacher's channels (None: equal counts, or no
  # CWD on features), and the student feature's channel count (the reference's divisor).
  adapter: nn.Module | None = None
  student_feature_channels: int = 0


def poly_schedule(lr: float, num_steps: int, power: float, min_lr: float = 0.0
                  ) -> optax.Schedule:
  """The reference's ``lr_poly`` with a floor:
  ``min_lr + (lr - min_lr) * (1 - t / num_steps) ** power``, and `min_lr` from num_steps on.

  `min_lr` = 0 is the SKD reference's ``lr_poly`` (and CIRKD's ``adjust_lr``); DIST_KD's
  segmentation ``adjust_lr`` floors it at 1e-4 (`configs/cityscapes_cirkd_dist.py`). Written out
  rather than `optax.polynomial_schedule`, whose value under `jit` is NaN at ``t = num_steps``
  (0 to a fractional power, computed through a logarithm).
  """
  def schedule(step: jax.Array) -> jax.Array:
    remaining = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
    return min_lr + (lr - min_lr) * remaining ** power
  return schedule


def poly_sgd(lr: float, momentum: float, weight_decay: float, num_steps: int, power: float,
             min_lr: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """PyTorch SGD (weight decay added to the gradient before momentum) with poly decay.

  The reference counts iterations from 1 and sets ``lr_poly(lr, i, num_steps, power)`` before
  its i-th update, so update ``count`` (optax's, from 0) has rate ``poly_schedule(count + 1)``:
  the first is already below `lr`, the last (``count = num_steps - 1``) is `min_lr` (0 in the
  reference). Decay applies to every parameter, BN included, as in the reference.

  Returns:
    (transform, the rate as a function of the optimiser's count, i.e. of ``TrainState.step``).
  """
  reference_rate = poly_schedule(lr, num_steps, power, min_lr)
  schedule = lambda count: reference_rate(jnp.asarray(count) + 1)
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum))
  return tx, schedule


def disc_optimizer(disc_config: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The reference's SGD (poly decay) or CIRKD's constant Adam."""
  if disc_config.optimizer == 'sgd':
    return poly_sgd(disc_config.lr, disc_config.momentum, disc_config.weight_decay, num_steps,
                    disc_config.power, disc_config.min_lr)
  if disc_config.optimizer == 'adam':
    schedule = optax.constant_schedule(disc_config.lr)
    tx = optax.adam(schedule, b1=disc_config.b1, b2=disc_config.b2)
    if disc_config.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(disc_config.weight_decay), tx)
    return tx, schedule
  raise ValueError(f"disc.optimizer must be 'sgd' or 'adam', got {disc_config.optimizer!r}")


def _critic(ctx: StepContext, disc_params, disc_batch_stats, logits, images, sn_backward=None):
  """Discriminator scores [N] (train mode) and its updated spectral-norm / BN state.

  `sn_backward`: the spectral norms' backward vectors (`disc_lib.spectral_vectors_after`), or
  None for each call's own.
  """
  variables = {'params': disc_params, 'batch_stats': disc_batch_stats}
  if sn_backward is not None:
    variables[disc_lib.SN_BACKWARD] = sn_backward
  scores, updates = ctx.disc.apply(
      variables, logits, images if ctx.disc.image_conditioned else None, train=True,
      mutable=['batch_stats'])
  return scores, updates['batch_stats']


def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_variables: PyTree, *,
               ctx: StepContext) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SKD iteration. batch: {'image': [B, H, W, 3] float32, 'label': [B, H, W] int32}.

  Returns the new state and a dict of float32 scalars: every loss term separately, gradient
  norms, learning rates.
  """
  cfg = ctx.loss
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  dropout_rng, gp_rng = jax.random.split(rng)
  images, labels = batch['image'], batch['label']

  teacher_logits = teacher_aux_logits = teacher_feature = None
  if cfg.uses_teacher:
    t_logits, t_aux_logits, t_features = ctx.teacher.apply(teacher_variables, images, train=False)
    teacher_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
    teacher_feature = jax.lax.stop_gradient(t_features['head'])
    if cfg.dist_aux_weight > 0:
      teacher_aux_logits = jax.lax.stop_gradient(t_aux_logits.astype(jnp.float32))

  def student_loss(trained):
    params, adapter_params = trained
    (logits, aux_logits, features), updates = ctx.student.apply(
        {'params': params, 'batch_stats': state.student_batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    ce = functools.partial(losses.cross_entropy, labels=labels, ignore_label=cfg.ignore_label,
                           ohem=cfg.ohem, ohem_thresh=cfg.ohem_thresh,
                           ohem_min_kept=cfg.ohem_min_kept)
    terms = {'ce': ce(logits)}
    total = terms['ce']
    if aux_logits is not None and cfg.aux_weight > 0:
      terms['aux_ce'] = ce(aux_logits)
      total += cfg.aux_weight * terms['aux_ce']
    if cfg.lambda_pi > 0:
      terms['pixel_wise'] = losses.pixel_wise_loss(
          logits, teacher_logits, temperature=cfg.pi_temperature, reduction=cfg.pi_reduction)
      terms['pixel_kl'] = losses.pixel_wise_kl(logits, teacher_logits,
                                               temperature=cfg.pi_temperature)
      total += cfg.lambda_pi * terms['pixel_wise']
    if cfg.lambda_pa > 0:
      terms['pair_wise'] = losses.pair_wise_loss(
          features['head'], teacher_feature, pool=cfg.pa_pool, pool_scale=cfg.pa_pool_scale,
          pool_kernel=cfg.pa_pool_kernel or None, alpha=cfg.pa_alpha or None,
          detach_norm=cfg.pa_detach_norm)
      total += cfg.lambda_pa * terms['pair_wise']
    for name, term in _method_terms(ctx, logits, aux_logits, features['head'], adapter_params,
                                    teacher_logits, teacher_aux_logits, teacher_feature).items():
      terms[name] = term
      total += getattr(cfg, METHOD_WEIGHTS[name]) * term
    disc_batch_stats = state.disc_batch_stats
    if cfg.uses_disc:
      # D's parameters are not differentiated here: the gradients the student loss would give
      # them are discarded, as in the reference. Its power iteration and BN state do advance.
      scores, disc_batch_stats = _critic(ctx, state.disc_params, disc_batch_stats,
                                         logits.astype(jnp.float32), images)
      adversarial = (losses.generator_loss if cfg.gan_loss == 'wgan_gp'
                     else losses.hinge_generator_loss)
      terms['adversarial'] = adversarial(scores)
      total += cfg.lambda_ho * terms['adversarial']
    terms['total'] = total
    return total, (terms, updates['batch_stats'], logits, disc_batch_stats)

  (_, (terms, student_batch_stats, student_logits, disc_batch_stats)), (grads, adapter_grads) = (
      jax.value_and_grad(student_loss, has_aux=True)((state.student_params,
                                                      state.adapter_params)))
  updates, student_opt_state = ctx.student_tx.update(grads, state.student_opt_state,
                                                     state.student_params)
  student_params = optax.apply_updates(state.student_params, updates)
  metrics = {f'loss/{k}': v for k, v in terms.items()}
  metrics['grad_norm/student'] = optax.tree.norm(grads)
  metrics['lr/student'] = ctx.student_lr(state.step)
  adapter_params, adapter_opt_state = state.adapter_params, state.adapter_opt_state
  if ctx.adapter is not None:
    # The student's optimiser (its transform, its rate), as CIRKD trains the adapter.
    adapter_updates, adapter_opt_state = ctx.student_tx.update(
        adapter_grads, adapter_opt_state, adapter_params)
    adapter_params = optax.apply_updates(adapter_params, adapter_updates)
    metrics['grad_norm/adapter'] = optax.tree.norm(adapter_grads)

  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if cfg.uses_disc:
    fake = jax.lax.stop_gradient(student_logits.astype(jnp.float32))  # pre-update student

    def disc_loss(params):
      # The reference's order: teacher, student, then (WGAN-GP) the interpolation; each call
      # starts from the spectral-norm and BN state the previous one left.
      sn_backward = None
      if ctx.disc_sn_backward == 'last':
        num_calls = 3 if cfg.gan_loss == 'wgan_gp' else 2
        sn_backward = disc_lib.spectral_vectors_after(params, disc_batch_stats, num_calls)
      critic = functools.partial(_critic, ctx, params, images=images, sn_backward=sn_backward)
      real_scores, stats = critic(disc_batch_stats, teacher_logits)
      fake_scores, stats = critic(stats, fake)
      d_terms = {'real_score': jnp.mean(real_scores), 'fake_score': jnp.mean(fake_scores)}
      if cfg.gan_loss == 'wgan_gp':
        d_terms['wasserstein'] = losses.critic_loss(real_scores, fake_scores)
        before_penalty = stats
        d_terms['gradient_penalty'], stats = losses.gradient_penalty(
            lambda x: critic(before_penalty, x), teacher_logits, fake, gp_rng, has_aux=True)
        loss = cfg.lambda_d * (d_terms['wasserstein'] + cfg.lambda_gp * d_terms['gradient_penalty'])
      else:
        d_terms['hinge_real'] = jnp.mean(jax.nn.relu(1.0 - real_scores))
        d_terms['hinge_fake'] = jnp.mean(jax.nn.relu(1.0 + fake_scores))
        d_terms['hinge'] = losses.hinge_critic_loss(real_scores, fake_scores)
        loss = cfg.lambda_d * d_terms['hinge']
      d_terms['loss'] = loss
      return loss, (d_terms, stats)

    (_, (d_terms, disc_batch_stats)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
        disc_params)
    d_updates, disc_opt_state = ctx.disc_tx.update(d_grads, disc_opt_state, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
    metrics.update({f'disc/{k}': v for k, v in d_terms.items()})
    metrics['grad_norm/disc'] = optax.tree.norm(d_grads)
    metrics['lr/disc'] = ctx.disc_lr(state.step)

  new_state = state.replace(
      step=state.step + 1, student_params=student_params,
      student_batch_stats=student_batch_stats, student_opt_state=student_opt_state,
      disc_params=disc_params, disc_batch_stats=disc_batch_stats, disc_opt_state=disc_opt_state,
      adapter_params=adapter_params, adapter_opt_state=adapter_opt_state)
  return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


# The terms of the methods SKD is compared with: their metric names (loss/<name>) and weights.
METHOD_WEIGHTS = {'kd': 'kd_weight', 'cwd_logit': 'cwd_logit_weight',
                  'cwd_feature': 'cwd_feature_weight', 'dist': 'dist_weight',
                  'dist_aux': 'dist_aux_weight'}


def _method_terms(ctx: StepContext, logits, aux_logits, feature, adapter_params,
                  teacher_logits, teacher_aux_logits, teacher_feature) -> dict[str, jax.Array]:
  """The unweighted KD, CWD and DIST terms whose weights are > 0 (float32 scalars).

  logits, aux_logits: [N, h, w, C] of the student; feature: [N, h, w, Cs] its pre-classifier
  feature; teacher_*: the teacher's, [N, h, w, C] and [N, h, w, Ct]. As CIRKD's and DIST_KD's
  trainers: every term at the 1/8 resolution of the maps, no upsampling and no ignore mask.
  """
  cfg = ctx.loss
  terms = {}
  if cfg.kd_weight > 0:
    terms['kd'] = losses.logit_kd(logits, teacher_logits, temperature=cfg.kd_temperature)
  if cfg.cwd_logit_weight > 0:
    terms['cwd_logit'] = losses.channel_wise_loss(logits, teacher_logits,
                                                  temperature=cfg.cwd_temperature)
  if cfg.cwd_feature_weight > 0:
    student_map = feature
    if ctx.adapter is not None:
      student_map = ctx.adapter.apply({'params': adapter_params}, feature)
    # The reference divides by the student's channels, counted before its adapter.
    divisor = ctx.student_feature_channels if cfg.cwd_divisor == 'student' else None
    terms['cwd_feature'] = losses.channel_wise_loss(
        student_map, teacher_feature, temperature=cfg.cwd_temperature, channel_divisor=divisor)
  dist = functools.partial(losses.dist_loss, beta=cfg.dist_beta, gamma=cfg.dist_gamma,
                           temperature=cfg.dist_temperature, groups=cfg.dist_groups)
  if cfg.dist_weight > 0:
    terms['dist'] = dist(logits, teacher_logits)
  if cfg.dist_aux_weight > 0:
    terms['dist_aux'] = dist(aux_logits, teacher_aux_logits)
  return terms


# ---------------------------------------------------------------------------------------------
# Building the pieces from a config.


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
  """The `LossConfig` of ``config.loss``; a key that is not a loss setting is an error naming it."""
  fields = {f.name for f in dataclasses.fields(LossConfig)} - {'ignore_label'}
  unknown = sorted(set(config.loss) - fields)
  missing = sorted(fields - set(config.loss))
  if missing:
    raise ValueError(f'config.loss lacks {", ".join(missing)}: start the config from '
                     '`config_base.base_config()`, which sets every loss setting.')
  if unknown:
    raise ValueError(f'unknown loss setting(s) {", ".join(f"config.loss.{k}" for k in unknown)}: '
                     f'the loss settings are {", ".join(sorted(fields))}.')
  return LossConfig(**config.loss, ignore_label=config.data.ignore_label)


def create_train_state(ctx: StepContext, image_shape: tuple[int, ...], seed: jax.Array,
                       student_variables: PyTree | None = None) -> TrainState:
  """A fresh state. image_shape: [B, H, W, 3] of one training batch (B may be 1).

  Initialisers draw from an 'rbg' key: XLA:CPU compiles threefry for hundreds of parameter
  shapes very slowly (a minute for a ResNet-101). The state's own key (dropout, the gradient
  penalty's mixing weights) stays threefry, whose bits do not depend on how arrays are sharded.
  """
  init_rng, disc_rng = jax.random.split(jax.random.key(seed, impl='rbg'))
  state_rng = jax.random.key(seed)
  images = jnp.zeros((1, *image_shape[1:]), jnp.float32)
  if student_variables is None:
    student_variables = ctx.student.init({'params': init_rng}, images, train=False)
  params, batch_stats = student_variables['params'], student_variables['batch_stats']
  disc_params = disc_batch_stats = disc_opt_state = {}
  if ctx.disc is not None:
    logits = jax.eval_shape(lambda: ctx.student.apply(student_variables, images, train=False))[0]
    disc_variables = disc_lib.init_variables(
        ctx.disc, disc_rng, jnp.zeros(logits.shape, jnp.float32),
        images if ctx.disc.image_conditioned else None)
    disc_params, disc_batch_stats = disc_variables['params'], disc_variables['batch_stats']
    disc_opt_state = ctx.disc_tx.init(disc_params)
  adapter_params = adapter_opt_state = {}
  if ctx.adapter is not None:
    feature = jnp.zeros((1, 1, 1, ctx.student_feature_channels), jnp.float32)
    adapter_params = ctx.adapter.init(jax.random.fold_in(init_rng, 1), feature)['params']
    adapter_opt_state = ctx.student_tx.init(adapter_params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(state_rng),
      student_params=params, student_batch_stats=batch_stats,
      student_opt_state=ctx.student_tx.init(params), disc_params=disc_params,
      disc_batch_stats=disc_batch_stats, disc_opt_state=disc_opt_state,
      adapter_params=adapter_params, adapter_opt_state=adapter_opt_state)


def make_step_context(config: ml_collections.ConfigDict, teacher: nn.Module | None) -> StepContext:
  cfg = loss_config(config)
  num_steps = config.optim.num_steps
  student_tx, student_lr = poly_sgd(config.optim.lr, config.optim.momentum,
                                    config.optim.weight_decay, num_steps, config.optim.power,
                                    config.optim.min_lr)
  disc = disc_tx = disc_lr = None
  if cfg.uses_disc:
    disc = experiment.build_discriminator(config)
    disc_tx, disc_lr = disc_optimizer(config.disc, num_steps)
  if config.disc.sn_backward not in ('own', 'last'):
    raise ValueError(f"disc.sn_backward must be 'own' or 'last', got {config.disc.sn_backward!r}")
  # config.remat trades memory for time in training only, so it is not part of the model's
  # metadata: a resumed run takes the command line's.
  student = experiment.build_model(config, config.student).clone(remat=config.remat)
  adapter, student_channels = None, 0
  if cfg.cwd_feature_weight > 0 or cfg.dist_aux_weight > 0:
    student_out, teacher_out = _output_shapes(student), _output_shapes(teacher)
    if cfg.dist_aux_weight > 0 and (student_out[1] is None or teacher_out[1] is None):
      who = 'the student' if student_out[1] is None else 'the teacher'
      raise ValueError(f'loss.dist_aux_weight > 0 needs aux logits, but {who} has no aux head: '
                       'set --config.loss.dist_aux_weight=0.')
    student_channels = student_out[2]['head'].shape[-1]
    teacher_channels = teacher_out[2]['head'].shape[-1]
    if cfg.cwd_feature_weight > 0 and student_channels != teacher_channels:
      adapter = ChannelAdapter(features=teacher_channels)
  return StepContext(student=student, teacher=teacher if cfg.uses_teacher else None,
                     disc=disc, student_tx=student_tx, disc_tx=disc_tx, student_lr=student_lr,
                     disc_lr=disc_lr, loss=cfg, disc_sn_backward=config.disc.sn_backward,
                     adapter=adapter, student_feature_channels=student_channels)


def _output_shapes(model: nn.Module):
  """(logits, aux_logits or None, features) of `model` as shapes (traced, nothing computed)."""
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda: model.apply(
      model.init(jax.random.key(0, impl='rbg'), images, train=False), images, train=False))


def state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh,
                    shard_student: bool = False) -> TrainState:
  """A `TrainState` of `NamedSharding`s: all replicated, except with `shard_student`.

  With `shard_student`, the student's kernels and their optimiser momenta are split over
  ``'model'`` by `sharding_lib.model_parallel`; the discriminator stays replicated (it is small).
  """
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract_state)
  if shard_student:
    shardings = shardings.replace(
        student_params=sharding_lib.model_parallel(abstract_state.student_params, mesh),
        student_opt_state=sharding_lib.model_parallel(abstract_state.student_opt_state, mesh))
  return shardings


def jit_train_step(ctx: StepContext, mesh: jax.sharding.Mesh, state_sharding: Any = None,
                   teacher_sharding: Any = None):
  """`train_step` jitted over the mesh: the batch sharded over ``'data'``, the state donated.

  The state and the teacher's variables are replicated unless their shardings are given (trees
  of `NamedSharding`, e.g. from `state_shardings` and `sharding_lib.model_parallel`); the state
  keeps its sharding from step to step.
  """
  repl, batch = sharding_lib.replicated(mesh), sharding_lib.batch_sharded(mesh)
  state_sharding = repl if state_sharding is None else state_sharding
  teacher_sharding = repl if teacher_sharding is None else teacher_sharding
  return jax.jit(functools.partial(train_step, ctx=ctx),
                 in_shardings=(state_sharding, batch, teacher_sharding),
                 out_shardings=(state_sharding, repl), donate_argnums=(0,))

# ---------------------------------------------------------------------------------------------
# The loop.


def _write_samples(writer, step: int, samples: dict[str, np.ndarray], predictions: dict[str, Any],
                   config) -> None:
  """Input, ground truth and predictions of a few validation images, in the dataset's palette."""
  palette = experiment.palette(config)
  colour = lambda ids: spec.colorize(ids, palette)   # the ignore label (out of range): black
  images = {'samples/input': samples['raw_image'], 'samples/ground_truth': colour(samples['label'])}
  images.update({f'samples/{name}_prediction': colour(pred) for name, pred in predictions.items()})
  writer.write_images(step, images)


def _predict_labels(model, variables, images: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  return jnp.argmax(inference.predict_logits(model, variables, images, out_hw), axis=-1)


def _predict(model, variables, images: np.ndarray, out_hw, mesh: jax.sharding.Mesh) -> np.ndarray:
  """Predicted train ids [N, *out_hw] of `images` [N, H, W, 3], the same on every process.

  `images` must be identical on every process (`_eval_samples`); the result is replicated so
  that each process can read it whole.
  """
  predict = jax.jit(_predict_labels, static_argnums=(0, 3),
                    out_shardings=sharding_lib.replicated(mesh))
  return np.asarray(predict(model, variables, images, tuple(out_hw)))


def _eval_samples(config, data_dir: str, per_process_batch: int) -> dict[str, np.ndarray]:
  """The first `config.log.num_images` validation images, the same on every process."""
  with experiment.eval_iterator(config, data_dir, per_process_batch) as batches:
    local = next(batches)
  num = config.log.num_images
  gathered = sharding_lib.gather_to_all(
      {k: local[k][:num] for k in ('image', 'raw_image', 'label', 'mask')})
  real = gathered.pop('mask')   # padding places of a process with few images
  return {k: v[real][:num] for k, v in gathered.items()}


# The loss terms of a step and the config weights that multiply them in the minimised losses.
WEIGHTED_TERMS = {
    'loss/ce': (), 'loss/aux_ce': ('aux_weight',), 'loss/pixel_wise': ('lambda_pi',),
    'loss/pair_wise': ('lambda_pa',), 'loss/adversarial': ('lambda_ho',),
    'disc/wasserstein': ('lambda_d',), 'disc/gradient_penalty': ('lambda_d', 'lambda_gp'),
    'disc/hinge': ('lambda_d',),
    **{f'loss/{name}': (weight,) for name, weight in METHOD_WEIGHTS.items()},
}
# A weighted term this many times the cross-entropy is what overflowed, not the learning rate.
DOMINANT_TERM_RATIO = 1e6
NON_FINITE = 'non_finite/'   # metric prefix: non-finite values counted in each part of the state
_STATE_PARTS = {
    'student_params': "the student's parameters",
    'student_batch_stats': "the student's BatchNorm statistics",
    'student_opt_state': "the student's optimiser state",
    'disc_params': "the discriminator's parameters",
    'disc_batch_stats': "the discriminator's spectral-norm and BatchNorm statistics",
    'disc_opt_state': "the discriminator's optimiser state",
    'adapter_params': "the CWD feature adapter's parameters",
    'adapter_opt_state': "the CWD feature adapter's optimiser state",
}


def non_finite_counts(state: TrainState) -> dict[str, jax.Array]:
  """{'non_finite/<field>': float32 [] count of NaN and infinite values} of each part of `state`.

  The loop counts them after every step (one small jitted reduction, dispatched with the step),
  so that a value that overflows in the state alone (BatchNorm running variances at a large
  learning rate, while every loss stays finite) is caught at the step it happens, not at the
  next checkpoint.
  """
  def count(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum((jnp.sum(~jnp.isfinite(x), dtype=jnp.float32) for x in leaves),
               jnp.zeros((), jnp.float32))
  return {f'{NON_FINITE}{field}': count(getattr(state, field)) for field in _STATE_PARTS}


def _weighted_terms(metrics: dict[str, float], loss: ml_collections.ConfigDict
                    ) -> dict[str, tuple[str, float, float]]:
  """{term: (its weights as config names, weight, weight * value)} of the logged loss terms."""
  out = {}
  for term, names in WEIGHTED_TERMS.items():
    if term in metrics:
      weight = float(np.prod([loss[n] for n in names])) if names else 1.0
      with np.errstate(over='ignore', invalid='ignore'):
        weighted = float(np.float32(weight) * np.float32(metrics[term]))
      out[term] = (' * '.join(f'loss.{n}' for n in names), weight, weighted)
  return out


def _dominant_term(metrics: dict[str, float], loss: ml_collections.ConfigDict
                   ) -> tuple[str, float, float] | None:
  """(term, its weighted value, the cross-entropy) when a finite weighted term other than the
  cross-entropy exceeds it `DOMINANT_TERM_RATIO` times (its weight is what is wrong), else None."""
  weighted = {t: w for t, (_, _, w) in _weighted_terms(metrics, loss).items()
              if t != 'loss/ce' and np.isfinite(w)}
  if not weighted:
    return None
  largest = max(weighted, key=lambda t: abs(weighted[t]))
  ce = abs(metrics.get('loss/ce', 1.0))
  if np.isfinite(ce) and abs(weighted[largest]) > DOMINANT_TERM_RATIO * max(ce, 1.0):
    return largest, weighted[largest], ce
  return None


def describe_non_finite(step: int, metrics: dict[str, float], config: ml_collections.ConfigDict,
                        first_metrics: dict[str, float] | None = None) -> str | None:
  """One line naming what became non-finite at `step`, the term that caused it, and the fix.

  `metrics`: one step's host values (with `non_finite_counts`); `first_metrics`: those of the
  run's first step (before a blow-up has distorted every term). None when all is finite.
  The cause, in order: a loss term that is itself non-finite or overflows float32 once
  weighted; else a finite weighted term that dwarfs the cross-entropy (by
  `DOMINANT_TERM_RATIO`), at this step or the first: its weight is too large; else the update
  itself: the learning rate (the discriminator's, when only its state blew up).
  """
  bad_state = [field for field in _STATE_PARTS if metrics.get(NON_FINITE + field, 0) > 0]
  bad = [k for k, v in metrics.items() if not k.startswith(NON_FINITE) and not np.isfinite(v)]
  if not bad_state and not bad:
    return None
  what = f'non-finite values in {", ".join(bad + [_STATE_PARTS[f] for f in bad_state])} at step ' \
         f'{step}'
  weighted = _weighted_terms(metrics, config.loss)
  label = lambda term: f'{weighted[term][0]} * {term}' if weighted[term][0] else term
  student_lr = f'optim.lr ({config.optim.lr:g})'
  overflowed = [t for t, (_, _, w) in weighted.items() if not np.isfinite(w)]
  if overflowed:
    term = overflowed[0]
    names, weight, _ = weighted[term]
    value = metrics[term]
    cause = (f'{term} is {value}' if not np.isfinite(value) else
             f'{label(term)} = {weight:g} * {value:.3g} overflows float32')
    fix = f'lower {names} ({weight:g}) or {student_lr}' if names else f'lower {student_lr}'
    return f'{what}: {cause}; {fix}.'
  for when, values in (('', metrics), (' at the first step', first_metrics or {})):
    dominant = _dominant_term(values, config.loss)
    if dominant:
      term, value, ce = dominant
      names, weight, _ = weighted.get(term) or _weighted_terms(values, config.loss)[term]
      return (f'{what}, while every loss term was finite: {names} * {term} = {value:.3g}'
              f'{when} dwarfs the cross-entropy ({ce:.3g}): lower {names} ({weight:g}).')
  finite = {t: w for t, (_, _, w) in weighted.items() if t != 'loss/ce'}
  largest = max(finite, key=lambda t: abs(finite[t]), default=None)
  terms = (f' (largest weighted term: {label(largest)} = {finite[largest]:.3g})'
           if largest is not None else '')
  if bad_state and all(f.startswith('disc_') for f in bad_state) and not any(
      k.startswith('grad_norm/student') for k in bad):
    return (f'{what}, while every loss term was finite{terms}: the discriminator\'s updates are '
            f'too large: lower disc.lr ({config.disc.lr:g}) or loss.lambda_d '
            f'({config.loss.lambda_d:g}).')
  return f'{what}, while every loss term was finite{terms}: the updates are too large: lower ' \
         f'{student_lr}.'


def first_non_finite(steps: list[tuple[int, dict[str, float]]], config: ml_collections.ConfigDict,
                     first_metrics: dict[str, float] | None = None) -> str | None:
  """`describe_non_finite` of the first of (step, metrics) with a non-finite value, or None."""
  for step, metrics in steps:
    problem = describe_non_finite(step, metrics, config, first_metrics)
    if problem:
      return problem
  return None


def _start_state(config: ml_collections.ConfigDict, ctx: StepContext, mesh: jax.sharding.Mesh,
                 image_shape: tuple[int, ...], manager
                 ) -> tuple[TrainState, Any, dict[str, Any] | None]:
  """The state to train from, its sharding, and the run's metadata (None for a new run).

  The newest readable checkpoint in `manager` if there is one (`ckpt_lib.restore_latest`: checked
  against the config first); else a fresh state, whose student backbone comes from
  ``config.student.pretrained`` when that is set.
  """
  make_state = functools.partial(create_train_state, ctx, image_shape)
  abstract_state = jax.eval_shape(make_state, config.seed)
  state_sharding = state_shardings(abstract_state, mesh, config.mesh_shard_student)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state, state_sharding)
  restored = ckpt_lib.restore_latest(manager, abstract, experiment.model_metadata(config))
  if restored is not None:
    state, meta = restored
    logging.info('Resumed from %s at step %d', manager.directory, int(state.step))
    return state, state_sharding, meta
  pretrained = experiment.pretrained_backbone(config, ctx.student, image_shape)
  state = jax.jit(make_state, out_shardings=state_sharding)(config.seed, pretrained)
  return state, state_sharding, None


def _evaluate_teacher(config: ml_collections.ConfigDict, teacher: nn.Module,
                      teacher_variables: PyTree, mesh: jax.sharding.Mesh,
                      batches: Iterator[dict[str, np.ndarray]]) -> float:
  """The teacher's mIoU on the eval split (once per run: it is frozen); logs its table."""
  confusion = experiment.config_evaluator(teacher, mesh, config)(teacher_variables, batches)
  metrics = evaluator_lib.metrics_from_confusion(
      confusion, experiment.class_names(config),
      ignore_absent_classes=config.eval.ignore_absent_classes)
  logging.info('%s', evaluator_lib.format_table(metrics, 'Teacher:'))
  return metrics['miou']


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the configured run in `workdir`; returns the final eval metrics."""
  workdir = as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding_lib.make_mesh(shape=config.mesh)
  per_process_batch = sharding_lib.check_batch_size(config.optim.batch_size, mesh,
                                                    'optim.batch_size')
  per_process_eval_batch = sharding_lib.check_batch_size(config.eval.batch_size, mesh,
                                                         'eval.batch_size')
  # The teacher first: a missing or unfitting one is a one-line error before hours of data
  # preparation, not after.
  teacher = teacher_variables = None
  if loss_config(config).uses_teacher:
    teacher, teacher_variables = experiment.load_teacher(config)
  from clu import metric_writers  # optional: TensorFlow (its summary writer), in the loop only
  writer = metric_writers.create_default_writer(workdir / 'logs',
                                                just_logging=jax.process_index() > 0)
  data_dir = experiment.prepare_data(config, workdir)
  ctx = make_step_context(config, teacher)
  # The teacher's kernels split over 'model' (replicated when config.mesh.model is 1).
  teacher_sharding = sharding_lib.model_parallel(teacher_variables, mesh) if teacher else {}
  teacher_variables = jax.device_put(teacher_variables, teacher_sharding) if teacher else {}

  manager = ckpt_lib.open_manager(workdir / 'checkpoints')
  best_manager = ckpt_lib.open_manager(workdir / 'best')
  try:
    result = _train(config, workdir, mesh, ctx, manager, best_manager, writer, data_dir,
                    per_process_batch, per_process_eval_batch, teacher, teacher_variables,
                    teacher_sharding)
  finally:
    # Whatever stopped the run (the end, a non-finite value, a preemption, an error), the
    # checkpoints being written are completed and the managers closed before it ends: an
    # asynchronous save dropped at exit is a lost checkpoint (and pages of orbax errors).
    try:
      ckpt_lib.finish_saves(best_manager, keep=1)
    finally:
      ckpt_lib.finish_saves(manager, keep=config.checkpoint.keep)
      writer.flush()
  # Only once the last checkpoint has committed: result.json says the run is complete.
  if jax.process_index() == 0:
    (workdir / 'result.json').write_text(json.dumps(result, indent=2))
  return result


def _train(config, workdir, mesh, ctx, manager, best_manager, writer, data_dir, per_process_batch,
           per_process_eval_batch, teacher, teacher_variables, teacher_sharding
           ) -> dict[str, Any]:
  """The loop of `train_and_evaluate`, from the start (or resumed) state to the last step."""
  num_steps = config.optim.num_steps
  names = experiment.class_names(config)
  eval_batches = functools.partial(experiment.eval_iterator, config, data_dir,
                                   per_process_eval_batch)
  state, state_sharding, meta = _start_state(
      config, ctx, mesh, (per_process_batch, *config.data.crop_size, 3), manager)
  if meta is None:
    meta = {'best_miou': -1.0}
    hparams = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
    writer.write_hparams({k: str(v) if isinstance(v, (list, tuple)) else v
                          for k, v in hparams.items()})
  start_step = int(state.step)

  evaluator = experiment.config_evaluator(ctx.student, mesh, config)
  absent = config.eval.ignore_absent_classes
  samples = _eval_samples(config, data_dir, per_process_eval_batch)
  sample_predictions = {}
  teacher_miou = meta.get('teacher_miou')
  if teacher is not None:
    if teacher_miou is None:
      teacher_miou = _evaluate_teacher(config, teacher, teacher_variables, mesh, eval_batches())
      writer.write_scalars(start_step, {'eval/teacher_miou': teacher_miou})
    sample_predictions['teacher'] = _predict(teacher, teacher_variables, samples['image'],
                                             samples['label'].shape[1:3], mesh)

  step_fn = jit_train_step(ctx, mesh, state_sharding, teacher_sharding)
  count_non_finite = jax.jit(non_finite_counts, out_shardings=sharding_lib.replicated(mesh))
  from clu import periodic_actions  # optional: TensorFlow (clu.metric_writers), in the loop only
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                    every_steps=config.log.every_steps)
  window: list[tuple[int, dict[str, jax.Array]]] = []
  eval_metrics: dict[str, Any] = {}
  saved_step = start_step if start_step else None
  first_metrics: dict[str, float] = {}   # of this run's first step: `describe_non_finite`

  def flush() -> None:
    """Checks the steps since the last flush for non-finite values, then logs their means."""
    if not window:
      return
    steps = [(step, {k: float(v) for k, v in m.items()}) for step, m in jax.device_get(window)]
    window.clear()
    if not first_metrics:
      first_metrics.update(steps[0][1])
    problem = first_non_finite(steps, config, first_metrics)
    if problem:
      kept = (f'the last checkpoint, step {saved_step}, is intact' if saved_step is not None
              else 'no checkpoint had been written')
      raise FloatingPointError(f'{problem} Stopped before writing it to a checkpoint; {kept}.')
    means = {k: float(np.mean([m[k] for _, m in steps])) for k in steps[0][1]
             if not k.startswith(NON_FINITE)}
    writer.write_scalars(steps[-1][0], {f'train/{k}': v for k, v in means.items()})

  def run_meta(step: int) -> dict[str, Any]:
    return dict(meta, step=step, teacher_miou=teacher_miou, **experiment.model_metadata(config))

  def save(step: int) -> None:
    nonlocal saved_step
    ckpt_lib.save_train_state(manager, step, state, run_meta(step), keep=config.checkpoint.keep)
    saved_step = step

  def run_eval(step: int) -> None:
    nonlocal eval_metrics
    variables = {'params': state.student_params, 'batch_stats': state.student_batch_stats}
    confusion = evaluator(variables, eval_batches())
    eval_metrics = evaluator_lib.metrics_from_confusion(confusion, names,
                                                        ignore_absent_classes=absent)
    eval_metrics['confusion'] = np.asarray(confusion).tolist()   # in result.json, for checks
    scalars = {'eval/miou': eval_metrics['miou'],
               'eval/pixel_accuracy': eval_metrics['pixel_accuracy'],
               'eval/mean_accuracy': eval_metrics['mean_accuracy']}
    scalars.update({f'eval_iou/{n}': v for n, v in eval_metrics['per_class_iou'].items()})
    if teacher_miou is not None:
      scalars['eval/teacher_miou'] = teacher_miou
    writer.write_scalars(step, scalars)
    predictions = dict(sample_predictions, student=_predict(
        ctx.student, variables, samples['image'], samples['label'].shape[1:3], mesh))
    _write_samples(writer, step, samples, predictions, config)
    logging.info('step %d: student mIoU %.4f%s', step, eval_metrics['miou'],
                 '' if teacher_miou is None else f' (teacher {teacher_miou:.4f})')
    if eval_metrics['miou'] > meta['best_miou']:
      meta['best_miou'] = eval_metrics['miou']
      # Committed before the periodic checkpoint of this step (whose meta records this best
      # mIoU) is even begun: a kill between the two leaves a best checkpoint that the replay
      # from the previous periodic checkpoint finds in place (and keeps); never a periodic
      # checkpoint that claims a best one missing from disk.
      ckpt_lib.save_train_state(best_manager, step, state, run_meta(step), keep=1)
      ckpt_lib.finish_saves(best_manager, keep=1, close=False)

  if start_step >= num_steps:  # a finished run resumed: report its final evaluation again
    run_eval(start_step)
  preemption = ckpt_lib.PreemptionNotice(manager)
  with preemption, experiment.train_iterator(config, data_dir, start_step, mesh) as batches:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding_lib.global_batch(next(batches), mesh)
        state, metrics = step_fn(state, batch, teacher_variables)
      window.append((step, dict(metrics, **count_non_finite(state))))
      report_progress(step)
      last = step == num_steps
      if step % config.log.every_steps == 0 or last:
        flush()
      if step % config.eval.every_steps == 0 or last:
        flush()
        run_eval(step)
      if step % config.checkpoint.every_steps == 0 or last:
        flush()
        save(step)
      if preemption.reached(step) and not last:
        flush()
        if saved_step != step:
          save(step)
        raise ckpt_lib.Preempted(
            f'{preemption.reason} at step {step}: saved the checkpoint of step {step} in '
            f'{manager.directory}; run the same command again to resume from it.')
  return {'student_miou': eval_metrics.get('miou'), 'teacher_miou': teacher_miou,
          'best_miou': meta['best_miou'], 'eval': eval_metrics, 'step': num_steps}
