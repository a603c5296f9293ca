r"""SKD under the CIRKD benchmark protocol: DeepLabV3-ResNet101 -> DeepLabV3-ResNet18.

    python -m skd_jax.main --config=configs/cityscapes_cirkd_skd.py --workdir=runs/cirkd_skd_r18 \
        --config.data.manual_dir=/data/cityscapes \
        --config.teacher.checkpoint=exports/cirkd_teacher_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth

The teacher is CIRKD's released DeepLabV3-R101 converted with `python -m skd_jax.convert`
(or a run of this config with `--config.student.arch=deeplabv3_resnet101` and every distillation
weight 0). CIRKD settings: 512x1024 crops, random scale 0.5..2.0, flip, global batch 16
(synchronised BN), 40,000 steps of SGD lr 0.02 (poly 0.9), weight decay 1e-4; loss CE + 0.4 aux
CE + 1.0 pixel KL (per-pixel mean) + 10 pair-wise (2x2 max-pooled nodes, norm not detached) +
0.001 adversarial; hinge discriminator with constant Adam(4e-4, 0.9/0.99), weight 0.1.

Sized for 8 GPUs (2 images each) or a TPU v4-8 and up; the global batch must divide over the
devices. Expected: about 75.4 val mIoU (CIRKD's SKD 75.42; the student alone 74.21, the teacher
78.07).

Source of the weights: CIRKD at commit 91735ef (the version whose README carries the table of
distillation methods), train_scripts/train_kd/train_skd.sh lines 1-16 (--lambda-kd 1. --lambda-d
0.1 --lambda-adv 0.001 --lambda-skd 10) with train_kd.py's defaults (lr 0.02, weight decay 1e-4,
batch 16, 40,000 iterations, 512x1024 crops); published: README.md line 69 (SKD, 75.42).
configs/cityscapes_cirkd.py is this config under its former name.
"""

from skd_jax import config_base


def get_config():
  return config_base.cirkd_cityscapes(config_base.cirkd_skd)
