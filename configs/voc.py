r"""SKD on Pascal VOC 2012 (+ SBD), CIRKD protocol: DeepLabV3-ResNet101 -> ResNet18.

    python -m skd_jax.main --config=configs/voc.py --workdir=runs/voc_skd_r18 \
        --config.data.manual_dir=/data/voc \
        --config.teacher.checkpoint=exports/voc_teacher_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth

The manual dir holds VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz, extracted
(VOCdevkit/VOC2012/ and benchmark_RELEASE/dataset/; skd_jax/data/voc.py). Training reads
'train_aug' (SBD train + val + VOC train - VOC val: 10582 images), evaluation VOC val (1449). The
teacher is CIRKD's released VOC DeepLabV3-R101 converted with `python -m skd_jax.convert
--num_classes=21`, or a run of this config with `--config.student.arch=deeplabv3_resnet101` and
every distillation weight 0.

CIRKD's VOC settings: 512x512 crops, random scale 0.5..2.0, flip, 40,000 steps of SGD lr 0.02
(poly 0.9), weight decay 1e-4, global batch 16 (as its Cityscapes scripts; its VOC scripts leave
the flag out); whole-image single-scale evaluation. VOC images vary in size (at most 500x500), so
evaluation pads each one at the bottom / right to the split's largest (label 255: padded pixels do
not count); CIRKD evaluates one image at a time at its own size. Distillation terms as
configs/cityscapes_cirkd.py.

Sized like configs/cityscapes_cirkd.py: 8 GPUs with 2 images each, or a TPU v4-8 and up (the
global batch must divide over the devices); run time not measured here. Expected val mIoU (CIRKD
README, DeepLabV3): teacher R101 77.67, student R18 alone 73.21, with CIRKD 74.50; SKD should land
between the student alone and CIRKD.
"""

from skd_jax import config_base


def get_config():
  c = config_base.cirkd_protocol(config_base.base_config())
  c.data.dataset = 'voc'
  c.data.num_classes = 21
  c.data.crop_size = (512, 512)
  return c
