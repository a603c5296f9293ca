r"""Trains a segmentation network, with or without distillation from a frozen teacher.

    python -m skd_jax.main --config=configs/cityscapes.py --workdir=/path/to/run \
        [--config.loss.lambda_pa=10 ...]

A run resumes from the latest checkpoint in its workdir. Configs whose `phases` list several runs
(configs/demo.py) run each in a subfolder and summarise them.
"""

import logging as logging_std
import os

# TensorFlow serves tf.data only; keep it off accelerators and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
import jax  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from skd_jax import train  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
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
  logging.info('JAX process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  if 'phases' in FLAGS.config:
    from skd_jax import demo  # pylint: disable=g-import-not-at-top
    demo.run_phases(FLAGS.config, FLAGS.workdir)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
