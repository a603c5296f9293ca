r"""The SKD reference teacher: PSPNet-ResNet101 on Cityscapes, trained alone.

    python -m skd_jax.main --config=configs/cityscapes_teacher.py --workdir=runs/teacher_r101 \
        --config.data.manual_dir=/data/cityscapes \
        --config.student.pretrained=/data/resnet101-imagenet.pth

The trained network is then the teacher of configs/cityscapes.py:
`--config.teacher.checkpoint=runs/teacher_r101` (its best-mIoU checkpoint is used).

Same data and optimiser as configs/cityscapes.py (512x512 crops, batch 8, 40,000 steps, SGD 0.01
poly), every distillation weight 0. Sized for one accelerator with 32 GB or more in float32 (or
16 GB with `--config.dtype=bfloat16`). Expected: about 78.5 val mIoU (the reference teacher:
78.56).
"""

from skd_jax import config_base


def get_config():
  c = config_base.base_config()
  c.student.arch = 'pspnet_resnet101'
  config_base.distillation_off(c)
  return c
