r"""SKD on Cityscapes, the reference protocol: PSPNet-ResNet101 -> PSPNet-ResNet18.

    python -m skd_jax.main --config=configs/cityscapes.py --workdir=runs/skd_r18 \
        --config.data.manual_dir=/data/cityscapes \
        --config.teacher.checkpoint=exports/teacher_pspnet_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth

The manual dir holds leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (see README). The
teacher is a run of configs/cityscapes_teacher.py or the reference's released PSPNet-R101
converted with `python -m skd_jax.convert`; the student starts from the CSAIL deep-stem ImageNet
ResNet-18.

Settings of the reference code: 512x512 crops, random scale 0.7..2.1, flip, batch 8 (synchronised
BN over the global batch), 40,000 steps of SGD lr 0.01 (poly 0.9), momentum 0.9, weight decay 5e-4;
loss CE + 0.4 aux CE + 10 pixel-wise (batch-summed) + 0.5 pair-wise (max-pooled 3x3 nodes, global
graph) + 0.1 adversarial; WGAN-GP discriminator with SGD 4e-4.

Sized for one accelerator with 16 GB or more (the reference ran batch 8 on one GPU); on a GPU or a
TPU slice, add `--config.dtype=bfloat16` for speed. Expected: about 74 val mIoU (the reference code
gave 74.08; the student alone 69.10, the teacher 78.56) -- compare with a baseline run of the
same setup (`--config.loss.lambda_pi=0 --config.loss.lambda_pa=0 --config.loss.lambda_ho=0`).
"""

from skd_jax import config_base


def get_config():
  c = config_base.base_config()
  c.eval.every_steps = 4000
  return c
