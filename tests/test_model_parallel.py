"""Model parallelism: kernels split over a 'model' mesh axis give the data-parallel training step.

The sharding rule is checked against hand-worked shapes; three full SKD steps on 8 simulated
devices as a 4 x 2 ('data' x 'model') mesh, teacher and student kernels split, each from the
state of the same steps on 8 x 1 (pure data parallel), are compared leaf by leaf with them.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from skd_jax import sharding as sharding_lib
from test_train import assert_within_cross_config_tolerances

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_states_match(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], *,
                        momentum_tol: float = 1e-5) -> dict[str, float]:
  """Leaf-by-leaf comparison of two flattened `TrainState`s ({keystr path: array}).

  The tolerances of tests/test_train.py's 8-device check (see there): 1e-5 for the student,
  1e-3 for the discriminator, whose input BatchNorm magnifies the student's float32 rounding
  differences. The student's optimiser momenta (sums of raw gradients) get `momentum_tol`.
  Returns the worst relative difference of each part.
  """
  assert sorted(reference) == sorted(got)
  worst = {'student': 0.0, 'student_momentum': 0.0, 'disc': 0.0}
  for name, a in reference.items():
    a, b = np.asarray(a, np.float64), np.asarray(got[name], np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    if not a.size:
      continue
    if name.startswith('.disc'):
      part, tol = 'disc', 1e-3
    elif name.startswith('.student_opt_state'):
      part, tol = 'student_momentum', momentum_tol
    else:
      part, tol = 'student', 1e-5
    worst[part] = max(worst[part], float(np.max(np.abs(a - b) / (1 + np.abs(a)))))
    assert np.allclose(a, b, rtol=tol, atol=tol), (name, float(np.max(np.abs(a - b))))
  return worst


@pytest.mark.parametrize('shape, model_size, spec', [
    ((3, 3, 64, 128), 2, P(None, None, None, 'model')),   # output channels, the largest
    ((3, 3, 64, 64), 2, P(None, None, None, 'model')),    # a tie: the last of them
    ((1, 1, 256, 64), 4, P(None, None, 'model', None)),   # a 1x1 reduction: input channels
    ((512, 19), 2, P('model', None)),                     # a dense kernel
    ((3, 3, 3, 63), 2, P()),                              # largest not divisible: replicated
    ((3, 3, 6, 63), 2, P()),                              # only the largest is considered
    ((128,), 2, P()),                                     # biases and BN: replicated
    ((), 2, P()),
    ((3, 3, 64, 128), 1, P()),                            # no model axis
])
def test_model_parallel_rule_splits_the_largest_dimension(shape, model_size, spec):
  assert sharding_lib.model_parallel_spec(shape, model_size) == spec


def fake_devices(num_processes: int, per_process: int) -> list[types.SimpleNamespace]:
  return [types.SimpleNamespace(process_index=p, id=p * per_process + i)
          for p in range(num_processes) for i in range(per_process)]


@pytest.mark.parametrize('shape, match', [
    ({'data': 3, 'model': 1}, r'needs 3 devices, there are 8'),
    ({'data': -1, 'model': -1}, r'at most one -1'),
    ({'data': -1, 'model': 3}, r'does not divide the 8 devices'),
    ({'data': -1}, r"exactly the keys \('data', 'model'\)"),
    ({'data': 1, 'model': 8}, r'config.mesh.model = 8 does not divide the 4 devices of one'),
])
def test_bad_mesh_config_is_a_clear_error(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding_lib.make_mesh(fake_devices(2, 4), shape=shape)


def test_data_axis_divides_the_batch_and_each_process_feeds_its_rows():
  mesh = sharding_lib.make_mesh(jax.devices()[:1], shape={'data': -1, 'model': 1})
  assert mesh.axis_names == ('data', 'model') and mesh.devices.shape == (1, 1)
  assert sharding_lib.check_batch_size(8, mesh, 'optim.batch_size') == 8
  # 2 processes x 4 devices as 4 x 2: process 0 holds data rows 0 and 1 of 4, so 2 * 8/4 rows.
  rows = np.asarray(fake_devices(2, 4), dtype=object).reshape(4, 2)
  fake_mesh = types.SimpleNamespace(devices=rows)
  assert sharding_lib.check_batch_size(8, fake_mesh, 'optim.batch_size') == 4
  with pytest.raises(ValueError, match=r'optim.batch_size = 6 does not divide over the 4 devices '
                                       r'of the data axis; use a multiple of 4 \(e.g. 4\)'):
    sharding_lib.check_batch_size(6, fake_mesh, 'optim.batch_size')


MODEL_PARALLEL_CHECK = textwrap.dedent('''
    import functools, pickle, sys
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    from test_train import one_step_errors, step_inputs, worst_errors
    from skd_jax import sharding as sharding_lib, train
    assert jax.device_count() == 8, jax.devices()
    ctx, teacher_vars, batches = step_inputs(int(sys.argv[2]))
    make_state = functools.partial(train.create_train_state, ctx, (8, 64, 64, 3))

    def layout(tree):
      """{path: (global shape, the shape of one device's shard)}."""
      return {jax.tree_util.keystr(p): (x.shape, x.addressable_shards[0].data.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    def stepper(shape, shard_student):
      """One step from a host state on a mesh, as train_and_evaluate shards it: the new state
      and metrics on the host, and the layouts of the state and the teacher."""
      mesh = sharding_lib.make_mesh(shape=shape)
      teacher_sharding = sharding_lib.model_parallel(teacher_vars, mesh)
      state_sharding = train.state_shardings(jax.eval_shape(make_state, 0), mesh, shard_student)
      tv = jax.device_put(teacher_vars, teacher_sharding)
      step = train.jit_train_step(ctx, mesh, state_sharding, teacher_sharding)
      def run(state, batch):
        state, metrics = step(jax.device_put(state, state_sharding),
                              sharding_lib.global_batch(batch, mesh), tv)
        layouts = {'state_layout': layout(state), 'teacher_layout': layout(tv)}
        return jax.device_get(state), jax.device_get(metrics), layouts
      return run

    data_parallel = stepper({'data': 8, 'model': 1}, False)
    model_parallel = stepper({'data': 4, 'model': 2}, True)
    state = jax.device_get(jax.jit(make_state)(0))
    errors = []
    for batch in batches:   # each step from the data-parallel state
      reference, m_dp, dp_layouts = data_parallel(state, batch)
      got, m_mp, mp_layouts = model_parallel(state, batch)
      errors.append(one_step_errors(state, reference, got, m_dp, m_mp))
      state = reference
    assert np.isfinite(m_dp['loss/total'])
    with open(sys.argv[1], 'wb') as f:
      pickle.dump({'errors': worst_errors(errors), 'data_parallel': dp_layouts,
                   'model_parallel': mp_layouts}, f)
''')


def split_dims(layout: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, int]:
  """{path: the dimension its shards split, or -1 when each device holds it whole}."""
  out = {}
  for name, (shape, shard) in layout.items():
    halved = [i for i, (n, s) in enumerate(zip(shape, shard)) if s != n]
    assert len(halved) <= 1 and all(shard[i] * 2 == shape[i] for i in halved), (name, shape, shard)
    out[name] = halved[0] if halved else -1
  return out


def expected_split(shape: tuple[int, ...]) -> int:
  """The rule worked out directly: largest dimension (last of ties) of a kernel, if even."""
  if len(shape) < 2:
    return -1
  largest = max(shape)
  dim = len(shape) - 1 - list(reversed(shape)).index(largest)
  return dim if largest % 2 == 0 else -1


def test_four_by_two_mesh_gives_the_data_parallel_step(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', MODEL_PARALLEL_CHECK, str(tmp_path / 'out.pkl'), '0'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  with open(tmp_path / 'out.pkl', 'rb') as f:
    runs = pickle.load(f)
  # Each of 3 steps from the data-parallel state, within the tolerances of test_train.py's
  # 8-device check (measured for both there). Splitting a kernel's input channels over 'model'
  # sums its gradient in another order; the differences are those of one step's rounding.
  print('4 x 2 vs 8 x 1, worst of 3 steps:', runs['errors'])
  assert_within_cross_config_tolerances(runs['errors'])
  dp, mp = runs['data_parallel'], runs['model_parallel']

  # The layouts really are the rule's: every teacher kernel, and the student's kernels and their
  # momenta, split in two along their largest even dimension; everything else whole.
  teacher = split_dims(mp['teacher_layout'])
  assert teacher == {k: expected_split(shape) for k, (shape, _) in mp['teacher_layout'].items()}
  state = split_dims(mp['state_layout'])
  for name, (shape, _) in mp['state_layout'].items():
    student = name.startswith(('.student_params', '.student_opt_state'))
    assert state[name] == (expected_split(shape) if student else -1), name
  assert sum(d >= 0 for d in teacher.values()) > 20
  assert sum(d >= 0 for k, d in state.items() if k.startswith('.student_params')) > 20
  assert all(d == -1 for d in split_dims(dp['state_layout']).values())
