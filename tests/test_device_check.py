"""bench/device_check.sh, the first command to run on an accelerator, run here on CPU with
`--tiny` in an interpreter where TensorFlow, tfds and clu cannot be imported (as on the GPU
machines, which have jax, flax, optax, orbax and numpy but none of those)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent('''
    import sys
    class _Blocked:
      """An environment without TensorFlow, tfds or clu: importing them fails."""
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'):
          raise ImportError(f'{name} is not installed here')
    sys.meta_path.insert(0, _Blocked())
    ''')


def test_device_check_runs_without_tensorflow(tmp_path):
  (tmp_path / 'sitecustomize.py').write_text(BLOCKER)
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(tmp_path), JAX_PLATFORMS='cpu',
             SKD_TORCH_PYTHON=sys.executable)
  # The blocker works: the interpreter the script gets cannot import TensorFlow.
  probe = subprocess.run([sys.executable, '-c', 'import tensorflow'], env=env,
                         capture_output=True, text=True)
  assert probe.returncode != 0 and 'tensorflow is not installed here' in probe.stderr
  out = subprocess.run(['bash', str(ROOT / 'bench' / 'device_check.sh'), '--tiny'], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  text = out.stdout
  assert re.search(r'^device: cpu', text, re.M), text[:500]
  # One table per dtype, each with the SKD and the student-alone step and finite images/s.
  for dtype in ('float32', 'bfloat16'):
    section = text.split(f'== {dtype}', 1)[1].split('== ', 1)[0]
    assert f'dtype {dtype}' in section
    rows = re.findall(r'^\| (SKD: .*?|student alone: .*?) \| ([0-9.]+) \|', section, re.M)
    assert [name.split(':')[0] for name, _ in rows] == ['SKD', 'student alone'], section
    assert all(float(rate) > 0 for _, rate in rows)
    assert 'MFU' not in section          # a CPU has no peak in the table
  assert 'no torch with CUDA' in text
