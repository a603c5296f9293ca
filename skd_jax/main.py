r"""Trains a segmentation network, with or without distillation from a frozen teacher.

    python -m skd_jax.main --config=configs/cityscapes.py --workdir=/path/to/run \
        [--config.loss.lambda_pa=10 ...]

A run resumes from the latest checkpoint in its workdir. Configs whose `phases` list several runs
(configs/demo.py) run each in a subfolder and summarise them.

Multi-host: the same command on every host. On a TPU pod slice, under Slurm (`srun`) or Open MPI
(`mpirun`) with several tasks, `jax.distributed` starts by itself; elsewhere give each process

    --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

(HOST0 the address of process 0). The workdir (and the data folders) should be one shared
location: process 0 prepares the dataset while the others wait, all write the checkpoints
together, and only process 0 writes TensorBoard logs and result.json.
"""

from __future__ import annotations

import logging as logging_std
import os

# TensorFlow serves tf.data only; keep it off accelerators and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
import jax  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from skd_jax import sharding  # pylint: disable=g-import-not-at-top
from skd_jax import train  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-host without a detected launcher: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: the number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index, 0 .. N-1.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax and tfds (their warnings and errors still show)."""

  def filter(self, record):
    return record.levelno > logging_std.INFO or not any(
        f'{os.sep}{lib}{os.sep}' in record.pathname
        for lib in ('orbax', 'tensorflow_datasets', 'etils'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before anything touches a device: the device list of a multi-host run is global.
  sharding.initialize_distributed(coordinator_address=FLAGS.coordinator_address,
                                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('JAX process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    if 'phases' in FLAGS.config:
      from skd_jax import demo  # pylint: disable=g-import-not-at-top
      demo.run_phases(FLAGS.config, FLAGS.workdir)
    else:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except FileNotFoundError as e:
    # A missing dataset or checkpoint: the message names it and says what to do; a traceback
    # would only bury it.
    if jax.distributed.is_initialized():
      logging.error('%s', e)
      logging.flush()
      os._exit(1)  # pylint: disable=protected-access
    raise SystemExit(f'error: {e}') from None
  except Exception:  # pylint: disable=broad-except
    if not jax.distributed.is_initialized():
      raise
    # A normal exit would wait (5 minutes by default) at jax.distributed's shutdown barrier for
    # processes that are themselves blocked waiting for this one: stop now, with the error, and
    # let the launcher and the coordination service end the others.
    logging.exception('process %d of %d failed', jax.process_index(), jax.process_count())
    logging.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == '__main__':
  app.run(main)
