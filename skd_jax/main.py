r"""Trains a segmentation network, with or without distillation from a frozen teacher.

    python -m skd_jax.main --config=configs/cityscapes.py --workdir=/path/to/run \
        [--config.loss.lambda_pa=10 ...]

A run resumes from the latest checkpoint in its workdir. A config whose `demo.phases` lists runs
(configs/demo.py) runs each in a subfolder and summarises them (`skd_jax.demo`).

Multi-host: the same command on every host. On a Cloud TPU VM slice or a TPU pod on GKE, under
Slurm (`srun`) or Open MPI (`mpirun`) with several tasks, `jax.distributed` starts by itself
(`--distributed=on` forces it, with jax's own cluster detection; `--distributed=off` prevents it);
elsewhere give each process

    --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

(HOST0 the address of process 0). The workdir (and the data folders) should be one shared
location: process 0 prepares the dataset while the others wait, all write the checkpoints
together, and only process 0 writes TensorBoard logs and result.json.
"""

from __future__ import annotations

import os

# TensorFlow serves tf.data only; keep it off accelerators and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from skd_jax import cli  # pylint: disable=g-import-not-at-top
from skd_jax import demo  # pylint: disable=g-import-not-at-top
from skd_jax import train  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)   # the multi-host flags in --help
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  program = demo.run_phases if FLAGS.config.demo.phases else train.train_and_evaluate
  cli.run(lambda: program(FLAGS.config, FLAGS.workdir))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
