r"""Converts a PyTorch checkpoint into an skd_jax export (orbax variables + JSON).

    python -m skd_jax.convert --checkpoint=CS_scenes_40000.pth --out=/tmp/teacher \
        [--config=configs/cityscapes.py] [--model=teacher|student] [--arch=pspnet_resnet101] \
        [--num_classes=19] [--layout=skd_reference] [--config.teacher.overrides.KEY=VALUE ...]

The network is described as the trainer describes it: the config's ``data.num_classes`` and the
``--model`` section's ``arch`` and ``overrides`` (default: the base config's teacher, PSPNet-R101
for 19 classes); `--arch` and `--num_classes` replace the config's. What it writes is read by
``config.teacher.checkpoint`` and `python -m skd_jax.evaluate --checkpoint=`. The conversion
itself is `skd_jax.torch_convert`'s.
"""

from __future__ import annotations

import os

from absl import app, flags  # pylint: disable=g-multiple-import
from ml_collections import config_flags

from skd_jax import cli
from skd_jax import config_base
from skd_jax import experiment
from skd_jax import torch_convert
from skd_jax.models import MODEL_PRESETS

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', os.path.abspath(config_base.__file__),
    'Experiment config file: its data.num_classes and the --model section\'s arch and overrides '
    'describe the network (default: the base config).', lock_config=True)
flags.DEFINE_string('checkpoint', None, 'The PyTorch .pth file.')
flags.DEFINE_string('out', None, 'The export folder to write.')
flags.DEFINE_enum('model', 'teacher', ['student', 'teacher'],
                  'The config section that describes the network.')
flags.DEFINE_enum('arch', None, sorted(MODEL_PRESETS),
                  'The architecture (default: config.<model>.arch).')
flags.DEFINE_integer('num_classes', None, 'The class count (default: config.data.num_classes).')
flags.DEFINE_enum('layout', None, list(torch_convert.LAYOUTS),
                  'The checkpoint layout (default: detected from the key names).')
flags.DEFINE_bool('non_strict', False, 'Tolerate checkpoint tensors the model does not use.')
flags.mark_flags_as_required(['checkpoint', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  section = FLAGS.config[FLAGS.model]
  cli.quiet_library_errors()
  print(cli.run_with_one_line_errors(lambda: torch_convert.write_export(
      FLAGS.checkpoint, FLAGS.out, FLAGS.arch or section.arch,
      FLAGS.num_classes or FLAGS.config.data.num_classes, layout=FLAGS.layout,
      strict=not FLAGS.non_strict, model_overrides=experiment.overrides(section))))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
