"""The device mesh, shardings, host-local batches turned into global arrays, and multi-host setup.

The mesh has two axes, ``('data', 'model')``. The batch is sharded over ``'data'``; parameters and
optimiser state are replicated, except where model parallelism is asked for (`config.mesh.model`
> 1): then the kernels of the teacher (and, with `config.mesh_shard_student`, of the student) are
split over ``'model'`` along their largest dimension (`model_parallel`). With the default
``{'data': -1, 'model': 1}`` this is plain data parallelism over every device. Under plain `jax.jit`
with these shardings, BatchNorm statistics are over the global batch (the synchronised BN of the
reference runs) without any axis name. The axis types are `Auto` on purpose: the confusion matrix
is a `bincount` over the sharded batch, which `Explicit` axes would reject without an explicit
output sharding, and XLA chooses how to run a convolution whose kernel is split.

Multi-host: `initialize_distributed` starts `jax.distributed` where the launch has several
processes (a Cloud TPU VM slice, a TPU pod on GKE, a Slurm or Open MPI job with several tasks, or
explicit coordinator flags) and does nothing on one host. Each process then feeds its own rows of every
batch (`global_batch`), and `check_batch_size` says how many.
"""

from __future__ import annotations

import glob
import os
import pathlib
from typing import Any, Callable, Mapping
import urllib.request

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ('data', 'model')


# ---------------------------------------------------------------------------------------------
# Multi-host setup.


def _int_env(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, '1') or '1')
  except ValueError:
    return 1


DISTRIBUTED_MODES = ('auto', 'on', 'off')
_GOOGLE_PCI_VENDOR = '0x1ae0'


def cloud_tpu_hosts(environ: Mapping[str, str], pci_root: str = '/sys/bus/pci/devices') -> int:
  """The number of hosts of the Cloud TPU VM slice this machine belongs to; 0 elsewhere.

  A TPU VM carries Google PCI devices (vendor 0x1ae0), and its metadata server lists the workers
  of its slice (``worker-network-endpoints``, the list jax's own TPU detection reads). Any other
  machine answers 0 after one directory listing; a Google machine without that list (a GCE VM
  with gVNIC, a TPU VM outside a slice) after one local HTTP request.
  """
  if 'TPU_SKIP_MDS_QUERY' in environ:   # set by jax on a machine without TPU chips
    return 0
  vendors = glob.glob(os.path.join(pci_root, '*', 'vendor'))
  if not any(pathlib.Path(v).read_text().strip() == _GOOGLE_PCI_VENDOR for v in vendors):
    return 0
  host = environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  request = urllib.request.Request(
      f'http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints',
      headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      workers = response.read().decode()
  except OSError:   # no metadata server, or no such attribute (HTTP 404): not a TPU VM slice
    return 0
  return len([w for w in workers.split(',') if w.strip()])


def distributed_request(environ: Mapping[str, str], *, mode: str = 'auto',
                        coordinator_address: str | None = None,
                        num_processes: int | None = None, process_id: int | None = None,
                        tpu_hosts: Callable[[Mapping[str, str]], int] = cloud_tpu_hosts
                        ) -> dict[str, Any] | None:
  """The arguments of `jax.distributed.initialize` this launch needs, or None on one host.

  ``mode`` is the ``--distributed`` flag: 'off' never starts it, 'on' always does with jax's own
  detection of the cluster (for a launcher not recognised below), 'auto' decides as follows.
  Explicit flags (all three) win, and then every local device is used. Otherwise a launch of
  several processes is recognised by the environment its launcher sets, and jax's own
  detection fills in the arguments (``{}``; under Slurm or Open MPI on GPUs it then gives each
  process one GPU):
    * a TPU pod slice on GKE: ``TPU_PROCESS_ADDRESSES`` or ``TPU_WORKER_HOSTNAMES`` listing more
      than one host, or ``MEGASCALE_NUM_SLICES`` > 1 (multislice);
    * Slurm: ``SLURM_JOB_ID`` with more than one task in the step (``SLURM_STEP_NUM_TASKS``,
      else ``SLURM_NTASKS``);
    * Open MPI: ``OMPI_COMM_WORLD_SIZE`` > 1;
    * ``JAX_COORDINATOR_ADDRESS`` set;
    * a Cloud TPU VM slice of more than one host (`cloud_tpu_hosts`, which ``tpu_hosts`` stands
      in for in tests): what ``gcloud compute tpus tpu-vm ssh --worker=all`` starts, with no
      environment to tell.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f'--distributed={mode!r}: expected one of {", ".join(DISTRIBUTED_MODES)}.')
  flags = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  given = {k: v for k, v in flags.items() if v is not None}
  if given:
    if mode == 'off':
      raise ValueError(f'--distributed=off contradicts --{next(iter(given))}: drop one of them.')
    if len(given) < 3:
      missing = ', '.join(f'--{k}' for k, v in flags.items() if v is None)
      raise ValueError(f'multi-host flags need all three of --coordinator_address, '
                       f'--num_processes and --process_id; missing {missing}.')
    if ':' not in coordinator_address:
      raise ValueError(f'--coordinator_address={coordinator_address!r} needs a port: HOST:PORT '
                       '(the address of process 0, reachable from every process).')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes}).')
    # Explicit flags mean no guessing: under srun, jax's detection would otherwise also limit
    # each process to one local GPU (the one-task-per-GPU layout), hiding the others.
    return dict(given, cluster_detection_method='deactivate') if num_processes > 1 else None
  if mode != 'auto':
    return {} if mode == 'on' else None
  gke_tpu_hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES') or ''
  slurm_tasks = _int_env(environ, 'SLURM_STEP_NUM_TASKS' if 'SLURM_STEP_NUM_TASKS' in environ
                         else 'SLURM_NTASKS')
  if (len([h for h in gke_tpu_hosts.split(',') if h.strip()]) > 1
      or _int_env(environ, 'MEGASCALE_NUM_SLICES') > 1
      or ('SLURM_JOB_ID' in environ and slurm_tasks > 1)
      or _int_env(environ, 'OMPI_COMM_WORLD_SIZE') > 1
      or environ.get('JAX_COORDINATOR_ADDRESS')
      or (not gke_tpu_hosts and tpu_hosts(environ) > 1)):
    return {}
  return None


def initialize_distributed(*, mode: str = 'auto', coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           environ: Mapping[str, str] | None = None) -> bool:
  """Starts `jax.distributed` where the launch is multi-host (see `distributed_request`).

  Must run before anything touches a device. Returns whether it initialised. (On CPU, the
  cross-process collectives are gloo's, jax's default: nothing to configure.)
  """
  request = distributed_request(os.environ if environ is None else environ, mode=mode,
                                coordinator_address=coordinator_address,
                                num_processes=num_processes, process_id=process_id)
  if request is None or jax.distributed.is_initialized():
    return False
  logging.info('Starting jax.distributed with %s', request or 'the launcher\'s settings')
  try:
    jax.distributed.initialize(**request)
  except ValueError as e:
    if request:
      raise
    # jax's cluster detection found nothing to fill in (e.g. --distributed=on on a plain machine).
    raise ValueError(f'jax.distributed found no cluster to join ({e}): pass --coordinator_address, '
                     '--num_processes and --process_id, or --distributed=off on one host.') from e
  return True


def sync(name: str) -> None:
  """A barrier over all processes (no-op on one): nobody continues until all arrive here."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather_to_all(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Host arrays [n, ...] of every process concatenated in process order, on every process."""
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in local.items()}
  return multihost_utils.process_allgather(dict(local), tiled=True)


# ---------------------------------------------------------------------------------------------
# The mesh.


def make_mesh(devices: list[jax.Device] | None = None,
              shape: Mapping[str, int] | None = None) -> jax.sharding.Mesh:
  """A ``('data', 'model')`` mesh over `devices` (default: every device of every process).

  Args:
    devices: the devices, in the order jax lists them (process by process).
    shape: ``{'data': d, 'model': m}`` (`config.mesh`); -1 for one of them fills the rest.
      Default ``{'data': -1, 'model': 1}``: data parallel over every device.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = {'data': -1, 'model': 1} if shape is None else dict(shape)
  if set(shape) != set(AXES):
    raise ValueError(f'config.mesh must have exactly the keys {AXES}, got {sorted(shape)}')
  sizes = _resolve_mesh_shape(shape, len(devices))
  model_size = sizes[1]
  local_count = sum(d.process_index == devices[0].process_index for d in devices)
  if model_size > 1 and local_count % model_size:
    raise ValueError(
        f'config.mesh.model = {model_size} does not divide the {local_count} devices of one '
        f'process: the model axis must stay within a host (each host feeds whole rows of the '
        f'batch). Use a divisor of {local_count}.')
  mesh = jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
  if any(len({d.process_index for d in row}) > 1 for row in mesh.devices):
    raise ValueError(
        f'config.mesh = {dict(shape)}: the device layout puts one row of the model axis on '
        f'several hosts, so no host could feed it alone; use a smaller config.mesh.model.')
  return mesh


def _resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  sizes = [int(shape[a]) for a in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh = {dict(shape)}: sizes must be positive, with at most one -1.')
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise ValueError(f'config.mesh = {dict(shape)} does not divide the {num_devices} devices; '
                       f'make its sizes divide {num_devices}.')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'config.mesh = {dict(shape)} needs {int(np.prod(sizes))} devices, there are '
                     f'{num_devices}; set one size to -1 to use them all.')
  return tuple(sizes)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, what: str) -> int:
  """The per-process batch size; a clear error if the global one does not divide the mesh.

  The batch divides over the ``'data'`` axis (the first); each process feeds the rows of the
  data positions its devices hold.
  """
  data_size = np.shape(mesh.devices)[0]
  if global_batch_size <= 0 or global_batch_size % data_size:
    raise ValueError(
        f'{what} = {global_batch_size} does not divide over the {data_size} devices of the data '
        f'axis; use a multiple of {data_size} (e.g. '
        f'{max(1, global_batch_size // data_size) * data_size}).')
  rows = np.asarray(mesh.devices).reshape(data_size, -1)
  local_rows = sum(row[0].process_index == jax.process_index() for row in rows)
  return global_batch_size // data_size * local_rows


def process_rows(mesh: jax.sharding.Mesh, global_batch_size: int) -> np.ndarray:
  """The rows [B_local] of a global batch that this process's devices hold, in order.

  What `global_batch` expects this process to feed: `jax.make_array_from_process_local_data`
  places the local rows, in order, on the slices its devices address (several blocks when a
  device layout interleaves the hosts).
  """
  indices = batch_sharded(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = set()
  for (rows_slice,) in indices.values():
    rows.update(range(*rows_slice.indices(global_batch_size)))
  return np.array(sorted(rows), np.int64)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Host-local arrays [B_local, ...] -> global arrays [B_global, ...] sharded over ``'data'``."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ---------------------------------------------------------------------------------------------
# Model parallelism.


def model_parallel_spec(shape: tuple[int, ...], model_size: int) -> P:
  """The rule: a kernel (>= 2 dims) is split over ``'model'`` along its largest dimension.

  Ties go to the last such dimension (a convolution's output channels); a largest dimension
  that `model_size` does not divide, and every vector or scalar (biases, BN), stay replicated.
  """
  if model_size == 1 or len(shape) < 2:
    return P()
  dim = max(range(len(shape)), key=lambda i: (shape[i], i))
  if shape[dim] % model_size:
    return P()
  return P(*('model' if i == dim else None for i in range(len(shape))))


def model_parallel(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """A `NamedSharding` per leaf of `tree` (arrays or ShapeDtypeStructs) by `model_parallel_spec`.

  The rule depends only on shapes, so an optimiser state gets the shardings of its parameters.
  """
  model_size = mesh.shape['model']
  return jax.tree.map(lambda x: NamedSharding(mesh, model_parallel_spec(x.shape, model_size)),
                      tree)
