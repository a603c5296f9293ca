r"""SKD on ADE20K (150 classes), CIRKD protocol: DeepLabV3-ResNet101 -> ResNet18.

    python -m skd_jax.main --config=configs/ade20k.py --workdir=runs/ade20k_skd_r18 \
        --config.data.manual_dir=/data/ade20k \
        --config.teacher.checkpoint=exports/ade20k_teacher_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth

The manual dir holds ADEChallengeData2016.zip, extracted (ADEChallengeData2016/images and
.../annotations; skd_jax/data/ade20k.py): 20210 training and 2000 validation images. Label 0
('other') is ignored, class k is train id k - 1. The teacher is CIRKD's released ADE20K
DeepLabV3-R101 converted with `python -m skd_jax.convert --num_classes=150`, or a run of this
config with `--config.student.arch=deeplabv3_resnet101` and every distillation weight 0.

CIRKD's ADE20K settings: 512x512 crops (its R101 script; the R18 script leaves the flag at its
512x1024 default), random scale 0.5..2.0, flip, global batch 16, 40,000 steps of SGD lr 0.02
(poly 0.9), weight decay 1e-4; whole-image single-scale evaluation. ADE20K images vary in size, so
evaluation pads each one at the bottom / right to the largest validation image (recorded when the
data is prepared; label 255, padded pixels do not count). The largest is reported to be about
2100x2100, so an evaluation pass costs several times what the images' own sizes would (CIRKD
evaluates one image at a time at its own size). Distillation terms as configs/cityscapes_cirkd.py.

Sized like configs/cityscapes_cirkd.py: 8 GPUs with 2 images each, or a TPU v4-8 and up (the
global batch must divide over the devices); run time not measured here. Expected val mIoU (CIRKD
README, DeepLabV3): teacher R101 42.70, student R18 alone 33.91, with CIRKD 35.41; SKD should land
between the student alone and CIRKD.
"""

from skd_jax import config_base


def get_config():
  c = config_base.cirkd_protocol(config_base.base_config())
  c.data.dataset = 'ade20k'
  c.data.num_classes = 150
  c.data.crop_size = (512, 512)
  return c
