"""Checkpoints through orbax: the training state of a run, and standalone model variables.

Layouts on disk:
  - a training workdir: ``WORKDIR/checkpoints/<step>/{state,meta}`` (periodic, the last N kept) and
    ``WORKDIR/best/<step>/{state,meta}`` (the best-mIoU one), both written by `CheckpointManager`.
    ``state`` is the `TrainState` pytree (its fields as a dict), ``meta`` JSON (the step, the
    input pipeline's position, the model's name and overrides, the best mIoU so far).
  - an export, e.g. a converted PyTorch model: ``DIR/variables`` (``{'params', 'batch_stats'}``) and
    ``DIR/skd_jax.json`` (the model's name, class count and overrides).
`load_variables` reads a model's variables from any of them, so ``config.teacher.checkpoint`` can
name a teacher run's workdir, one of its checkpoint folders, or an export.

No checkpoint is ever written with a non-finite value: `save_variables` and `CheckpointManager`
saves through `save_train_state` check first and raise `FloatingPointError`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from skd_jax.paths import as_path

EXPORT_METADATA = 'skd_jax.json'
ITEMS = ('state', 'meta')


def non_finite_paths(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` that hold a NaN or an infinity."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  floats = [(p, x) for p, x in leaves
            if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)]
  if not floats:
    return []
  finite = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in floats])
  return [jax.tree_util.keystr(p) for (p, _), ok in zip(floats, finite) if not ok]


def check_finite(tree: Any, what: str) -> None:
  bad = non_finite_paths(tree)
  if bad:
    raise FloatingPointError(
        f'refusing to write a checkpoint of {what}: non-finite values in {", ".join(bad[:5])}'
        + (f' and {len(bad) - 5} more' if len(bad) > 5 else ''))


def save_variables(directory: str | os.PathLike, variables: Mapping[str, Any], *,
                   metadata: Mapping[str, Any]) -> None:
  """Writes model variables (``{'params', 'batch_stats'}``) and JSON metadata as an export."""
  check_finite(variables, 'model variables')
  directory = as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / 'variables', dict(variables), force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (directory / EXPORT_METADATA).write_text(json.dumps(dict(metadata), indent=2))


def open_manager(directory: str | os.PathLike, *, max_to_keep: int | None = None,
                 create: bool = True) -> ocp.CheckpointManager:
  """A `CheckpointManager` over the ``state`` and ``meta`` items of a training run."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(as_path(directory), options=options,
                               item_names=ITEMS)


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Any,
                     meta: Mapping[str, Any]) -> None:
  """Saves (asynchronously) after checking every value of `state` is finite."""
  check_finite(state, f'the training state at step {step}')
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)


def restore_train_state(manager: ocp.CheckpointManager, step: int,
                        abstract_state: Any) -> tuple[Any, dict[str, Any]]:
  """Restores `step` into the structure, dtypes and shardings of `abstract_state`."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def _is_step_dir(path) -> bool:
  return (path / 'state').is_dir() and (path / 'meta').is_dir()


def _latest_step_dir(manager_dir):
  steps = [int(p.name) for p in manager_dir.iterdir() if p.name.isdigit() and _is_step_dir(p)]
  return manager_dir / str(max(steps)) if steps else None


def resolve_checkpoint(path: str | os.PathLike):
  """The export or step folder that `path` designates (see the module docstring).

  A training workdir resolves to its best-mIoU checkpoint if it has one, else its latest.
  """
  path = as_path(path)
  if not path.exists():
    raise FileNotFoundError(
        f'checkpoint {str(path)!r} does not exist. Give a training workdir of this program, one of '
        f'its checkpoint folders, a folder written by `python -m skd_jax.convert`, or a .pth file.')
  if (path / EXPORT_METADATA).is_file() or _is_step_dir(path):
    return path
  for manager_dir in (path / 'best', path / 'checkpoints', path):
    if manager_dir.is_dir():
      latest = _latest_step_dir(manager_dir)
      if latest is not None:
        return latest
  raise FileNotFoundError(
      f'no checkpoint found in {str(path)!r}: expected {EXPORT_METADATA} (an export), state/ and '
      f'meta/ (a step folder), or numbered step folders under best/ or checkpoints/ (a workdir).')


def _host_target(item_dir) -> Any:
  """Restore target: every array of a saved pytree on this process's first device.

  Whatever devices and processes wrote it: without a target, orbax rebuilds the writer's
  shardings, which fail on another topology ("Topology mismatch") or span devices this process
  cannot read (another host's).
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  tree = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Model variables ``{'params', 'batch_stats'}`` and metadata from a run or an export.

  From a training checkpoint these are the trained network's (the run's student); the rest of
  the training state (discriminator, optimiser states) is read and dropped.
  """
  path = resolve_checkpoint(path)
  if (path / EXPORT_METADATA).is_file():
    variables = ocp.StandardCheckpointer().restore(path / 'variables',
                                                   _host_target(path / 'variables'))
    metadata = json.loads((path / EXPORT_METADATA).read_text())
    return dict(variables), metadata
  manager = open_manager(path.parent, create=False)
  try:
    restored = manager.restore(int(path.name), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_host_target(path / 'state')),
        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = restored.state
  variables = {'params': state['student_params'], 'batch_stats': state['student_batch_stats']}
  return jax.tree.map(np.asarray, variables), dict(restored.meta)


__all__ = [
    'check_finite', 'load_variables', 'non_finite_paths', 'open_manager', 'resolve_checkpoint',
    'restore_train_state', 'save_train_state', 'save_variables',
]
