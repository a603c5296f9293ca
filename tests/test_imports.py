"""The import rules of the package (README, "What is where"), read from real imports.

* The import graph: one fresh interpreter imports every module of skd_jax (and bench/throughput.py)
  while `builtins.__import__` records which skd_jax module each module's top level imports; the
  graph has no circle, and its layers hold: models/, losses, ops, inference and evaluator import
  nothing from data/; nothing but the programs imports train, evaluate or main; data/ imports
  nothing outside data/ but paths.
* TensorFlow: a fresh interpreter per module imports `skd_jax.train`, the models, losses, ops,
  inference, evaluator or bench/throughput.py and finds neither tensorflow nor
  tensorflow_datasets in `sys.modules` (TensorFlow is for the data pipeline and export only).
* A function-local import of a skd_jax module, or of TensorFlow or clu, is allowed only for an
  optional heavy dependency: its line ends with ``# optional: WHY``. (A circle dodged by a late
  import would also show here.)
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'skd_jax'
PROGRAMS = {'skd_jax.main', 'skd_jax.evaluate', 'skd_jax.export', 'skd_jax.convert'}
PURE = ('skd_jax.models', 'skd_jax.losses', 'skd_jax.ops', 'skd_jax.inference',
        'skd_jax.evaluator')
NO_TENSORFLOW = ('skd_jax.train', *PURE)
HEAVY = ('skd_jax', 'tensorflow', 'tensorflow_datasets', 'clu')


def _module_names() -> list[str]:
  names = []
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(ROOT).with_suffix('').parts
    names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  return names


_GRAPH_SCRIPT = textwrap.dedent('''
    import builtins, importlib, json, sys
    edges = {}
    real_import = builtins.__import__

    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
      module = real_import(name, globals, locals, fromlist, level)
      importer = (globals or {}).get('__name__', '')
      at_top = sys._getframe(1).f_code.co_name == '<module>'
      if at_top and importer.startswith('skd_jax') and name.startswith('skd_jax') and not level:
        targets = [name] + [f'{name}.{item}' for item in fromlist or ()
                            if f'{name}.{item}' in sys.modules]
        edges.setdefault(importer, set()).update(t for t in targets if t != importer)
      return module

    builtins.__import__ = recording_import
    for name in json.loads(input()):
      importlib.import_module(name)
    print(json.dumps({k: sorted(v) for k, v in edges.items()}))
''')


@pytest.fixture(scope='module')
def graph() -> dict[str, set[str]]:
  """{module: the skd_jax modules its top level imports}."""
  # Each program defines its absl flags at import, so each has an interpreter of its own.
  modules = _module_names()
  groups = [[m for m in modules if m not in PROGRAMS]] + [[m] for m in modules if m in PROGRAMS]
  raw = {}
  for group in groups:
    done = subprocess.run([sys.executable, '-c', _GRAPH_SCRIPT], input=json.dumps(group),
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for module, targets in json.loads(done.stdout.strip().splitlines()[-1]).items():
      raw.setdefault(module, set()).update(targets)
  # `from skd_jax import paths` also names the package skd_jax (whose __init__ imports nothing).
  return {k: set(v) - {'skd_jax'} for k, v in raw.items()}


def _reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for target in graph.get(todo.pop(), ()):
      if target not in seen:
        seen.add(target)
        todo.append(target)
  return seen


def test_the_graph_was_recorded(graph):
  # A check that reads an empty graph passes vacuously: the known edges must be there.
  assert 'skd_jax.experiment' in graph['skd_jax.train']
  assert 'skd_jax.data.spec' in graph['skd_jax.data.cityscapes']
  assert 'skd_jax.data.cityscapes' in graph['skd_jax.data.datasets']


def test_no_import_circles(graph):
  circles = sorted(m for m in graph if m in _reachable(graph, m))
  assert not circles, f'modules on an import circle: {circles}'


def test_layers(graph):
  for module in graph:
    below = _reachable(graph, module)
    if module.startswith(PURE):
      data = sorted(m for m in below if m.startswith('skd_jax.data'))
      assert not data, f'{module} imports {data}: the networks and the maths know no dataset'
    if module not in PROGRAMS | {'skd_jax.demo'}:   # the demo runs train_and_evaluate thrice
      above = sorted(below & {'skd_jax.train', 'skd_jax.evaluate', 'skd_jax.main'})
      assert not above, f'{module} imports {above}: nothing below the loop imports it'
    if module.startswith('skd_jax.data'):
      outside = sorted(m for m in below
                       if not m.startswith('skd_jax.data') and m != 'skd_jax.paths')
      assert not outside, f'{module} imports {outside}: data/ stands on its own'


@pytest.mark.parametrize('module', [*NO_TENSORFLOW, 'bench/throughput.py'])
def test_no_tensorflow_at_import(module):
  # A bench script imports its neighbours, as `python bench/throughput.py` lets it.
  load = (f'import runpy; sys.path.insert(0, {str(ROOT / "bench")!r}); '
          f'runpy.run_path({str(ROOT / module)!r}, run_name="not_main")'
          if module.endswith('.py') else f'import {module}')
  done = subprocess.run(
      [sys.executable, '-c', f'import sys; {load}; '
       'print(sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules))'],
      capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == '[]', f'{module} imports TensorFlow'


def test_late_imports_say_why():
  late = []
  for path in sorted([*PACKAGE.rglob('*.py'), ROOT / 'bench' / 'throughput.py']):
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse('\n'.join(lines))):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for inner in ast.walk(node):
        if isinstance(inner, ast.Import):
          names = [a.name for a in inner.names]
        elif isinstance(inner, ast.ImportFrom):
          names = [inner.module or '']
        else:
          continue
        heavy = [n for n in names if n.split('.')[0] in HEAVY]
        line = lines[inner.end_lineno - 1]
        if heavy and '# optional: ' not in line:
          late.append(f'{path.relative_to(ROOT)}:{inner.lineno}: {line.strip()}')
  assert not late, 'function-local imports without "# optional: WHY":\n' + '\n'.join(late)
