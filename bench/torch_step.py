r"""The SKD training step in PyTorch, for side-by-side timing with skd_jax (`bench/compare.py`).

    python bench/torch_step.py [--crop=512,512] [--batch=1] [--variant=skd|student] \
        [--mode=eager|compile] [--dtype=float32|bfloat16] [--device=cpu|cuda] [--steps=5]

Run it from its own environment (``pip install -r bench/requirements-torch.txt``): torch is never
a dependency of skd_jax. It is this project's own statement of one iteration of the reference
recipe (skd-reference.md), written from the description, not from the reference's files:

  1. teacher PSPNet (deep-stem dilated ResNet-101, PSP head 512, aux head), eval mode, no grad;
  2. student PSPNet-R18 (PSP head 128, aux head 128), train mode: CE + 0.4 aux CE (logits
     upsampled align_corners=True, ignore 255) + 10 pixel-wise (soft CE summed over the batch /
     (h w)) + 0.5 pair-wise (max-pooled nodes, kernel int(0.5 H), ceil mode, detached norm,
     global graph) + 0.1 adversarial (-mean D(z_S), D's parameters not trained by it); SGD 0.01,
     momentum 0.9, weight decay 5e-4, poly decay;
  3. one WGAN-GP update of the SAGAN discriminator (BatchNorm on the logits, four spectral-norm
     4x4/2 convs with LeakyReLU 0.1, self-attention after the third and fourth, a 4x4 conv, the
     mean of the final map) on the detached student logits against the teacher's: 0.1 (mean
     D(fake) - mean D(real) + 10 GP); SGD 4e-4, momentum 0.9, weight decay 5e-4.

`--variant=student` is the student-alone step (CE + 0.4 aux CE, no teacher, no discriminator).
`--mode=compile` wraps the teacher and the student in `torch.compile` (the discriminator stays
eager: its gradient penalty needs double backward, which compiled graphs do not support).
`--dtype=bfloat16` runs the networks under `torch.autocast` (AMP; losses in float32).

With ``--serve`` it builds everything once, then reads commands from stdin: ``run N`` runs N
steps and prints one JSON line ``{"times": [seconds, ...], "cpu_times": [process CPU seconds,
...], "losses": {...}}``; ``quit`` exits.
That is how `bench/compare.py` alternates it with the JAX step. Without it, it runs
`--warmup` + `--steps` steps and prints images/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

IGNORE_LABEL = 255
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def scaled(channels: int, multiplier: float) -> int:
  return max(1, int(round(channels * multiplier)))


class BatchNorm2d(nn.BatchNorm2d):
  """nn.BatchNorm2d without F.batch_norm's refusal of one value per channel in training (the
  bin-1 PSP branch at batch 1): the normalised value is then 0, as in skd_jax."""

  def forward(self, x):
    if self.training and x.numel() == x.shape[1]:
      # One value per channel (torch.compile's checks refuse it too): the BatchNorm formula
      # written out; the output is the bias, with zero gradients to x and the weight. The
      # unbiased running variance would divide by 0: it is kept.
      mean = x.mean(dim=(0, 2, 3), keepdim=True)
      var = ((x - mean)**2).mean(dim=(0, 2, 3), keepdim=True)
      with torch.no_grad():
        self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.flatten())
      return ((x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1)
              + self.bias.view(1, -1, 1, 1))
    return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                            self.training, self.momentum, self.eps, torch.backends.cudnn.enabled)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
  padding = dilation * (kernel // 2)
  return nn.Sequential(
      nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, bias=False),
      BatchNorm2d(cout))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, dilation: int, projection: bool):
    super().__init__()
    self.a = conv_bn(cin, planes, 3, stride, dilation)
    self.b = conv_bn(planes, planes, 3, 1, dilation)
    self.shortcut = conv_bn(cin, planes, 1, stride) if projection else None

  def forward(self, x):
    y = self.b(F.relu(self.a(x)))
    return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, dilation: int, projection: bool):
    super().__init__()
    self.a = conv_bn(cin, planes, 1)
    self.b = conv_bn(planes, planes, 3, stride, dilation)
    self.c = conv_bn(planes, planes * 4, 1)
    self.shortcut = conv_bn(cin, planes * 4, 1, stride) if projection else None

  def forward(self, x):
    y = self.c(F.relu(self.b(F.relu(self.a(x)))))
    return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet(nn.Module):
  """Deep stem (three 3x3 convs, 128 channels), ceil-mode max pool, output stride 8 (layer3
  dilated by 2, layer4 by 4, every block of a stage at the stage's dilation)."""

  def __init__(self, depth: int, width: float):
    super().__init__()
    block = BasicBlock if depth < 50 else Bottleneck
    s64, s128 = scaled(64, width), scaled(128, width)
    self.stem = nn.Sequential(
        conv_bn(3, s64, 3, 2), nn.ReLU(), conv_bn(s64, s64, 3), nn.ReLU(),
        conv_bn(s64, s128, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    cin, stages = s128, []
    for i, (blocks, stride, dilation) in enumerate(zip(STAGE_SIZES[depth], (1, 2, 1, 1),
                                                       (1, 1, 2, 4))):
      planes = scaled(64 * 2**i, width)
      layers = []
      for b in range(blocks):
        s = stride if b == 0 else 1
        layers.append(block(cin, planes, s, dilation,
                            projection=b == 0 and (s != 1 or cin != planes * block.expansion)))
        cin = planes * block.expansion
      stages.append(nn.Sequential(*layers))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.channels = (scaled(256, width) * block.expansion, cin)   # of layer3, layer4

  def forward(self, x):
    x = self.layer2(self.layer1(self.stem(x)))
    c3 = self.layer3(x)
    return c3, self.layer4(c3)


def bn_leaky(cin: int, cout: int, kernel: int, bias: bool = False) -> nn.Sequential:
  """conv -> BN -> leaky ReLU 0.01 (the reference's In-Place ABN layer)."""
  return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias),
                       BatchNorm2d(cout), nn.LeakyReLU(0.01))


class PSPNet(nn.Module):
  """ResNet + PSP head (bins 1, 2, 3, 6) + aux head; returns (logits, aux_logits, feature)."""

  def __init__(self, depth: int, width: float, num_classes: int):
    super().__init__()
    self.backbone = ResNet(depth, width)
    c3, c4 = self.backbone.channels
    head = scaled(512 if depth >= 50 else 128, width)
    self.bins = (1, 2, 3, 6)
    self.stages = nn.ModuleList(bn_leaky(c4, head, 1) for _ in self.bins)
    self.bottleneck = nn.Sequential(bn_leaky(c4 + len(self.bins) * head, head, 3),
                                    nn.Dropout2d(0.1))
    self.classifier = nn.Conv2d(head, num_classes, 1)
    self.aux = nn.Sequential(bn_leaky(c3, head, 3, bias=True), nn.Dropout2d(0.1),
                             nn.Conv2d(head, num_classes, 1))

  def forward(self, images):
    c3, c4 = self.backbone(images)
    size = c4.shape[2:]
    branches = [F.interpolate(stage(F.adaptive_avg_pool2d(c4, b)), size, mode='bilinear',
                              align_corners=True) for b, stage in zip(self.bins, self.stages)]
    feature = self.bottleneck(torch.cat(branches + [c4], 1))
    return self.classifier(feature), self.aux(c3), feature


class SelfAttention(nn.Module):
  def __init__(self, c: int):
    super().__init__()
    self.query = nn.Conv2d(c, max(1, c // 8), 1)
    self.key = nn.Conv2d(c, max(1, c // 8), 1)
    self.value = nn.Conv2d(c, c, 1)
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, x):
    n, c, h, w = x.shape
    q = self.query(x).flatten(2).transpose(1, 2)              # [n, hw, c/8]
    k = self.key(x).flatten(2)                                # [n, c/8, hw]
    attention = torch.softmax(torch.bmm(q, k), dim=-1)        # over the keys
    out = torch.bmm(self.value(x).flatten(2), attention.transpose(1, 2)).view(n, c, h, w)
    return self.gamma * out + x


class Discriminator(nn.Module):
  def __init__(self, num_classes: int, features=(64, 128, 256, 512), min_input_size: int = 0):
    super().__init__()
    sn = nn.utils.parametrizations.spectral_norm
    f1, f2, f3, f4 = features
    self.min_input_size = min_input_size
    self.norm = nn.BatchNorm2d(num_classes)
    self.l1, self.l2, self.l3, self.l4 = (sn(nn.Conv2d(a, b, 4, 2, 1)) for a, b in
                                          ((num_classes, f1), (f1, f2), (f2, f3), (f3, f4)))
    self.attn1, self.attn2 = SelfAttention(f3), SelfAttention(f4)
    self.last = nn.Conv2d(f4, 1, 4)

  def forward(self, logits):
    h, w = logits.shape[2:]
    if self.min_input_size and min(h, w) < self.min_input_size:
      logits = F.interpolate(logits, (max(h, self.min_input_size), max(w, self.min_input_size)),
                             mode='bilinear', align_corners=True)
    act = lambda x: F.leaky_relu(x, 0.1)
    x = act(self.l1(self.norm(logits)))
    x = self.attn1(act(self.l3(act(self.l2(x)))))
    x = self.attn2(act(self.l4(x)))
    return self.last(x).mean(dim=(1, 2, 3))


def cross_entropy(logits, labels):
  up = F.interpolate(logits.float(), labels.shape[1:], mode='bilinear', align_corners=True)
  return F.cross_entropy(up, labels, ignore_index=IGNORE_LABEL)


def pixel_wise(student_logits, teacher_logits, reduction: str):
  n, _, h, w = student_logits.shape
  total = -(F.softmax(teacher_logits.float(), 1) * F.log_softmax(student_logits.float(), 1)).sum()
  return total / (h * w if reduction == 'batch_sum' else n * h * w)


def pair_wise(student_feature, teacher_feature):
  h, w = student_feature.shape[2:]
  kernel = (int(0.5 * h), int(0.5 * w))

  def similarity(f):
    nodes = F.max_pool2d(f.float(), kernel, kernel, 0, ceil_mode=True).flatten(2)  # [n, c, m]
    nodes = nodes / (nodes.norm(dim=1, keepdim=True).detach() + 1e-8)
    return torch.bmm(nodes.transpose(1, 2), nodes)

  s, t = similarity(student_feature), similarity(teacher_feature)
  return ((t - s)**2).sum() / s.shape[1]**2 / s.shape[0]


def gradient_penalty(disc, real, fake):
  alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
  x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
  grads, = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
  return ((grads.flatten(1).norm(dim=1) - 1)**2).mean()


class SKDStep:
  """Models, optimisers and one training iteration, in the reference's order."""

  def __init__(self, args):
    self.args = args
    self.device = torch.device(args.device)
    self.distil = args.variant == 'skd'
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    self.student = PSPNet(args.student_depth, args.student_width, args.num_classes).to(
        self.device, memory_format=fmt).train()
    self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9,
                               weight_decay=5e-4)
    self.teacher = self.disc = None
    if self.distil:
      self.teacher = PSPNet(args.teacher_depth, args.teacher_width, args.num_classes).to(
          self.device, memory_format=fmt).eval()
      for p in self.teacher.parameters():
        p.requires_grad_(False)
      self.disc = Discriminator(args.num_classes, args.disc_features,
                                args.disc_min_input_size).to(self.device).train()
      self.disc_opt = torch.optim.SGD(self.disc.parameters(), lr=4e-4, momentum=0.9,
                                      weight_decay=5e-4)
    self.student_fn, self.teacher_fn = self.student, self.teacher
    if args.mode == 'compile':
      self.student_fn = torch.compile(self.student)
      if self.teacher is not None:
        self.teacher_fn = torch.compile(self.teacher)
    h, w = args.crop
    g = torch.Generator().manual_seed(1)
    self.batches = [
        (torch.randn(args.batch, 3, h, w, generator=g).mul_(60.0).to(self.device,
                                                                    memory_format=fmt),
         torch.randint(0, args.num_classes, (args.batch, h, w), generator=g).to(self.device))
        for _ in range(2)]
    self.step_count = 0

  def autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16,
                          enabled=self.args.dtype == 'bfloat16')

  def poly(self, group_lr: float) -> float:
    return group_lr * (1 - self.step_count / self.args.num_steps) ** 0.9

  def step(self) -> dict[str, torch.Tensor]:
    images, labels = self.batches[self.step_count % 2]
    for group in self.opt.param_groups:
      group['lr'] = self.poly(0.01)
    terms = {}
    with self.autocast():
      if self.distil:
        with torch.no_grad():
          teacher_logits, _, teacher_feature = self.teacher_fn(images)
        teacher_logits = teacher_logits.float()
      logits, aux_logits, feature = self.student_fn(images)
      terms['ce'] = cross_entropy(logits, labels)
      terms['aux_ce'] = cross_entropy(aux_logits, labels)
      total = terms['ce'] + 0.4 * terms['aux_ce']
      if self.distil:
        terms['pixel_wise'] = pixel_wise(logits, teacher_logits, self.args.pi_reduction)
        terms['pair_wise'] = pair_wise(feature, teacher_feature)
        self.disc.requires_grad_(False)   # its gradients from the student loss are discarded
        terms['adversarial'] = -self.disc(logits.float()).mean()
        self.disc.requires_grad_(True)
        total = (total + 10.0 * terms['pixel_wise'] + 0.5 * terms['pair_wise']
                 + 0.1 * terms['adversarial'])
    self.opt.zero_grad(set_to_none=True)
    total.backward()
    self.opt.step()
    terms['total'] = total
    if self.distil:
      for group in self.disc_opt.param_groups:
        group['lr'] = self.poly(4e-4)
      fake = logits.detach().float()
      wasserstein = self.disc(fake).mean() - self.disc(teacher_logits).mean()
      penalty = gradient_penalty(self.disc, teacher_logits, fake)
      disc_loss = 0.1 * (wasserstein + 10.0 * penalty)
      self.disc_opt.zero_grad(set_to_none=True)
      disc_loss.backward()
      self.disc_opt.step()
      terms.update(wasserstein=wasserstein, gradient_penalty=penalty, disc_loss=disc_loss)
    self.step_count += 1
    return terms

  def timed_steps(self, n: int) -> tuple[list[float], list[float], dict[str, float]]:
    """Wall-clock and process CPU seconds of each of n steps, and the last step's losses."""
    times, cpu_times, values = [], [], {}
    for _ in range(n):
      start, cpu_start = time.perf_counter(), time.process_time()
      terms = self.step()
      # Reading the values waits for the step, like jax.block_until_ready.
      values = {k: float(v.detach()) for k, v in terms.items()}
      if self.device.type == 'cuda':
        torch.cuda.synchronize()
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, values


def hardware(device: torch.device) -> str:
  if device.type == 'cuda':
    return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
  return f'CPU, {torch.get_num_threads()} threads, torch {torch.__version__}'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  pair = lambda s: tuple(int(v) for v in s.split(','))
  p.add_argument('--crop', type=lambda s: (pair(s) * 2)[:2] if ',' not in s else pair(s),
                 default=(512, 512), help='H,W of the random crops')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--variant', choices=('skd', 'student'), default='skd')
  p.add_argument('--mode', choices=('eager', 'compile'), default='eager')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
  p.add_argument('--channels_last', action='store_true', help='NHWC memory format')
  p.add_argument('--num_classes', type=int, default=19)
  p.add_argument('--student_depth', type=int, default=18)
  p.add_argument('--student_width', type=float, default=1.0)
  p.add_argument('--teacher_depth', type=int, default=101)
  p.add_argument('--teacher_width', type=float, default=1.0)
  p.add_argument('--disc_features', type=pair, default=(64, 128, 256, 512))
  p.add_argument('--disc_min_input_size', type=int, default=0)
  p.add_argument('--pi_reduction', choices=('batch_sum', 'mean'), default='batch_sum')
  p.add_argument('--num_steps', type=int, default=40000, help='poly schedule length')
  p.add_argument('--threads', type=int, default=0, help='intra-op threads (0: usable cores)')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--serve', action='store_true', help='read "run N" / "quit" from stdin')
  args = p.parse_args(argv)
  for depth in (args.student_depth, args.teacher_depth):
    if depth not in STAGE_SIZES:
      p.error(f'depth {depth} is not one of {sorted(STAGE_SIZES)}')
  return args


def main(argv=None):
  args = parse_args(argv)
  threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                             else os.cpu_count())
  torch.set_num_threads(threads)
  start = time.perf_counter()
  runner = SKDStep(args)
  info = {'hardware': hardware(runner.device), 'build_s': time.perf_counter() - start}
  if args.serve:
    print(json.dumps({'ready': info}), flush=True)
    for line in sys.stdin:
      cmd = line.split()
      if not cmd or cmd[0] == 'quit':
        break
      times, cpu_times, losses = runner.timed_steps(int(cmd[1]))
      print(json.dumps({'times': times, 'cpu_times': cpu_times, 'losses': losses}), flush=True)
    return
  runner.timed_steps(args.warmup)
  times, _, losses = runner.timed_steps(args.steps)
  step_s = statistics.median(times)
  print(f'{info["hardware"]}; {args.variant} step, {args.mode}, {args.dtype}, crop '
        f'{args.crop[0]}x{args.crop[1]}, batch {args.batch}: {args.batch / step_s:.3f} images/s '
        f'(median {step_s * 1e3:.1f} ms of {args.steps}; losses '
        f'{ {k: round(v, 4) for k, v in losses.items()} })')
  if not all(math.isfinite(v) for v in losses.values()):
    sys.exit('non-finite loss')


if __name__ == '__main__':
  main()
