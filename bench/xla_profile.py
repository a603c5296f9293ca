"""Per-op timings of a compiled XLA program, from `jax.profiler` traces, named by the model path.

    rows, wall_s = profile_ops(compiled, args_fn, steps=3)
    print(format_top(rows, wall_s, top=25))

`profile_ops` runs a compiled program under `jax.profiler.trace` with XLA:CPU's per-thunk trace
events on (``--xla_cpu_enable_xprof_traceme``, which must be in ``XLA_FLAGS`` before JAX starts:
`enable_cpu_op_events`), reads the trace back with `jax.profiler.ProfileData`, and sums the time of
each top-level HLO instruction (fusion, convolution, custom call, copy) over the profiled steps.
Each instruction is described from the compiled module's HLO text: its opcode, the heavy ops
inside a fusion (convolutions with their window and dilation, dots, reductions), its output shape,
and the JAX/Flax name stack of its metadata (``jvp(Segmenter)/backbone/layer4_0/conv1`` is the
forward of that conv, ``transpose(jvp(Segmenter))/...`` its backward).

On GPUs and TPUs the device planes carry the same ``hlo_op`` names; the summing is the same.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
from typing import Any, Callable, Iterable

import jax

_TRACEME_FLAG = '--xla_cpu_enable_xprof_traceme=true'
# Instructions whose cost dominates a fusion: named in the description of the fusion.
_HEAVY = ('convolution', 'dot', 'reduce-window', 'select-and-scatter', 'reduce', 'scatter',
          'gather', 'sort', 'custom-call')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$')


def enable_cpu_op_events() -> None:
  """Adds XLA:CPU's per-op trace events to ``XLA_FLAGS``; call before JAX initialises its backend."""
  flags = os.environ.get('XLA_FLAGS', '')
  if _TRACEME_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {_TRACEME_FLAG}'.strip()


@dataclasses.dataclass
class Instruction:
  name: str
  type: str
  opcode: str
  rest: str
  computation: str

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.rest)
    return m.group(1) if m else ''

  @property
  def calls(self) -> str | None:
    m = re.search(r'calls=%([\w.\-]+)', self.rest)
    return m.group(1) if m else None

  @property
  def operands(self) -> list[str]:
    head = self.rest.split(')', 1)[0]
    return re.findall(r'%([\w.\-]+)', head)

  def attribute(self, key: str) -> str:
    m = re.search(key + r'=(\{[^}]*\}|[\w.\-]+)', self.rest)
    return m.group(1) if m else ''


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[Instruction]]]:
  """(instruction by name, instructions by computation) of an HLO module's text."""
  by_name, by_computation = {}, collections.defaultdict(list)
  computation = ''
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      ins = Instruction(m.group(1), m.group(2), m.group(3), m.group(4), computation)
      by_name[ins.name] = ins
      by_computation[computation].append(ins)
      continue
    m = _COMPUTATION.match(line)
    if m:
      computation = m.group(1)
  return by_name, by_computation


def _short_type(t: str) -> str:
  return re.sub(r'\{[^}]*\}', '', t)


def _describe_heavy(ins: Instruction, by_name: dict[str, Instruction]) -> str:
  operand_types = ' x '.join(_short_type(by_name[o].type) for o in ins.operands if o in by_name)
  text = f'{ins.opcode} {operand_types} -> {_short_type(ins.type)}'
  if ins.opcode == 'convolution':
    text += f' window={ins.attribute("window")} {ins.attribute("dim_labels")}'
    groups = ins.attribute('feature_group_count')
    if groups:
      text += f' groups={groups}'
  elif ins.opcode in ('reduce-window', 'select-and-scatter'):
    text += f' window={ins.attribute("window")}'
  elif ins.opcode == 'dot':
    text += (f' lhs_contract={ins.attribute("lhs_contracting_dims")}'
             f' rhs_contract={ins.attribute("rhs_contracting_dims")}')
  return text


def category(description: str, op_name: str) -> str:
  """A coarse kind: 'conv dilated fwd', 'conv bwd', 'dot', 'reduce', 'elementwise', 'copy', ..."""
  backward = 'transpose(' in op_name
  direction = 'bwd' if backward else 'fwd'
  if description.startswith('convolution') or ' convolution ' in description:
    window = re.search(r'window=\{([^}]*)\}', description)
    window = window.group(1) if window else ''
    dilated = 'rhs_dilate' in window or 'lhs_dilate' in window
    return f'conv{" dilated" if dilated else ""} {direction}'
  for kind in ('dot', 'reduce-window', 'select-and-scatter', 'reduce', 'scatter', 'gather',
               'sort'):
    if description.startswith(kind) or f' {kind} ' in description:
      return kind
  if description.startswith(('copy', 'transpose')):
    return 'copy/transpose'
  return 'elementwise'


def describe(name: str, by_name: dict[str, Instruction],
             by_computation: dict[str, list[Instruction]]) -> tuple[str, str]:
  """(description, op_name) of a top-level instruction by name."""
  ins = by_name.get(name)
  if ins is None:
    return '?', ''
  if ins.opcode == 'fusion' and ins.calls:
    inner = by_computation.get(ins.calls, [])
    heavy = [i for i in inner if i.opcode in _HEAVY]
    op_name = next((i.op_name for i in heavy if i.op_name), ins.op_name)
    if heavy:
      return ('; '.join(_describe_heavy(i, by_name) for i in heavy[:2]) +
              ('; ...' if len(heavy) > 2 else '')), op_name
    kind = re.search(r'kind=(\w+)', ins.rest)
    return f'fusion({kind.group(1) if kind else "?"}) -> {_short_type(ins.type)}', op_name
  if ins.opcode in _HEAVY:
    return _describe_heavy(ins, by_name), ins.op_name
  return f'{ins.opcode} -> {_short_type(ins.type)}', ins.op_name


@dataclasses.dataclass
class OpRow:
  name: str           # the HLO instruction
  seconds: float      # per step, summed over the threads it ran on
  calls: float        # per step
  category: str
  description: str
  op_name: str        # JAX name stack of its metadata


def _hlo_op_events(xspace_path: str, module_names: Iterable[str]) -> dict[str, list[float]]:
  """Durations (s) of every event naming an HLO op of one of `module_names`, by op."""
  profile = jax.profiler.ProfileData.from_file(xspace_path)
  durations = collections.defaultdict(list)
  modules = set(module_names)
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get('hlo_op')
        if op is None or (modules and stats.get('hlo_module') not in modules):
          continue
        durations[op].append(event.duration_ns * 1e-9)
  return durations


def profile_ops(compiled, run: Callable[[], Any], steps: int) -> list[OpRow]:
  """Per-op seconds per step of `compiled`, from `steps` calls of ``run()`` (which must call it
  and block) under the profiler; rows sorted by time, slowest first."""
  module = re.search(r'HloModule ([\w.\-]+)', compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        run()
    paths = glob.glob(os.path.join(tmp, '**', '*.xplane.pb'), recursive=True)
    if not paths:
      raise RuntimeError('the profiler wrote no trace')
    durations = _hlo_op_events(paths[0], [module.group(1)] if module else [])
  if not durations:
    raise RuntimeError('no per-op events in the trace: on CPU call enable_cpu_op_events() '
                       'before JAX starts')
  by_name, by_computation = parse_hlo(compiled.as_text())
  rows = []
  for name, times in durations.items():
    description, op_name = describe(name, by_name, by_computation)
    rows.append(OpRow(name, sum(times) / steps, len(times) / steps,
                      category(description, op_name), description, op_name))
  return sorted(rows, key=lambda r: -r.seconds)


def _model_path(op_name: str) -> str:
  """'backbone/layer4_0/conv1 (bwd)' from 'jit(f)/transpose(jvp(Segmenter))/backbone/...'."""
  backward = 'transpose(' in op_name
  parts = [p for p in op_name.split('/')[1:] if not re.match(r'^(jvp|transpose|jit|vmap)\(', p)]
  path = '/'.join(parts[:-1]) if len(parts) > 1 else '/'.join(parts)
  return f'{path} ({"bwd" if backward else "fwd"})' if path else ''


def by_category(rows: list[OpRow]) -> list[tuple[str, float]]:
  totals = collections.Counter()
  for r in rows:
    totals[r.category] += r.seconds
  return totals.most_common()


def format_top(rows: list[OpRow], wall_s: float, top: int = 25) -> str:
  """A markdown table of the `top` ops and one of the time per category."""
  total = sum(r.seconds for r in rows)
  lines = [f'Sum of per-op times {total * 1e3:.1f} ms/step (wall clock {wall_s * 1e3:.1f} ms/step; '
           f'{len(rows)} ops).', '',
           '| # | ms/step | % | kind | model path | op (HLO) |', '|---|---|---|---|---|---|']
  for i, r in enumerate(rows[:top], start=1):
    desc = r.description if len(r.description) < 150 else r.description[:147] + '...'
    lines.append(f'| {i} | {r.seconds * 1e3:.1f} | {100 * r.seconds / total:.1f} | {r.category} | '
                 f'{_model_path(r.op_name)} | `{desc}` |')
  lines += ['', '| kind | ms/step | % |', '|---|---|---|']
  lines += [f'| {k} | {s * 1e3:.1f} | {100 * s / total:.1f} |' for k, s in by_category(rows)]
  return '\n'.join(lines)
