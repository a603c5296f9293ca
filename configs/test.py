"""A tiny SKD config for tests: runs a few steps on CPU in seconds, on synthetic data.

    python -m skd_jax.main --config=configs/test.py --workdir=/tmp/skd_test \
        --config.teacher.checkpoint=/tmp/skd_test_teacher

Networks at 1/16 (student) and 1/8 (teacher) width, 64x64 crops of 64x128 synthetic scenes,
global batch 8 (so that it divides over 1, 2, 4 or 8 simulated devices). Expect a meaningless
mIoU: this config exercises the program, it does not learn anything useful.
"""

from skd_jax import config_base


def get_config():
  c = config_base.base_config()
  c.data.synthetic = True
  c.data.synthetic_num_train = 16
  c.data.synthetic_num_val = 4
  c.data.synthetic_num_test = 2
  c.data.synthetic_height = 64
  c.data.synthetic_width = 128
  c.data.crop_size = (64, 64)
  c.data.scales = (0.75, 1.0, 1.25)
  c.student.overrides.width_multiplier = 1 / 16
  c.teacher.arch = 'pspnet_resnet18'
  c.teacher.overrides.width_multiplier = 1 / 8
  c.disc.features = (8, 8, 16, 16)
  c.disc.min_input_size = 64      # 9x9 logits are upsampled for the discriminator
  c.optim.batch_size = 8
  c.optim.num_steps = 6
  c.eval.batch_size = 8
  c.eval.every_steps = 3
  c.checkpoint.every_steps = 3
  c.log.every_steps = 1
  c.log.num_images = 2
  return c
