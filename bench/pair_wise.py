"""Benchmark of the pair-wise loss: explicit M x M similarity matrices versus the Gram form.

    python bench/pair_wise.py [--quick] [--runs N] [--execute-large-explicit]

For teacher / student feature pairs (student 128 channels, teacher 512, batch 1, no pooling: every
feature pixel is a node, i.e. ``pool_kernel=1``), it times the jitted value-and-gradient (w.r.t. the
student feature) of

* explicit: the reference code's computation, the two [M, M] similarity matrices (written here,
  not in skd_jax);
* gram: `skd_jax.losses.pair_wise_loss`, ``||S^t S||^2 - 2 ||S^t T||^2 + ||T^t T||^2``;

and reports the memory XLA's compiled memory analysis assigns (temporaries + outputs), the
median time after compilation, and the error of each against a float64 NumPy computation. Cases
whose explicit form would not fit in this machine's memory are compiled but not executed (marked
in the table) unless --execute-large-explicit is given. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from skd_jax import losses  # pylint: disable=g-import-not-at-top

STUDENT_CH, TEACHER_CH = 128, 512
# Do not execute a case whose compiled buffers exceed this share of the physical memory.
MEMORY_SHARE = 0.6
# Cases slower than this (seconds, warm-up run) are timed over at most SLOW_RUNS runs.
SLOW_S, SLOW_RUNS = 20.0, 3


def explicit_loss(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
  """Reference ``sim_dis_compute`` without pooling: explicit [N, M, M] similarity matrices."""

  def similarity(f):
    n, h, w, c = f.shape
    f = f.reshape(n, h * w, c)
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(f * f, -1, keepdims=True)) + 1e-8)
    f = f / norm
    return jnp.einsum('nmc,nkc->nmk', f, f, precision=jax.lax.Precision.HIGHEST)

  n, h, w, _ = student_feat.shape
  a_s = similarity(student_feat.astype(jnp.float32))
  a_t = similarity(jax.lax.stop_gradient(teacher_feat.astype(jnp.float32)))
  return jnp.sum(jnp.square(a_t - a_s)) / (h * w)**2 / n


def gram_loss(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
  return losses.pair_wise_loss(student_feat, teacher_feat, pool_kernel=1)


def float64_reference(fs: np.ndarray, ft: np.ndarray) -> tuple[float, np.ndarray]:
  """Loss and student gradient in float64 (Gram form and its closed-form gradient).

  In float64 the Gram form's cancellation is far below float32 resolution, so this is exact for
  the purpose of judging the float32 forms. With the norm c constant, d loss / d f_S =
  -4 (A_T - A_S) S / (M^2 N c), and (A_T - A_S) S = T (T^t S) - S (S^t S).
  """
  n, h, w, _ = fs.shape
  m = h * w
  s = fs.reshape(n, m, -1).astype(np.float64)
  t = ft.reshape(n, m, -1).astype(np.float64)
  cs = np.sqrt((s**2).sum(-1, keepdims=True)) + 1e-8
  s, t = s / cs, t / (np.sqrt((t**2).sum(-1, keepdims=True)) + 1e-8)
  ss, st, tt = (np.einsum('nmc,nmd->ncd', a, b) for a, b in ((s, s), (s, t), (t, t)))
  value = ((ss**2).sum() - 2 * (st**2).sum() + (tt**2).sum()) / m**2 / n
  diff_s = np.einsum('nmd,ncd->nmc', t, st) - np.einsum('nmd,ncd->nmc', s, ss)
  grad = -4.0 * diff_s / (m**2 * n) / cs
  return float(value), grad.reshape(fs.shape)


def make_features(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A non-negative teacher feature and a student feature that roughly preserves its geometry.

  Post-activation features are mostly positive, so their cosine similarities are large and the
  Gram form's three terms are large compared with their difference: the hard case for its
  float32 accuracy (independent Gaussian features would flatter it).
  """
  rng = np.random.default_rng(seed)
  ft = np.maximum(rng.standard_normal((1, h, w, TEACHER_CH)), 0.0)
  proj = rng.standard_normal((TEACHER_CH, STUDENT_CH)) / np.sqrt(TEACHER_CH)
  fs = np.maximum(ft @ proj + 0.3 * rng.standard_normal((1, h, w, STUDENT_CH)), 0.0)
  return fs.astype(np.float32), ft.astype(np.float32)


def physical_memory() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def fmt_bytes(b: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if b < 1024 or unit == 'GiB':
      return f'{b:.1f} {unit}' if unit != 'B' else f'{int(b)} B'
    b /= 1024


def run_case(name, fn, fs, ft, runs, should_execute):
  """Compiles value_and_grad of fn, then executes it if should_execute(memory stats) says so.

  Returns a dict with the compiled footprint, and the median time, value and gradient when
  executed.
  """
  step = jax.jit(jax.value_and_grad(fn))
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (fs, ft)]
  t0 = time.perf_counter()
  compiled = step.lower(*shapes).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
  out = dict(name=name, peak=peak, args=mem.argument_size_in_bytes, compile_s=compile_s,
             executed=False)
  if not should_execute(mem):
    return out
  fs_d, ft_d = jax.device_put(fs), jax.device_put(ft)
  t0 = time.perf_counter()
  value, grad = jax.block_until_ready(compiled(fs_d, ft_d))  # Warm-up.
  if time.perf_counter() - t0 > SLOW_S:
    runs = min(runs, SLOW_RUNS)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(fs_d, ft_d))
    times.append(time.perf_counter() - t0)
  out.update(executed=True, time=statistics.median(times), runs=runs, value=float(value),
             grad=np.asarray(grad))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='smaller node grids (33x33, 65x129)')
  parser.add_argument('--runs', type=int, default=5, help='timed runs per case (median)')
  parser.add_argument('--execute-large-explicit', action='store_true',
                      help='execute explicit cases even when they exceed the memory guard')
  args = parser.parse_args()
  sizes = [(33, 33), (65, 129)] if args.quick else [(65, 65), (129, 257)]
  limit = MEMORY_SHARE * physical_memory()

  print(f'JAX {jax.__version__} on {jax.devices()[0].platform} '
        f'({jax.devices()[0].device_kind}); batch 1, student {STUDENT_CH} ch, teacher '
        f'{TEACHER_CH} ch, no pooling; jit(value_and_grad) w.r.t. the student feature, median '
        f'of timed runs after compilation and one warm-up run; memory = XLA compiled memory '
        f'analysis, temp + output buffers (inputs not counted).\n')
  header = ('| nodes (M) | form | time | memory (temp + output) | loss rel. err. vs f64 '
            '| grad max err. / max abs (vs f64) |')
  print(header)
  print('|' + '---|' * 6)
  ratios = []
  for h, w in sizes:
    m = h * w
    fs, ft = make_features(h, w)
    want_value, want_grad = float64_reference(fs, ft)
    results = {}
    for name, fn in (('explicit M x M', explicit_loss), ('Gram', gram_loss)):
      force = name != 'Gram' and args.execute_large_explicit
      fits = lambda mem: force or (mem.temp_size_in_bytes + mem.output_size_in_bytes
                                   + mem.argument_size_in_bytes) < limit
      res = run_case(name, fn, fs, ft, args.runs, fits)
      results[name] = res
      if res['executed']:
        secs = res['time']
        t = f'{secs:.2f} s' if secs >= 10 else f'{secs * 1e3:.1f} ms'
        t += f" (median of {res['runs']})"
        v_err = f"{abs(res['value'] - want_value) / abs(want_value):.1e}"
        g_err = (np.abs(res['grad'] - want_grad).max() / np.abs(want_grad).max())
        g_err = f'{g_err:.1e}'
      else:
        t = (f'not executed (needs {fmt_bytes(res["peak"] + res["args"])} > '
             f'{fmt_bytes(limit)} guard)')
        v_err = g_err = 'n/a'
      print(f'| {h}x{w} ({m}) | {name} | {t} | {fmt_bytes(res["peak"])} | {v_err} | {g_err} |',
            flush=True)
    e, g = results['explicit M x M'], results['Gram']
    time_ratio = (f"{e['time'] / g['time']:.1f}x" if e['executed'] and g['executed'] else 'n/a')
    ratios.append((f'{h}x{w}', time_ratio, f"{e['peak'] / max(g['peak'], 1):.0f}x",
                   f'{want_value:.4g}'))
  print('\n| nodes | time explicit / Gram | memory explicit / Gram | loss (f64) |')
  print('|---|---|---|---|')
  for row in ratios:
    print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
  main()
