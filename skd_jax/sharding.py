"""The device mesh, shardings, and host-local batches turned into global arrays.

Data parallel over every device: one mesh axis ``'data'``, the batch sharded over it, parameters
and optimiser state replicated. Under plain `jax.jit` with these shardings, BatchNorm statistics
are over the global batch (the synchronised BN of the reference runs) without any axis name. The
axis type is `Auto` on purpose: the confusion matrix is a `bincount` over the sharded batch, which
`Explicit` axes would reject without an explicit output sharding.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ``('data',)`` mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ('data',), axis_types=(AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, what: str) -> int:
  """The per-process batch size; a clear error if the global one does not divide the mesh."""
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f'{what} = {global_batch_size} does not divide over the {num_devices} devices; '
        f'use a multiple of {num_devices} (e.g. {max(1, global_batch_size // num_devices or 1) * num_devices}).')
  return global_batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Host-local arrays [B_local, ...] -> global arrays [B_global, ...] sharded over ``'data'``."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
