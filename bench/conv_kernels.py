r"""Every convolution of a network, timed as XLA runs it and (optionally) as PyTorch's oneDNN does.

    python bench/conv_kernels.py [--arch=pspnet_resnet18] [--crop=512,512] [--batch=1] \
        [--width=1.0] [--torch_python=/path/to/torch-venv/bin/python] [--reps=5]

The convolutions are those `skd_jax.models` builds for `--arch` at that input (recorded while
tracing the model's forward pass, one row per distinct shape, with how many times it occurs). For
each it times, jitted, median of `--reps` calls after one:

* xla fwd: `jax.lax.conv_general_dilated` (XLA's own convolution, what GPUs and TPUs run);
* xla fwd+bwd: the forward and the gradients w.r.t. the input and the kernel, all XLA's;
* ours fwd+bwd: the same through `skd_jax.ops.conv_general_dilated` (on CPU: 1x1 convolutions as
  matrix products, the kernel gradient by rows where it pays);
* torch fwd, torch fwd+bwd: the same convolution in PyTorch (oneDNN on CPU), NCHW, in a
  subprocess of `--torch_python` (OMP_WAIT_POLICY=PASSIVE), when given.

and prints a markdown table with the totals weighted by the counts: how much of a train step's
convolution time each implementation needs. Shared machines: rows are timed one after the other,
so compare rows within one run, not across runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from skd_jax import ops  # pylint: disable=g-import-not-at-top
from skd_jax.models import create_segmenter  # pylint: disable=g-import-not-at-top

NHWC = ('NHWC', 'HWIO', 'NHWC')
# Run by --torch_python: reads a JSON list of convolutions on stdin, prints their timings.
TORCH_SCRIPT = r'''
import json, statistics, sys, time
import torch
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
reps = int(sys.argv[2])
out = []
for c in json.load(sys.stdin):
  n, h, w, ci = c['lhs']; kh, kw, _, co = c['rhs']
  x = torch.randn(n, ci, h, w, requires_grad=True)
  k = torch.randn(co, ci, kh, kw, requires_grad=True)
  pad = tuple(p[0] for p in c['padding'])
  conv = lambda: F.conv2d(x, k, stride=tuple(c['strides']), padding=pad, dilation=tuple(c['dilation']))
  def fwd():
    with torch.no_grad():
      conv()
  def fwd_bwd():
    y = conv()
    torch.autograd.grad(y, (x, k), torch.ones_like(y))
  times = {}
  for name, fn in (('fwd', fwd), ('fwd_bwd', fwd_bwd)):
    fn()
    ts = []
    for _ in range(reps):
      start = time.perf_counter(); fn(); ts.append(time.perf_counter() - start)
    times[name] = statistics.median(ts)
  out.append(times)
print(json.dumps(out))
'''


def record_convs(arch: str, crop: tuple[int, int], batch: int, width: float
                 ) -> collections.Counter:
  """Counter of (lhs shape, rhs shape, strides, padding, dilation) over the model's convs."""
  seen = collections.Counter()
  original = ops.conv_general_dilated

  def recording(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    seen[(tuple(lhs.shape), tuple(rhs.shape), tuple(window_strides),
          tuple(tuple(p) for p in padding), tuple(rhs_dilation or (1, 1)))] += 1
    return original(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, precision, **kwargs)

  ops.conv_general_dilated = recording   # layers.conv passes ops.conv_general_dilated to nn.Conv
  try:
    model = create_segmenter(arch, 19, width_multiplier=width)
    images = jnp.zeros((batch, *crop, 3))
    jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  finally:
    ops.conv_general_dilated = original
  return seen


def time_jax(fn, *args, reps: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_ours_and_xla(conv, reps: int) -> dict[str, float]:
  lhs_shape, rhs_shape, strides, padding, dilation = conv
  key_x, key_k = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, lhs_shape)
  k = jax.random.normal(key_k, rhs_shape) * 0.01

  def xla(v, kern):
    return jax.lax.conv_general_dilated(v, kern, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=NHWC)

  def ours(v, kern):
    return ops.conv_general_dilated(v, kern, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=NHWC)

  def fwd_bwd(fn):
    def run(v, kern):
      y, vjp = jax.vjp(fn, v, kern)
      return vjp(jnp.ones_like(y))
    return run

  return {'xla_fwd': time_jax(xla, x, k, reps=reps),
          'xla_fwd_bwd': time_jax(fwd_bwd(xla), x, k, reps=reps),
          'ours_fwd_bwd': time_jax(fwd_bwd(ours), x, k, reps=reps)}


def time_torch(python: str, convs: list, reps: int) -> list[dict[str, float]]:
  payload = json.dumps([{'lhs': c[0], 'rhs': c[1], 'strides': c[2], 'padding': c[3],
                         'dilation': c[4]} for c in convs])
  threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
  out = subprocess.run([python, '-c', TORCH_SCRIPT, str(threads), str(reps)], input=payload,
                       capture_output=True, text=True, env=env, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def describe(conv) -> str:
  (n, h, w, ci), (kh, kw, _, co), strides, _, dilation = conv
  text = f'{n}x{h}x{w}x{ci} -> {co}, {kh}x{kw}'
  if strides != (1, 1):
    text += f' stride {strides[0]}'
  if dilation != (1, 1) and (kh, kw) != (1, 1):
    text += f' dilation {dilation[0]}'
  return text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--arch', default='pspnet_resnet18')
  p.add_argument('--crop', default='512,512')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--torch_python', default=os.environ.get('SKD_TORCH_PYTHON', ''))
  args = p.parse_args(argv)
  crop = tuple(int(v) for v in args.crop.split(','))
  if len(crop) != 2:
    p.error(f'--crop={args.crop}: give H,W')
  counts = record_convs(args.arch, crop, args.batch, args.width)
  convs = sorted(counts, key=lambda c: -counts[c] * c[0][1] * c[0][2] * c[1][2] * c[1][3] *
                 c[1][0] * c[1][1])
  rows = []
  for conv in convs:
    rows.append(time_ours_and_xla(conv, args.reps))
    print(f'  {describe(conv)}: ' + ', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in rows[-1].items()),
          flush=True)
  names = ['xla_fwd', 'xla_fwd_bwd', 'ours_fwd_bwd']
  if args.torch_python:
    for row, t in zip(rows, time_torch(args.torch_python, convs, args.reps)):
      row.update(torch_fwd=t['fwd'], torch_fwd_bwd=t['fwd_bwd'])
    names += ['torch_fwd', 'torch_fwd_bwd']
  header = '| convolution (NHWC in -> out channels) | count | ' + ' | '.join(
      f'{n} (ms)' for n in names) + ' |'
  lines = [f'Convolutions of {args.arch} (width {args.width}) at {crop[0]}x{crop[1]}, batch '
           f'{args.batch}, float32, on {jax.devices()[0].device_kind} ({jax.device_count()} '
           f'device(s), {len(os.sched_getaffinity(0))} cores); median of {args.reps} calls.', '',
           header, '|' + '---|' * (len(names) + 2)]
  totals = collections.Counter()
  for conv, row in zip(convs, rows):
    lines.append(f'| {describe(conv)} | {counts[conv]} | ' +
                 ' | '.join(f'{row[n] * 1e3:.1f}' for n in names) + ' |')
    for n in names:
      totals[n] += counts[conv] * row[n]
  lines.append('| **total (x count)** | | ' + ' | '.join(f'**{totals[n] * 1e3:.0f}**'
                                                         for n in names) + ' |')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
