"""What the two programs, `skd_jax.main` (training) and `skd_jax.evaluate`, share on the command line.

The multi-host flags, starting `jax.distributed` before anything touches a device, quieter logs
from the storage libraries, and how a run ends on an error: a missing dataset or checkpoint with
its one-line message, and a failure in one of several processes at once rather than after the
others time out.
"""

from __future__ import annotations

import logging as logging_std
import os
from typing import Callable

from absl import flags, logging
import jax

from skd_jax import sharding


def define_multihost_flags() -> None:
  """--distributed and the explicit --coordinator_address/--num_processes/--process_id."""
  flags.DEFINE_enum('distributed', 'auto', list(sharding.DISTRIBUTED_MODES),
                    'Start jax.distributed: auto (where the launcher shows several processes: a '
                    'Cloud TPU VM slice, Slurm, Open MPI, ...), on (always, with jax\'s own '
                    'cluster detection) or off.')
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-host without a detected launcher: HOST:PORT of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: the number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index, 0 .. N-1.')


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax and tfds (their warnings and errors still show)."""

  def filter(self, record):
    return record.levelno > logging_std.INFO or not any(
        f'{os.sep}{lib}{os.sep}' in record.pathname
        for lib in ('orbax', 'tensorflow_datasets', 'etils'))


def run(program: Callable[[], None]) -> None:
  """Runs ``program`` in this process of a (possibly multi-host) launch; for `absl.app` mains."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
  fl = flags.FLAGS
  try:
    sharding.initialize_distributed(mode=fl.distributed, coordinator_address=fl.coordinator_address,
                                    num_processes=fl.num_processes, process_id=fl.process_id)
  except ValueError as e:   # contradictory or incomplete multi-host flags
    raise SystemExit(f'error: {e}') from None
  logging.info('JAX process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    program()
  except FileNotFoundError as e:
    # A missing dataset or checkpoint: the message names it and says what to do; a traceback
    # would only bury it.
    if not jax.distributed.is_initialized():
      raise SystemExit(f'error: {e}') from None
    logging.error('%s', e)
    _exit_now()
  except Exception:  # pylint: disable=broad-except
    if not jax.distributed.is_initialized():
      raise
    logging.exception('process %d of %d failed', jax.process_index(), jax.process_count())
    _exit_now()


def _exit_now() -> None:
  # A normal exit would wait (5 minutes by default) at jax.distributed's shutdown barrier for
  # processes that are themselves blocked waiting for this one: stop now, with the error, and let
  # the launcher and the coordination service end the others.
  logging.flush()
  os._exit(1)  # pylint: disable=protected-access
