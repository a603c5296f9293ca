r"""Evaluates a trained network on a split: per-class IoU table, JSON, test-server PNGs.

    python -m skd_jax.evaluate --config=configs/cityscapes.py --workdir=DIR \
        [--checkpoint=PATH] [--model=student|teacher] [--export_dir=OUT [--export_color]]

evaluates the best (else the latest) checkpoint of the run in DIR, or `--checkpoint`, or, with
``--model=teacher``, the config's teacher, with the inference of ``config.eval``; prints the
per-class IoU table and writes it as JSON. ``--export_dir`` also writes every image of the split
(``--config.data.eval_split=test`` for the test server) as a PNG of Cityscapes label ids named
``<city>_<seq>_<frame>_leftImg8bit.png``: zip that folder for the server, or point the official
``cityscapesscripts`` evaluation at it (``CITYSCAPES_RESULTS=OUT``). ``--export_color`` adds
colour visualisations in the sibling folder ``OUT_color`` (not inside OUT: the official script
searches OUT recursively and rejects a second PNG whose name starts with an image's id).

On several hosts it is the same command on every host, with the multi-host flags of
`skd_jax.main` (`skd_jax.cli`): each host reads its own share of the split, every image is counted
once, and process 0 prints the table and writes the JSON.
The inference modes are `skd_jax.inference`'s, the evaluation pass `skd_jax.evaluator`'s, the
files `skd_jax.predictions`'.
"""

from __future__ import annotations

import os

# TensorFlow serves tf.data only; keep it off accelerators and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from skd_jax import cli  # pylint: disable=g-import-not-at-top
from skd_jax import experiment  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'The run directory.')
flags.DEFINE_string('checkpoint', None, 'A checkpoint to evaluate instead of the run\'s own.')
flags.DEFINE_enum('model', 'student', ['student', 'teacher'], 'Which network to evaluate.')
flags.DEFINE_string('export_dir', None,
                    'Also write each image\'s prediction here as a Cityscapes label-id PNG, '
                    '<city>_<seq>_<frame>_leftImg8bit.png (the test-server format).')
flags.DEFINE_bool('export_color', False,
                  'With --export_dir: also write colour visualisations to <export_dir>_color.')
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)   # the multi-host flags in --help
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.run(lambda: experiment.evaluate_and_report(
      FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, which=FLAGS.model,
      export_dir=FLAGS.export_dir, export_color=FLAGS.export_color))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
