r"""Writes tests/data/parity/step_parity.npz (+ step_parity_disc.pth): two whole SKD training steps
of a PyTorch statement of the reference, for tests/test_step_parity.py.

Run once by hand, with PyTorch in a separate environment (never in the project's):

    /work/venv-torch/bin/python tools/make_step_fixture.py [--out=tests/data/parity]

The step below is written from the reference facts (/work/shared/reference/skd-reference.md,
sections 1-6), not from the reference's files; the networks are those of
tools/make_parity_fixtures.py (the reference PSPNet with In-Place ABN) plus the SAGAN
discriminator and its ``SpectralNorm``, with the reference's module names. One iteration i
(counted from 1):

  1. both learning rates set to ``lr_poly(base, i, NUM_STEPS, POWER)``;
  2. teacher forward (eval mode, no gradient); student forward (train mode);
  3. student loss CE + 0.4 aux CE + 10 pixel-wise + 0.5 pair-wise + 0.1 * -mean D(student), D in
     train mode (its BatchNorm statistics and spectral-norm vectors advance); backward; SGD step
     (momentum 0.9, weight decay 5e-4 on every parameter). D's gradients from it are discarded;
  4. D(teacher), D(student, detached), D(interpolation) for the gradient penalty, in that order,
     each a train-mode forward doing one power iteration of every spectral norm; loss
     0.1 * (mean D(S) - mean D(T)) + 0.1 * 10 * GP; backward; SGD step (the reference's lr is
     4e-4; `LR_D` here), same momentum and decay.

SAGAN's ``SpectralNorm`` reassigns ``u.data`` and ``v.data`` in every forward, on the tensors that
the earlier forwards' sigma = u . (W v) saved for backward, so every backward of a step uses the
step's last u, v: variant ``last`` (the reference). Variant ``own`` clones them in each forward,
so each call's gradient uses its own (the intended gradient; skd_jax's default).

Dropout is 0 (the reference's is 0.1: masks cannot be shared across frameworks). The gradient
penalty's mixing weights are `ALPHA`, the values skd_jax's step draws for seed 0 (the test checks
that they still are). Sizes are tiny (networks at 1/32 width, discriminator widths 8..16, five
classes) but the crop is the reference's 512x512, so that the logits are 65x65 and the
discriminator is exactly the reference's (no resizing).

Each step is computed in float64 from the float32 state, and stored rounded to float32: the
reference values, free of float32 rounding. The same step in float32 measures PyTorch's own float32
noise (stored under ``noise/`` and printed), the scale against which skd_jax's float32 step is
judged. Step 2 starts from the stored (rounded) state after step 1, as the test's does.

Also written: the initial discriminator as a reference-layout .pth, with its train-mode scores on
a stored input (tests/test_convert.py converts it).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_parity_fixtures import ReferencePSPNet, ResNet, randomise, scaled  # noqa: E402

NUM_CLASSES = 5
BATCH = 4
CROP = 512
LOW_RES = 64                    # images and labels stored at 64x64, repeated 8x8 to the crop
STUDENT = dict(width=1 / 32, head_channels=128, aux_channels=128)   # pspnet_resnet18's preset
TEACHER = dict(width=1 / 32, head_channels=256, aux_channels=256)
DISC_FEATURES = (8, 8, 16, 16)
LR, MOMENTUM, WEIGHT_DECAY, POWER = 0.01, 0.9, 5e-4, 0.9
# The discriminator's rate is 25x the reference's 4e-4 (REFERENCE_LR_D): its updates then lie
# well above the float32 resolution of its parameters, so that they can be compared.
LR_D, REFERENCE_LR_D = 0.01, 4e-4
NUM_STEPS = 10                  # short, so that a learning rate one iteration off is visible
AUX_WEIGHT, LAMBDA_PI, LAMBDA_PA, LAMBDA_HO, LAMBDA_D, LAMBDA_GP = 0.4, 10.0, 0.5, 0.1, 0.1, 10.0
POOL_SCALE = 0.5
# jax.random.uniform of skd_jax's gradient-penalty key at steps 0 and 1 (state seed 0), exact.
ALPHA = {
    1: ['0x1.ab2c6p-4', '0x1.603e48p-2', '0x1.0c6dp-3', '0x1.9ec97p-1'],
    2: ['0x1.74106p-4', '0x1.72e6a8p-2', '0x1.3e4344p-1', '0x1.44751p-3'],
}
VARIANTS = ('last', 'own')


# ------------------------------------------------------------------------------------------------
# The SAGAN discriminator of the reference.


def l2normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
  return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
  """SAGAN's: ``weight_bar``, ``weight_u``, ``weight_v`` (u, v not trained), one power iteration
  per forward, u and v reassigned through ``.data``. own_vectors: sigma's backward uses clones of
  this forward's u, v instead of the (later reassigned) tensors themselves."""

  def __init__(self, module: nn.Conv2d, gen: torch.Generator):
    super().__init__()
    self.module = module
    self.own_vectors = False
    w = module.weight
    height = w.shape[0]
    u = nn.Parameter(l2normalize(torch.randn(height, generator=gen)), requires_grad=False)
    v = nn.Parameter(l2normalize(torch.randn(w.view(height, -1).shape[1], generator=gen)),
                     requires_grad=False)
    w_bar = nn.Parameter(w.data)
    del module._parameters['weight']
    module.register_parameter('weight_u', u)
    module.register_parameter('weight_v', v)
    module.register_parameter('weight_bar', w_bar)
    self.sigma = None

  def forward(self, x):
    u, v, w = self.module.weight_u, self.module.weight_v, self.module.weight_bar
    height = w.shape[0]
    v.data = l2normalize(torch.mv(torch.t(w.view(height, -1).data), u.data))
    u.data = l2normalize(torch.mv(w.view(height, -1).data, v.data))
    if self.own_vectors:
      u, v = u.clone(), v.clone()
    sigma = u.dot(w.view(height, -1).mv(v))
    self.sigma = sigma.detach().clone()
    self.module.weight = w / sigma.expand_as(w)
    return self.module.forward(x)


class SelfAttention(nn.Module):
  """SAGAN's ``Self_Attn``: q, k 1x1 convs C -> C/8, v C -> C, softmax over keys, gamma out + x."""

  def __init__(self, channels: int):
    super().__init__()
    reduced = max(1, channels // 8)
    self.query_conv = nn.Conv2d(channels, reduced, 1)
    self.key_conv = nn.Conv2d(channels, reduced, 1)
    self.value_conv = nn.Conv2d(channels, channels, 1)
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, x):
    b, c, h, w = x.shape
    query = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)
    key = self.key_conv(x).view(b, -1, h * w)
    attention = F.softmax(torch.bmm(query, key), dim=-1)
    value = self.value_conv(x).view(b, -1, h * w)
    out = torch.bmm(value, attention.permute(0, 2, 1)).view(b, c, h, w)
    return self.gamma * out + x


class ReferenceDiscriminator(nn.Module):
  """BatchNorm over the logits' channels, l1..l4 spectral-norm convs 4x4/2/1 with LeakyReLU 0.1,
  attention after l3 and l4, last conv 4x4 -> 1x1 score (65x65 input)."""

  def __init__(self, channels: int, features, gen: torch.Generator):
    super().__init__()
    self.preprocess_additional = nn.BatchNorm2d(channels)
    widths = (channels,) + tuple(features)
    for i in range(4):
      conv = nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1)
      setattr(self, f'l{i + 1}', nn.Sequential(SpectralNorm(conv, gen), nn.LeakyReLU(0.1)))
    self.attn1 = SelfAttention(features[2])
    self.attn2 = SelfAttention(features[3])
    self.last = nn.Sequential(nn.Conv2d(features[3], 1, 4))

  def spectral_norms(self):
    return {f'l{i}': getattr(self, f'l{i}')[0] for i in range(1, 5)}

  def forward(self, x):
    out = self.l3(self.l2(self.l1(self.preprocess_additional(x))))
    out = self.l4(self.attn1(out))
    return self.last(self.attn2(out)).view(x.shape[0])


# ------------------------------------------------------------------------------------------------
# The losses of the reference.


def upsample(x, size):
  return F.interpolate(x, size=size, mode='bilinear', align_corners=True)


def psp_forward(model: ReferencePSPNet, x):
  """(logits, aux logits, PSP feature): the feature after the bottleneck's dropout."""
  x3, x4 = ResNet.forward(model, x)
  feature = model.pspmodule(x4)
  return model.head(feature), model.dsn(x3), feature


def cross_entropy(logits, labels):
  return F.cross_entropy(upsample(logits, labels.shape[1:]), labels, ignore_index=255)


def pixel_wise(student, teacher):
  """sum over n, h, w, c of -softmax(z_T) * log_softmax(z_S), divided by h * w."""
  n, c, h, w = student.shape
  return torch.sum(-F.softmax(teacher, 1) * F.log_softmax(student, 1)) / (h * w)


def pixel_kl(student, teacher):
  """skd_jax's logged per-pixel mean of KL(p_T || p_S)."""
  n, c, h, w = student.shape
  log_pt = F.log_softmax(teacher, 1)
  return torch.sum(log_pt.exp() * (log_pt - F.log_softmax(student, 1))) / (n * h * w)


def similarity(feature):
  norm = (feature ** 2).sum(1, keepdim=True).sqrt().detach() + 1e-8
  feature = (feature / norm).reshape(feature.shape[0], feature.shape[1], -1)
  return torch.einsum('icm,icn->imn', feature, feature)


def pair_wise(student, teacher):
  """Max-pooled nodes (kernel = stride = int(0.5 * H), ceil mode), squared similarity error."""
  kernel = (int(POOL_SCALE * teacher.shape[2]), int(POOL_SCALE * teacher.shape[3]))
  pool = lambda f: F.max_pool2d(f, kernel, kernel, 0, ceil_mode=True)
  s, t = pool(student), pool(teacher)
  nodes = t.shape[-1] * t.shape[-2]
  return ((similarity(t) - similarity(s)) ** 2).sum() / nodes ** 2 / t.shape[0]


def gradient_penalty(disc, real, fake, alpha):
  interpolated = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
  out = disc(interpolated)
  grad = torch.autograd.grad(out, interpolated, torch.ones_like(out), create_graph=True,
                             retain_graph=True, only_inputs=True)[0]
  norm = torch.sqrt(torch.sum(grad.view(grad.shape[0], -1) ** 2, dim=1))
  return torch.mean((norm - 1) ** 2)


def lr_poly(base, i, max_iter, power):
  return base * ((1 - float(i) / max_iter) ** power)


def grad_norm(params) -> float:
  return float(torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in params)))


# ------------------------------------------------------------------------------------------------
# One reference step.


def build_models(init: dict, dtype):
  gen = torch.Generator().manual_seed(0)  # the values are overwritten by load_state_dict
  student = ReferencePSPNet(18, STUDENT['width'], NUM_CLASSES,
                            scaled(STUDENT['head_channels'], STUDENT['width']),
                            scaled(STUDENT['aux_channels'], STUDENT['width']))
  teacher = ReferencePSPNet(18, TEACHER['width'], NUM_CLASSES,
                            scaled(TEACHER['head_channels'], TEACHER['width']),
                            scaled(TEACHER['aux_channels'], TEACHER['width']))
  disc = ReferenceDiscriminator(NUM_CLASSES, DISC_FEATURES, gen)
  models = {'student': student, 'teacher': teacher, 'disc': disc}
  for name, model in models.items():
    for m in model.modules():
      if isinstance(m, nn.Dropout2d):
        m.p = 0.0
    if init[name]:
      missing, unexpected = model.load_state_dict(
          {k: torch.as_tensor(v) for k, v in init[name].items()}, strict=False)
      assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing), (
          name, missing, unexpected)
    model.to(dtype)
  return models


def sgd(model, momenta, lr):
  params = dict((k, p) for k, p in model.named_parameters() if p.requires_grad)
  opt = torch.optim.SGD(list(params.values()), lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  for k, p in params.items():
    if momenta is not None:
      opt.state[p]['momentum_buffer'] = momenta[k].clone().to(p.dtype)
  return opt, params


def reference_step(state: dict, batch: dict, i: int, variant: str, dtype) -> dict:
  """One iteration i (from 1) from `state`; returns the new state and the metrics."""
  models = build_models(state, dtype)
  student, teacher, disc = models['student'], models['teacher'], models['disc']
  for sn in disc.spectral_norms().values():
    sn.own_vectors = variant == 'own'
  images = batch['image'].to(dtype)
  labels = batch['label']
  alpha = batch['alpha'].to(dtype).view(-1, 1, 1, 1)
  lr, lr_d = lr_poly(LR, i, NUM_STEPS, POWER), lr_poly(LR_D, i, NUM_STEPS, POWER)
  g_opt, g_params = sgd(student, state.get('student_momentum'), lr)
  d_opt, d_params = sgd(disc, state.get('disc_momentum'), lr_d)

  with torch.no_grad():
    teacher.eval()
    t_logits, _, t_feature = psp_forward(teacher, images)
  student.train()
  disc.train()
  s_logits, s_aux, s_feature = psp_forward(student, images)
  g_opt.zero_grad()
  m = {'loss/ce': cross_entropy(s_logits, labels), 'loss/aux_ce': cross_entropy(s_aux, labels),
       'loss/pixel_wise': pixel_wise(s_logits, t_logits),
       'loss/pixel_kl': pixel_kl(s_logits, t_logits),
       'loss/pair_wise': pair_wise(s_feature, t_feature),
       'loss/adversarial': -disc(s_logits).mean()}
  m['loss/total'] = (m['loss/ce'] + AUX_WEIGHT * m['loss/aux_ce'] + LAMBDA_PI * m['loss/pixel_wise']
                     + LAMBDA_PA * m['loss/pair_wise'] + LAMBDA_HO * m['loss/adversarial'])
  m['loss/total'].backward()
  m['grad_norm/student'] = grad_norm(g_params.values())
  g_opt.step()

  d_opt.zero_grad()   # D's gradients from the student loss are discarded
  real, fake = disc(t_logits), disc(s_logits.detach())
  m['disc/real_score'], m['disc/fake_score'] = real.mean(), fake.mean()
  m['disc/wasserstein'] = fake.mean() - real.mean()
  m['disc/gradient_penalty'] = gradient_penalty(disc, t_logits, s_logits, alpha)
  m['disc/loss'] = LAMBDA_D * (m['disc/wasserstein'] + LAMBDA_GP * m['disc/gradient_penalty'])
  m['disc/loss'].backward()
  m['grad_norm/disc'] = grad_norm(d_params.values())
  d_opt.step()
  m['lr/student'], m['lr/disc'] = lr, lr_d

  new = {'student': student.state_dict(), 'teacher': state['teacher'],
         'disc': disc.state_dict(),
         'student_momentum': {k: g_opt.state[p]['momentum_buffer'] for k, p in g_params.items()},
         'disc_momentum': {k: d_opt.state[p]['momentum_buffer'] for k, p in d_params.items()},
         'disc_sigma': {k: sn.sigma for k, sn in disc.spectral_norms().items()}}
  new = {k: {n: to_numpy(t) for n, t in v.items() if not n.endswith('num_batches_tracked')}
         for k, v in new.items()}
  new['metrics'] = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in m.items()}
  return new


def to_numpy(t) -> np.ndarray:
  return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def rounded(state: dict) -> dict:
  """The float32 state the next step (and the test) starts from, as float64 tensors."""
  return {k: ({n: torch.as_tensor(np.asarray(a, np.float32)).double() for n, a in v.items()}
              if k != 'metrics' else v) for k, v in state.items()}


# The quantities compared, as (part of the state, a test of the tensor name); the test groups
# skd_jax's state the same way.
GROUPS = {
    'student params': ('student', lambda n: 'running' not in n),
    'student BN means': ('student', lambda n: n.endswith('running_mean')),
    'student BN variances': ('student', lambda n: n.endswith('running_var')),
    'student momenta': ('student_momentum', lambda n: True),
    'disc params': ('disc', lambda n: 'running' not in n and not n.endswith(('_u', '_v'))),
    'disc u': ('disc', lambda n: n.endswith('weight_u')),
    'disc BN means': ('disc', lambda n: n.endswith('running_mean')),
    'disc BN variances': ('disc', lambda n: n.endswith('running_var')),
    'disc momenta': ('disc_momentum', lambda n: True),
    'disc sigma': ('disc_sigma', lambda n: True),
}


def group_error(got: dict, want: dict, start: dict | None) -> float:
  """max |change_got - change_want| / max |change_want| over a group of tensors.

  Changes are from the step's start state (`start`; None: from 0). Normalised by the group's
  largest change, not each element's or tensor's: single gradients that are sums of cancelling
  terms (biases before a train-mode BatchNorm) have a large relative float32 error of their own
  while being small next to the group, and a float32 parameter cannot hold an update below its
  last bit.
  """
  base = lambda n: np.asarray(start[n], np.float64) if start is not None else 0.0
  scale = max(np.abs(np.asarray(w, np.float64) - base(n)).max() for n, w in want.items())
  return max(np.abs(np.asarray(got[n], np.float64) - np.asarray(w, np.float64)).max()
             for n, w in want.items()) / scale


def float32_noise(got32: dict, want: dict, state: dict) -> dict:
  """PyTorch's own float32 error of one step, per group (and the worst metric's, relative)."""
  noise = {'metrics': max(abs(got32['metrics'][k] - v) / abs(v)
                          for k, v in want['metrics'].items() if v)}
  for name, (part, select) in GROUPS.items():
    if part not in want:
      continue
    names = [n for n in want[part] if select(n)]
    start = None if part == 'disc_sigma' or part not in state else state[part]
    noise[name] = group_error({n: got32[part][n] for n in names},
                              {n: want[part][n] for n in names}, start)
  return noise


def pack(tensors: dict) -> tuple[np.ndarray, list]:
  """One flat float32 array and its layout [[name, shape], ...] (one npz entry, not hundreds)."""
  layout = [[n, list(np.shape(a))] for n, a in tensors.items()]
  flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in tensors.values()])
  return flat, layout


# ------------------------------------------------------------------------------------------------
# The fixture.


def initial_state(gen: torch.Generator) -> dict:
  torch.manual_seed(0)
  models = build_models({'student': {}, 'teacher': {}, 'disc': {}}, torch.float32)
  for name in ('student', 'teacher'):
    randomise(models[name], (2, 3, CROP, CROP), gen)
  with torch.no_grad():
    # In-Place ABN weights positive in the student, as an ImageNet-initialised one's are: the
    # momentum of |w| + eps then equals that of skd_jax's BN scale (see the test).
    for m in models['student'].modules():
      if hasattr(m, 'running_var') and hasattr(m, 'weight'):
        m.weight.abs_()
    disc = models['disc']
    disc.preprocess_additional.weight.copy_(0.5 + torch.rand(NUM_CLASSES, generator=gen))
    disc.preprocess_additional.bias.copy_(0.2 * torch.randn(NUM_CLASSES, generator=gen))
    disc.attn1.gamma.fill_(0.3)     # the reference starts at 0; attention then plays no part
    disc.attn2.gamma.fill_(-0.2)
  state = {k: {n: to_numpy(t).copy() for n, t in m.state_dict().items()
               if not n.endswith('num_batches_tracked')} for k, m in models.items()}
  return {k: {n: torch.as_tensor(a).double() for n, a in v.items()} for k, v in state.items()}


def make_batch(gen: torch.Generator, step: int) -> tuple[dict, dict]:
  """(the batch at full size, what is stored: 64x64 float16 images and uint8 labels)."""
  image = torch.randn(BATCH, 3, LOW_RES, LOW_RES, generator=gen).half()
  label = torch.randint(0, NUM_CLASSES, (BATCH, LOW_RES, LOW_RES), generator=gen)
  label[:, :4] = 255
  label[0, 20:30, 10:50] = 255
  up = CROP // LOW_RES
  full = {'image': image.float().repeat_interleave(up, 2).repeat_interleave(up, 3),
          'label': label.repeat_interleave(up, 1).repeat_interleave(up, 2),
          'alpha': torch.tensor([float.fromhex(a) for a in ALPHA[step]], dtype=torch.float32)}
  stored = {'image': image.permute(0, 2, 3, 1).numpy(), 'label': label.numpy().astype(np.uint8),
            'alpha': full['alpha'].numpy()}
  return full, stored


def disc_scores_fixture(state: dict, gen: torch.Generator, path: pathlib.Path) -> dict:
  """Writes the initial discriminator as a reference-layout checkpoint to `path`; returns its
  train-mode scores on a stored input (13x13 float16, repeated 5x5 to 65x65), and its u vectors
  and BN running statistics after that forward."""
  disc = build_models(state, torch.float32)['disc'].train()
  torch.save(collections.OrderedDict(disc.state_dict()), path)
  small = (2.0 * torch.randn(2, NUM_CLASSES, 13, 13, generator=gen) + 0.5).half()
  with torch.no_grad():
    scores = disc(small.float().repeat_interleave(5, 2).repeat_interleave(5, 3))
  after = {n: to_numpy(t) for n, t in disc.state_dict().items()
           if n.endswith(('weight_u', 'running_mean', 'running_var'))}
  return {'disc_input_13x13': small.permute(0, 2, 3, 1).numpy(), 'disc_scores': scores.numpy(),
          **{f'disc_after/{n}': a for n, a in after.items()}}


def quirk_at_reference_width(gen: torch.Generator) -> dict:
  """The in-place u, v quirk's size on D's first two steps at the reference's size.

  The reference discriminator (19 classes, widths 64..512), batch 8 of random 65x65 teacher and
  student logits; D's momenta after each step with the step's last u, v against each call's own
  (L2 relative), in float64.
  """
  torch.manual_seed(1)
  disc = ReferenceDiscriminator(19, (64, 128, 256, 512), gen).double()
  initial = {n: t.clone() for n, t in disc.state_dict().items()}
  batches = [(torch.randn(8, 19, 65, 65, generator=gen, dtype=torch.float64) * 2,
              torch.randn(8, 19, 65, 65, generator=gen, dtype=torch.float64),
              torch.rand(8, 1, 1, 1, generator=gen, dtype=torch.float64)) for _ in range(2)]
  momenta = {}
  for variant in VARIANTS:
    disc.load_state_dict(initial)
    for sn in disc.spectral_norms().values():
      sn.own_vectors = variant == 'own'
    params = [p for p in disc.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, REFERENCE_LR_D, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for step, (real, fake, alpha) in enumerate(batches, 1):
      opt.zero_grad()
      loss = LAMBDA_D * (disc(fake).mean() - disc(real).mean()
                         + LAMBDA_GP * gradient_penalty(disc, real, fake, alpha))
      loss.backward()
      opt.step()
      momenta[variant, step] = torch.cat([opt.state[p]['momentum_buffer'].ravel() for p in params])
  return {f'step{step}': float((momenta['last', step] - momenta['own', step]).norm()
                               / momenta['own', step].norm()) for step in (1, 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent.parent / 'tests' /
                                          'data' / 'parity'))
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  torch.set_num_threads(2)
  gen = torch.Generator().manual_seed(10)
  init = initial_state(gen)
  arrays, layouts = {}, {}

  def store(key: str, kind: str, tensors: dict) -> None:
    arrays[key], layout = pack(tensors)
    assert layouts.setdefault(kind, layout) == layout, kind

  for part, tensors in init.items():
    store(f'init/{part}', part, tensors)
  batches = {}
  for step in (1, 2):
    batches[step], stored = make_batch(gen, step)
    arrays.update({f'batch{step}/{k}': v for k, v in stored.items()})

  noise, first_steps = {}, {}
  for variant in VARIANTS:
    state = init
    for step in (1, 2):
      want = reference_step(state, batches[step], step, variant, torch.float64)
      got32 = reference_step(state, batches[step], step, variant, torch.float32)
      prefix = f'{variant}/step{step}'
      noise[prefix] = float32_noise(got32, want, state)
      # The spectral norm's backward changes D's gradients only: in step 1 the student is the
      # 'last' variant's, so only the discriminator's quantities are stored for 'own'.
      parts = (want if variant == 'last' else
               {k: want[k] for k in ('disc', 'disc_momentum', 'disc_sigma', 'metrics')})
      for part, values in parts.items():
        if part != 'teacher':
          store(f'{prefix}/{part}', part, values)
      print(f'{prefix}:', {k: round(v, 6) for k, v in want['metrics'].items()})
      if step == 1:
        first_steps[variant] = want
      state = rounded(want)
  for part in ('student', 'student_momentum'):  # so the 'own' test's step 2 starts from 'last''s
    for n, a in first_steps['last'][part].items():
      assert np.array_equal(a, first_steps['own'][part][n]), (part, n)

  arrays.update(disc_scores_fixture(init, gen, out / 'step_parity_disc.pth'))
  quirk = quirk_at_reference_width(gen)
  config = dict(num_classes=NUM_CLASSES, batch=BATCH, crop=CROP, low_res=LOW_RES, student=STUDENT,
                teacher=TEACHER, disc_features=DISC_FEATURES, lr=LR, lr_d=LR_D, momentum=MOMENTUM,
                weight_decay=WEIGHT_DECAY, power=POWER, num_steps=NUM_STEPS,
                aux_weight=AUX_WEIGHT, lambda_pi=LAMBDA_PI, lambda_pa=LAMBDA_PA,
                lambda_ho=LAMBDA_HO, lambda_d=LAMBDA_D, lambda_gp=LAMBDA_GP, seed=0,
                torch_version=torch.__version__, layouts=layouts, float32_noise=noise,
                quirk_disc_momentum_l2_relative={
                    'fixture': {step: float(np.linalg.norm(
                        arrays[f'last/{step}/disc_momentum'] - arrays[f'own/{step}/disc_momentum'])
                        / np.linalg.norm(arrays[f'own/{step}/disc_momentum']))
                        for step in ('step1', 'step2')},
                    'reference_width': quirk})
  arrays['config'] = np.array(json.dumps(config))
  np.savez_compressed(out / 'step_parity.npz', **arrays)
  print(json.dumps({k: config[k] for k in ('float32_noise', 'quirk_disc_momentum_l2_relative')},
                   indent=1))
  for name in ('step_parity.npz', 'step_parity_disc.pth'):
    print(f'{out / name}: {(out / name).stat().st_size / 1e6:.2f} MB')


if __name__ == '__main__':
  main()
