"""Checkpoints through orbax: the training state of a run, and standalone model variables.

Layouts on disk:
  - a training workdir: ``WORKDIR/checkpoints/<step>/{state,meta}`` (periodic, the last N kept) and
    ``WORKDIR/best/<step>/{state,meta}`` (the best-mIoU one), both written by `CheckpointManager`.
    ``state`` is the `TrainState` pytree (its fields as a dict), ``meta`` JSON (the step, the
    model's name, class count and overrides, the best mIoU so far, the teacher's mIoU).
  - an export, e.g. a converted PyTorch model: ``DIR/variables`` (``{'params', 'batch_stats'}``) and
    ``DIR/skd_jax.json`` (the model's name, class count and overrides).
`load_variables` reads a model's variables from any of them, so ``config.teacher.checkpoint`` can
name a teacher run's workdir, one of its checkpoint folders, or an export.

What a kill, a crash or a damaged file can do to a workdir, and what it cannot:
  - a step folder appears only once complete: orbax writes into a temporary folder and renames it
    (on GCS it writes a commit file last); a kill leaves at most an unfinished temporary folder,
    which the next training run's managers remove when they open;
  - no step is ever written twice (`save_train_state`): a rerun after a kill replays the steps
    since the last periodic checkpoint and keeps what was written before the kill (the best
    checkpoint of a step whose periodic one never committed), saying so;
  - before restoring, `restore_latest` checks that the checkpoint was written for the configured
    network and training state (`check_fits`); one that cannot be read is reported, moved to
    ``<folder>.unreadable/`` for inspection and the previous one used;
  - the only deletion is the rotation to the newest `keep` steps, done here once the newer step
    has committed (`wait_until_finished` returned without an error), not by orbax in its
    background thread.

No checkpoint is ever written with a non-finite value: `save_variables` and `CheckpointManager`
saves through `save_train_state` check first and raise `FloatingPointError`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from skd_jax import sharding as sharding_lib
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


def open_manager(directory: str | os.PathLike, *, create: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A `CheckpointManager` over the ``state`` and ``meta`` items of a training run.

  Each manager gets its own barrier keys (named after its folder): a run's two managers save the
  same step at once at the end of a multi-process run, and shared keys collide there. A training
  run's managers (not `read_only`) remove the unfinished temporary folders of a killed save when
  they open. Nothing is rotated away by orbax (`save_train_state` and `finish_saves` do that, only
  once a newer step has committed).
  """
  directory = as_path(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=create and not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=f'skd_jax_{directory.name}'))
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Any,
                     meta: Mapping[str, Any], *, keep: int | None = None) -> bool:
  """Saves (asynchronously) after checking every value of `state` is finite; False if skipped.

  A step the manager already holds (or a later one) is kept as it is and not written again, with
  a warning: a rerun after a kill replays the same steps, and the checkpoint written before the
  kill (e.g. the best one of a step whose periodic checkpoint never committed) is the same state.
  Rewriting it would need deleting it first, which a second kill could turn into a loss.

  `keep`: after the previous save has committed, the oldest steps beyond the newest `keep` are
  removed (None: none).
  """
  check_finite(state, f'the training state at step {step}')
  existing = [s for s in manager.all_steps() if s >= step]
  if existing:
    logging.warning('%s already holds step %d (written before this run was interrupted): kept '
                    'as it is, not written again', manager.directory, max(existing))
    return False
  finish_saves(manager, keep=keep, close=False)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)
  return True


def finish_saves(manager: ocp.CheckpointManager, *, keep: int | None = None,
                 close: bool = True) -> None:
  """Waits for the pending save (raising its error, if any), then rotates to the newest `keep`."""
  manager.wait_until_finished()
  if keep is not None:
    for step in sorted(manager.all_steps())[:-keep]:
      manager.delete(step)
  if close:
    manager.close()


def restore_train_state(manager: ocp.CheckpointManager, step: int,
                        abstract_state: Any) -> tuple[Any, dict[str, Any]]:
  """Restores `step` into the structure, dtypes and shardings of `abstract_state`."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def _json_normal(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists, keys strings)."""
  return json.loads(json.dumps(value))


def _leaf_shapes(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """{path of names: (shape, dtype)} of the array leaves of a pytree or of orbax's metadata."""
  def name(key) -> str:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {tuple(name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_fits(step_dir, saved_state: Any, meta: Mapping[str, Any], abstract_state: Any,
               expected_model: Mapping[str, Any]) -> None:
  """Raises ValueError unless the checkpoint in `step_dir` was written for this network and state.

  `meta` and `saved_state` (the tree of array metadata, `saved_tree`) are the checkpoint's;
  `expected_model` holds the ``arch``, ``num_classes`` and ``overrides`` the config asks for,
  compared first; then every array of the saved state must have the place, shape and dtype it
  has in `abstract_state`. Run before restoring, so that a workdir of another experiment is an
  error naming both, not orbax's advice to restore non-strictly.
  """
  recorded = {k: _json_normal(meta.get(k)) for k in expected_model}
  wanted = {k: _json_normal(v) for k, v in expected_model.items()}
  if recorded != wanted:
    raise ValueError(
        f'{step_dir} was written for {_describe_model(recorded)}, but the config asks for '
        f'{_describe_model(wanted)}: resume with the config this workdir was trained with, or '
        'give a new --workdir.')
  saved = _leaf_shapes(saved_state)
  expected = _leaf_shapes(abstract_state)
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  misshapen = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  if missing or unexpected or misshapen:
    show = lambda keys: ', '.join('/'.join(k) for k in keys[:3]) + (
        f' and {len(keys) - 3} more' if len(keys) > 3 else '')
    parts = [f'{what} {show(keys)}' for what, keys in (
        ('missing', missing), ('unexpected', unexpected), ('misshapen', misshapen)) if keys]
    raise ValueError(
        f'{step_dir} does not fit the configured training state ({"; ".join(parts)}): was it '
        'written with other loss weights or discriminator settings? Resume with the config this '
        'workdir was trained with, or give a new --workdir.')


def _describe_model(model: Mapping[str, Any]) -> str:
  overrides = model.get('overrides') or {}
  return (f'{model.get("arch")}' + (f' {overrides}' if overrides else '')
          + f' with {model.get("num_classes")} classes')


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a restore can fail on one host's files only)."""
  return bool(sharding_lib.gather_to_all({'ok': np.array([ok])})['ok'].all())


def set_aside(manager: ocp.CheckpointManager, step: int):
  """Moves step `step` out of `manager` to ``<its folder>.unreadable/<step>``; returns where."""
  source = manager.directory / str(step)
  target_root = manager.directory.parent / f'{manager.directory.name}.unreadable'
  target = target_root / str(step)
  suffix = 1
  while target.exists():
    target, suffix = target_root / f'{step}-{suffix}', suffix + 1
  sharding_lib.sync(f'set_aside_{step}_start')
  if jax.process_index() == 0:
    target_root.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  sharding_lib.sync(f'set_aside_{step}_done')
  manager.reload()
  return target


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   expected_model: Mapping[str, Any]) -> tuple[Any, dict[str, Any]] | None:
  """The newest readable checkpoint of `manager` as (state, meta); None when it has none.

  Each is first checked against the configuration (`check_fits`: a mismatch is an error, not
  corruption). One that cannot be read is reported, moved aside for inspection (`set_aside`) and
  the previous one tried; when none can be read, nothing is moved and the error says so.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  unreadable = []
  for step in steps:
    step_dir = manager.directory / str(step)
    problem = None
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      saved_state = saved_tree(step_dir / 'state')
    except Exception as e:  # pylint: disable=broad-except  (any way a file can be damaged)
      problem = e
    if problem is None:
      check_fits(step_dir, saved_state, meta, abstract_state, expected_model)
      try:
        result = restore_train_state(manager, step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        problem = e
    if _all_processes(problem is None):
      if unreadable:
        moved = [set_aside(manager, s) for s, _ in unreadable]
        for (s, error), where in zip(unreadable, moved):
          logging.warning('checkpoint %s/%d cannot be read (%s): moved to %s for inspection; '
                          'resuming from step %d instead', manager.directory, s,
                          one_line(error), where, step)
      return result
    unreadable.append((step, problem or RuntimeError('unreadable on another process')))
  if unreadable:
    step, error = unreadable[0]
    raise ValueError(
        f'no checkpoint in {manager.directory} can be read (step {step}: {one_line(error)}): '
        'move them elsewhere to start the run afresh, or give a new --workdir.')
  return None


class Preempted(Exception):
  """The run stopped on a preemption notice, after writing a checkpoint of the current step."""
  exit_code = 143   # 128 + SIGTERM: what a scheduler expects of a process it asked to stop


class PreemptionNotice:
  """Whether a run should save and stop at a step: a preemption notice has come.

  On several processes, orbax's `reached_preemption`: jax.distributed's preemption service
  catches the SIGTERM of a spot / preemptible VM and picks one step at which every process
  arrives (`reached` must then be called at every step, by every process). On one process,
  a SIGTERM handler installed for the `with` block (the default handler would kill the process
  without a checkpoint).
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._signalled = False
    self._previous_handler = None
    self.reason = 'preempted'

  def __enter__(self) -> PreemptionNotice:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._signalled = True
    self.reason = 'SIGTERM received'

  def reached(self, step: int) -> bool:
    if self._manager.reached_preemption(step):
      self.reason = 'preemption notice (all processes)'
      return True
    return self._signalled


def one_line(error: BaseException, limit: int = 300) -> str:
  """An exception's message on one line, shortened to `limit` characters."""
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + '...'


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


def saved_tree(item_dir) -> Any:
  """The pytree of array metadata (shape, dtype) of a saved item, read without its arrays."""
  return ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree


def _host_target(item_dir) -> Any:
  """Restore target: every array of a saved pytree on this process's first device.

  Whatever devices and processes wrote it: without a target, orbax rebuilds the writer's
  shardings, which fail on another topology ("Topology mismatch") or span devices this process
  cannot read (another host's).
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  tree = saved_tree(item_dir)
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
  manager = open_manager(path.parent, read_only=True)
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
    'Preempted', 'PreemptionNotice', 'check_finite', 'check_fits', 'finish_saves',
    'load_variables', 'non_finite_paths', 'one_line', 'open_manager', 'resolve_checkpoint',
    'restore_latest', 'restore_train_state', 'save_train_state', 'save_variables', 'saved_tree',
    'set_aside',
]
