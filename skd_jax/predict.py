r"""Predicts the classes of your own images and writes them as PNGs: labels, colour mask, overlay.

    python -m skd_jax.predict --config=configs/cityscapes.py --checkpoint=runs/skd_r18 \
        --out=predictions photos/ street.jpg 'more/*.png' \
        [--label_ids] [--opacity=0.5] [--batch_size=8] [--model=student|teacher]

Images: files, folders (searched recursively for .jpg, .jpeg, .png) and globs, after the flags or
as ``--input=PATH`` (repeatable); JPEG, PNG or anything Pillow reads, any size, sizes mixed.
The network: ``--checkpoint`` is a run's workdir (its best checkpoint, else its latest), a step
folder, an export of `skd_jax.convert`, a PyTorch .pth (converted on the fly; ``--model`` says
which config section describes it), all with the normalisation and the inference (``config.eval``:
whole image, sliding window, scales, flip) of ``--config``; or a folder of `skd_jax.export`
(its jax_exported.bin, which carries them; ``--config`` is then not needed).

Per image, ``OUT/labels/<name>.png`` (train ids, or with ``--label_ids`` the dataset's label ids),
``OUT/color/<name>.png`` (the dataset's palette) and ``OUT/overlay/<name>.png`` (the mask over the
photo at ``--opacity``); see `skd_jax.predict_lib`. Progress: images done / total and images/s.
An image that cannot be read is named on a ``skipped`` line and left out; the others are written
and the program ends with one ``error:`` line counting the skipped ones, exit status 2. A bad flag
(no images found, no such checkpoint) is one ``error:`` line and status 1, before any work.
Runs where JAX runs (CPU, GPU, TPU: the default device).
"""

from __future__ import annotations

import os

# TensorFlow only lists and reads files here; keep it off accelerators and quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from skd_jax import cli  # pylint: disable=g-import-not-at-top
from skd_jax import predict_lib  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'The training config (classes, normalisation, inference); not needed for an '
    'skd_jax.export folder.', lock_config=True)
flags.DEFINE_string('checkpoint', None,
                    'The network: a run\'s workdir (its best checkpoint, else its latest), a step '
                    'folder, an export of skd_jax.convert or skd_jax.export, or a PyTorch .pth.')
flags.DEFINE_enum('model', 'student', ['student', 'teacher'],
                  'Which config section describes the network (its architecture where the '
                  'checkpoint does not record it, e.g. a .pth).')
flags.DEFINE_multi_string('input', [], 'An image file, a folder of images or a glob (repeatable; '
                          'paths after the flags count too).')
flags.DEFINE_string('out', None, 'Folder for labels/, color/ and overlay/.')
flags.DEFINE_bool('label_ids', False, 'Write the dataset\'s label ids (Cityscapes: the raw 0..33 '
                  'ids of the test server) instead of train ids in labels/.')
flags.DEFINE_float('opacity', predict_lib.DEFAULT_OPACITY,
                   'Weight of the colour mask in the overlay: 0 the photo, 1 the mask.')
flags.DEFINE_integer('batch_size', None, 'Images per batch (of one size); default '
                     'config.eval.batch_size, or the fixed batch of an export.')
flags.mark_flags_as_required(['checkpoint', 'out'])


def main(argv):
  cli.quiet_library_errors()
  config = FLAGS.config if FLAGS['config'].present else None
  cli.run_with_one_line_errors(lambda: predict_lib.predict_images(
      FLAGS.input + argv[1:], FLAGS.out, checkpoint=FLAGS.checkpoint, config=config,
      which=FLAGS.model, label_ids=FLAGS.label_ids, opacity=FLAGS.opacity,
      batch_size=FLAGS.batch_size))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
