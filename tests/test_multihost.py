"""Multi-host: two processes on loopback train and evaluate exactly like one process.

`python -m skd_jax.main` runs as 2 processes of 4 simulated CPU devices each, joined by
`jax.distributed` (gloo collectives) through the --coordinator_address flags: process 0 prepares
the synthetic data while process 1 waits, each reads its own share of every batch, both write the
checkpoint, only process 0 writes TensorBoard logs. A single process with 8 devices then replays
the same global batches (the two processes' input streams, concatenated) from the same
initialisation and evaluates the 2-process checkpoint: the states after 3 SKD steps and the
evaluation confusion matrices must agree.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from skd_jax import sharding as sharding_lib
from test_model_parallel import assert_states_match
from test_train import teacher_export  # noqa: F401  pylint: disable=unused-import (a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 3
# As tests/test_train.py's 8-device check (see there): the reference learning rate turns float32
# rounding differences into large ones within 3 steps, which says nothing about sharding.
RUN_FLAGS = ('--config=configs/test.py', f'--config.optim.num_steps={NUM_STEPS}',
             '--config.optim.lr=1e-3', f'--config.checkpoint.every_steps={NUM_STEPS}',
             f'--config.eval.every_steps={NUM_STEPS}')


@pytest.mark.parametrize('environ, flags, expected', [
    ({}, {}, None),                                                      # one host
    ({'TPU_WORKER_HOSTNAMES': 'host-0'}, {}, None),                      # a single-host TPU VM
    ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1,host-2,host-3'}, {}, {}),   # a pod slice
    ({'TPU_PROCESS_ADDRESSES': 'a:8476,b:8476'}, {}, {}),
    ({'MEGASCALE_NUM_SLICES': '2'}, {}, {}),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, {}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}, {}, {}),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16', 'SLURM_STEP_NUM_TASKS': '1'}, {}, None),
    ({'OMPI_COMM_WORLD_SIZE': '4'}, {}, {}),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, {}, {}),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'},
     {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1},
     {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1,
      'cluster_detection_method': 'deactivate'}),
    ({}, {'coordinator_address': 'h:1', 'num_processes': 1, 'process_id': 0}, None),
])
def test_distributed_start_only_where_the_launch_is_multi_host(environ, flags, expected):
  assert sharding_lib.distributed_request(environ, **flags) == expected


@pytest.mark.parametrize('flags, match', [
    ({'coordinator_address': 'h:1'}, r'missing --num_processes, --process_id'),
    ({'coordinator_address': 'h', 'num_processes': 2, 'process_id': 0}, r'needs a port: HOST:PORT'),
    ({'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2}, r'must be in \[0, '),
])
def test_incomplete_multi_host_flags_are_a_clear_error(flags, match):
  with pytest.raises(ValueError, match=match):
    sharding_lib.distributed_request({}, **flags)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(workdir: pathlib.Path, teacher: str, timeout: float) -> list[str]:
  """Runs main.py as processes 0 and 1; their logs. Both are killed if either fails or stalls."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  address = f'127.0.0.1:{free_port()}'
  logs = [workdir.parent / f'process_{i}.log' for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as out:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'skd_jax.main', *RUN_FLAGS, f'--workdir={workdir}',
           f'--config.teacher.checkpoint={teacher}', f'--coordinator_address={address}',
           '--num_processes=2', f'--process_id={i}'],
          cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    # A process that dies leaves the other waiting in a collective: stop at the first failure.
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [log.read_text() for log in logs]
  codes = [p.returncode for p in procs]
  assert codes == [0, 0], f'exit codes {codes} (negative: killed here or aborted):\n' + '\n'.join(
      f'--- process {i}:\n{text[-3000:]}' for i, text in enumerate(texts))
  return texts


REFERENCE = textwrap.dedent('''
    import functools, pathlib, pickle, sys
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    from test_train import load_test_config
    from skd_jax import checkpoint as ckpt_lib, sharding as sharding_lib, train
    workdir, teacher_path, out_path, num_steps = sys.argv[1:4] + [int(sys.argv[4])]
    assert jax.process_count() == 1 and jax.device_count() == 8, jax.devices()
    config = load_test_config()
    config.teacher.checkpoint = teacher_path
    config.optim.num_steps = num_steps
    config.optim.lr = 1e-3
    data_dir = f'{workdir}/data/tfds'   # what the two processes prepared
    config.data.manual_dir, config.data.tfds_data_dir = f'{workdir}/data/manual', data_dir

    mesh = sharding_lib.make_mesh()
    repl = sharding_lib.replicated(mesh)
    teacher, teacher_vars = train.load_teacher(config)
    ctx = train.make_step_context(config, teacher)
    make_state = functools.partial(train.create_train_state, ctx, (4, 64, 64, 3))
    state = jax.jit(make_state, out_shardings=repl)(config.seed)
    step = train.jit_train_step(ctx, mesh)
    teacher_vars = jax.device_put(teacher_vars, repl)
    # The global batch of the 2-process run: process 0's 4 examples, then process 1's.
    streams = [train.train_iterator(config, data_dir, 0, 4, process_index=p, process_count=2)
               for p in range(2)]
    for _ in range(num_steps):
      local = [next(s) for s in streams]
      batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
      state, _ = step(state, sharding_lib.global_batch(batch, mesh), teacher_vars)

    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x)
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    manager = ckpt_lib.open_manager(f'{workdir}/checkpoints', create=False)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            jax.eval_shape(make_state, config.seed))
    written, _ = ckpt_lib.restore_train_state(manager, num_steps, abstract)

    # One process evaluates the checkpoint the two processes wrote, over the whole split.
    evaluation = train.evaluate_checkpoint(config, pathlib.Path(workdir),
                                           checkpoint=f'{workdir}/checkpoints/{num_steps}')
    labelled = 0
    with train.eval_iterator(config, data_dir, 8) as batches:
      for b in batches:
        labelled += int(np.sum((b['label'] != 255) & b['mask'][:, None, None]))
    with open(out_path, 'wb') as f:
      pickle.dump({'reference': flat(state), 'written': flat(written),
                   'confusion': np.asarray(evaluation['confusion']), 'labelled': labelled,
                   'num_images': evaluation['num_images']}, f)
''')


def test_two_processes_train_and_evaluate_like_one(tmp_path, teacher_export):
  workdir = tmp_path / 'run'
  texts = run_two_processes(workdir, teacher_export, timeout=600)
  assert 'JAX process 1 of 2' in texts[1] and 'JAX process 0 of 2' in texts[0]
  assert 'Writing the synthetic Cityscapes stand-in' in texts[0]
  assert 'Writing the synthetic Cityscapes stand-in' not in texts[1]   # it waited for process 0
  # Only process 0 writes TensorBoard events and result.json; both wrote the one checkpoint.
  assert len(list((workdir / 'logs').glob('events.out.tfevents.*'))) == 1
  result = json.loads((workdir / 'result.json').read_text())
  assert result['step'] == NUM_STEPS

  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', REFERENCE, str(workdir), teacher_export,
                        str(tmp_path / 'reference.pkl'), str(NUM_STEPS)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  with open(tmp_path / 'reference.pkl', 'rb') as f:
    reference = pickle.load(f)
  worst = assert_states_match(reference['reference'], reference['written'])
  print('worst relative difference, 2 processes vs 1:', worst)
  # The 2-process evaluation counted every labelled pixel of every image once, as one process.
  confusion = np.asarray(result['eval']['confusion'])
  np.testing.assert_array_equal(confusion, reference['confusion'])
  assert confusion.sum() == reference['labelled'] > 0 and reference['num_images'] == 4
