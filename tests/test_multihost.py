"""Multi-host: two processes on loopback train and evaluate exactly like one process.

`python -m skd_jax.main` runs as 2 processes of 4 simulated CPU devices each, joined by
`jax.distributed` (gloo collectives) through the --coordinator_address flags: process 0 prepares
the synthetic data while process 1 waits, each reads its own rows of every global batch, both
write the checkpoints, only process 0 writes TensorBoard logs. Then a single process with 8
devices reads the same config's batches (equal to the two processes' rows, bit for bit), takes
one step from each of the 2-process run's states (its initialisation, its checkpoint of step 1)
and compares with the 2-process checkpoint and logged metrics of the next step, and evaluates
that run's final checkpoint: the same confusion matrix.
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from skd_jax import sharding as sharding_lib
from skd_jax import experiment
from test_train import assert_within_cross_config_tolerances, read_scalars
from test_train import teacher_export  # noqa: F401  pylint: disable=unused-import (a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 3
# A checkpoint every step: each step of the 2-process run is compared with one step of a single
# process from that checkpoint (float32 trajectories diverge chaotically over several steps,
# differently on each CPU, so only single steps from identical states compare tightly). The last
# step is not compared: its learning rates are 0 (the reference's lr_poly), so it changes no
# parameter to measure a difference against.
RUN_FLAGS = ('--config=configs/test.py', f'--config.optim.num_steps={NUM_STEPS}',
             '--config.optim.lr=1e-3', '--config.checkpoint.every_steps=1',
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
  # Not a Cloud TPU VM: the metadata check must not be consulted here.
  assert sharding_lib.distributed_request(environ, **flags, tpu_hosts=lambda env: 0) == expected


@pytest.mark.parametrize('mode, environ, tpu_hosts, expected', [
    ('auto', {}, 4, {}),                                  # a plain Cloud TPU VM slice of 4 hosts
    ('auto', {}, 1, None),                                # a single-host TPU VM
    ('auto', {'TPU_WORKER_HOSTNAMES': 'host-0'}, 4, None),   # GKE said one host: no lookup
    ('on', {}, 0, {}),                                    # forced: jax's detection decides
    ('off', {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}, 4, None),
])
def test_distributed_modes_and_cloud_tpu_slices(mode, environ, tpu_hosts, expected):
  asked = []
  def hosts(env):
    asked.append(env)
    return tpu_hosts
  assert sharding_lib.distributed_request(environ, mode=mode, tpu_hosts=hosts) == expected
  assert len(asked) == (mode == 'auto' and not environ)


class _Metadata(http.server.BaseHTTPRequestHandler):
  """A stand-in for the GCE metadata server of a 4-host TPU VM slice."""

  def do_GET(self):  # pylint: disable=invalid-name
    if (self.path == '/computeMetadata/v1/instance/attributes/worker-network-endpoints'
        and self.headers.get('Metadata-Flavor') == 'Google'):
      body = b'w-0:ab:10.0.0.2,w-1:cd:10.0.0.3,w-2:ef:10.0.0.4,w-3:gh:10.0.0.5'
      self.send_response(200)
    else:
      body = b'not found'
      self.send_response(404)
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


def test_cloud_tpu_hosts_reads_the_slice_from_pci_and_metadata(tmp_path):
  def pci_device(name, vendor):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'vendor').write_text(vendor + '\n')

  pci_device('0000:00:04.0', '0x8086')
  server = http.server.HTTPServer(('127.0.0.1', 0), _Metadata)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    environ = {'GCE_METADATA_IP': f'127.0.0.1:{server.server_port}'}
    # No Google PCI device: not a TPU VM, and no request is made.
    assert sharding_lib.cloud_tpu_hosts(environ, pci_root=str(tmp_path)) == 0
    pci_device('0000:00:05.0', '0x1ae0')   # a TPU chip (Google's PCI vendor id)
    assert sharding_lib.cloud_tpu_hosts(environ, pci_root=str(tmp_path)) == 4
    assert sharding_lib.cloud_tpu_hosts(dict(environ, TPU_SKIP_MDS_QUERY='1'),
                                        pci_root=str(tmp_path)) == 0
  finally:
    server.shutdown()
    server.server_close()
  # A Google machine without a metadata server to answer (here: nothing listens any more).
  assert sharding_lib.cloud_tpu_hosts(environ, pci_root=str(tmp_path)) == 0


@pytest.mark.parametrize('flags, match', [
    ({'coordinator_address': 'h:1'}, r'missing --num_processes, --process_id'),
    ({'coordinator_address': 'h', 'num_processes': 2, 'process_id': 0}, r'needs a port: HOST:PORT'),
    ({'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2}, r'must be in \[0, '),
    ({'coordinator_address': 'h:1', 'mode': 'off'}, r'--distributed=off contradicts'),
    ({'mode': 'yes'}, r"--distributed='yes': expected one of auto, on, off"),
])
def test_incomplete_multi_host_flags_are_a_clear_error(flags, match):
  with pytest.raises(ValueError, match=match):
    sharding_lib.distributed_request({}, **flags)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(program: str, args: list[str], logs_dir: pathlib.Path, timeout: float
                      ) -> list[str]:
  """Runs `python -m program args` as processes 0 and 1 of 4 CPU devices each; their logs.

  Both are killed if either fails or stalls.
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  address = f'127.0.0.1:{free_port()}'
  logs = [logs_dir / f'{program}_process_{i}.log' for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as out:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', program, *args, f'--coordinator_address={address}',
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
    import functools, json, pathlib, sys
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    from test_train import load_test_config, one_step_errors
    from skd_jax import checkpoint as ckpt_lib, experiment, sharding as sharding_lib, train
    workdir, teacher_path, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert jax.process_count() == 1 and jax.device_count() == 8, jax.devices()
    config = load_test_config()
    config.teacher.checkpoint = teacher_path
    config.optim.num_steps = num_steps
    config.optim.lr = 1e-3
    data_dir = f'{workdir}/data/tfds'   # what the two processes prepared
    config.data.manual_dir, config.data.tfds_data_dir = f'{workdir}/data/manual', data_dir

    mesh = sharding_lib.make_mesh()
    repl = sharding_lib.replicated(mesh)
    teacher, teacher_vars = experiment.load_teacher(config)
    teacher_vars = jax.device_put(teacher_vars, repl)
    ctx = train.make_step_context(config, teacher)
    make_state = functools.partial(train.create_train_state, ctx, (8, 64, 64, 3))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            jax.eval_shape(make_state, config.seed))
    step = train.jit_train_step(ctx, mesh)
    manager = ckpt_lib.open_manager(f'{workdir}/checkpoints', read_only=True)

    out = {'batches_equal': [], 'errors': [], 'metrics': []}
    state = jax.jit(make_state, out_shardings=repl)(config.seed)
    for t in range(num_steps - 1):
      # The global batch of step t as one process of 8 devices reads it, and as the two
      # processes of the run each read their rows of it: the same, bit for bit.
      with experiment.train_iterator(config, data_dir, t, mesh) as one:
        batch = next(one)
      rows = []
      for p in range(2):
        with experiment.train_iterator(config, data_dir, t, process_index=p, process_count=2) as it:
          rows.append(next(it))
      out['batches_equal'].append(all(
          np.array_equal(batch[k], np.concatenate([r[k] for r in rows])) for k in batch))
      # One step from the state the 2-process run had before step t (its checkpoint, or the
      # same initialisation), on this process's batch: the 2-process checkpoint of step t + 1
      # up to float32 noise.
      if t:
        state, _ = ckpt_lib.restore_train_state(manager, t, abstract)
      start = jax.device_get(state)   # the step donates it
      state, metrics = step(state, sharding_lib.global_batch(batch, mesh), teacher_vars)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      written, _ = ckpt_lib.restore_train_state(manager, t + 1, abstract)
      errors = one_step_errors(start, jax.device_get(state), jax.device_get(written), metrics,
                               metrics)
      errors.pop('metrics')   # compared with the 2-process run's logged metrics by the test
      out['errors'].append(errors)
      out['metrics'].append(metrics)

    # One process evaluates the checkpoint the two processes wrote, over the whole split.
    evaluation = experiment.evaluate_checkpoint(config, pathlib.Path(workdir),
                                           checkpoint=f'{workdir}/checkpoints/{num_steps}')
    labelled = 0
    with experiment.eval_iterator(config, data_dir, 8) as batches:
      for b in batches:
        labelled += int(np.sum((b['label'] != 255) & b['mask'][:, None, None]))
    out.update(confusion=np.asarray(evaluation['confusion']).tolist(), labelled=labelled,
               num_images=evaluation['num_images'])
    print('RESULT', json.dumps(out))
''')

# One step from the same state on the same batch, 2 processes of 4 devices against 1 of 8: the
# float32 rounding of sums taken in another order (over the batch, and gloo's all-reduce). The
# errors are tests/test_train.py's `one_step_errors` (a field's difference as a fraction of the
# step's change of it) and their tolerances its CROSS_CONFIG_TOLERANCES (10x the worst of 18
# measured 8-device-vs-1 comparisons). Measured here (Intel Xeon, 2 shared cores), steps 1 and 2:
# student parameters 6.4e-6 and 3.0e-6 of the step's change, BatchNorm statistics 1.8e-7 and
# 1.1e-8, momenta 2.1e-6 and 2.2e-7; discriminator parameters 7.2e-5 and 8.3e-5 (their last
# float32 bit), its statistics and momenta below 5e-7; metrics 2.2e-6 and 8.7e-7 relative: all
# at least 24 times below the tolerances. One step on another batch, or on half the batch twice
# (BatchNorm statistics of one process's rows), differs from it by 4e-2 or more of |a| + 1 in
# every part (measured on 8 devices), i.e. by a good part of the step itself.


def test_two_processes_train_and_evaluate_like_one(tmp_path, teacher_export):
  workdir = tmp_path / 'run'
  texts = run_two_processes('skd_jax.main', [*RUN_FLAGS, f'--workdir={workdir}',
                                             f'--config.teacher.checkpoint={teacher_export}'],
                            tmp_path, timeout=600)
  assert 'JAX process 1 of 2' in texts[1] and 'JAX process 0 of 2' in texts[0]
  assert 'Writing the synthetic Cityscapes stand-in' in texts[0]
  assert 'Writing the synthetic Cityscapes stand-in' not in texts[1]   # it waited for process 0
  # Only process 0 writes TensorBoard events and result.json; both wrote the checkpoints.
  assert len(list((workdir / 'logs').glob('events.out.tfevents.*'))) == 1
  result = json.loads((workdir / 'result.json').read_text())
  assert result['step'] == NUM_STEPS

  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, '-c', REFERENCE, str(workdir), teacher_export,
                        str(NUM_STEPS)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  reference = json.loads(out.stdout.split('RESULT ', 1)[1])
  assert reference['batches_equal'] == [True] * (NUM_STEPS - 1)
  # The 2-process run's metrics of each step, as process 0 logged them (one step a log).
  logged = read_scalars(workdir / 'logs')
  for t, (errors, metrics) in enumerate(zip(reference['errors'], reference['metrics'])):
    got = {k: dict(logged[f'train/{k}'])[t + 1] for k in metrics}
    errors['metrics'] = max(abs(got[k] - v) / abs(v) for k, v in metrics.items() if v)
    print(f'step {t + 1}, 2 processes vs 1:', errors)
    assert_within_cross_config_tolerances(errors)
  # The 2-process evaluation counted every labelled pixel of every image once, as one process.
  confusion = np.asarray(result['eval']['confusion'])
  np.testing.assert_array_equal(confusion, reference['confusion'])
  assert confusion.sum() == reference['labelled'] > 0 and reference['num_images'] == 4

  # The standalone evaluation on two processes: the same matrix, every image exported once.
  export_dir = tmp_path / 'export'
  texts = run_two_processes('skd_jax.evaluate', [
      '--config=configs/test.py', f'--workdir={workdir}', f'--export_dir={export_dir}',
      f'--config.teacher.checkpoint={teacher_export}'], tmp_path, timeout=300)
  written = json.loads((workdir / 'eval_student_val.json').read_text())
  np.testing.assert_array_equal(written['confusion_matrix'], reference['confusion'])
  assert len(list(export_dir.glob('*_leftImg8bit.png'))) == reference['num_images']
  assert f'wrote {reference["num_images"]} label-id PNGs' in texts[0]
  assert 'mIoU' in texts[0] and 'mIoU' not in texts[1]   # one table, from process 0


@pytest.mark.parametrize('program', ['skd_jax.main', 'skd_jax.evaluate'])
@pytest.mark.parametrize('flags, message', [
    (['--distributed=on'], 'jax.distributed found no cluster to join'),
    (['--distributed=off', '--coordinator_address=h:1'], '--distributed=off contradicts'),
    (['--coordinator_address=h:1', '--num_processes=2'], 'missing --process_id'),
])
def test_multi_host_flag_errors_end_either_program_with_one_line(program, flags, message, tmp_path):
  # A plain machine: no launcher variables that jax's cluster detection would pick up.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'PMI_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_'))
         and k != 'JAX_COORDINATOR_ADDRESS'}
  out = subprocess.run([sys.executable, '-m', program, '--config=configs/test.py',
                        f'--workdir={tmp_path}', *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(env, JAX_PLATFORMS='cpu'))
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith('error: ') and message in out.stderr
  assert 'Traceback' not in out.stderr
  assert not any(tmp_path.iterdir())   # it stopped before doing anything
