r"""The student alone under the CIRKD benchmark protocol: DeepLabV3-ResNet18, no teacher.

    python -m skd_jax.main --config=configs/cityscapes_cirkd_baseline.py \
        --workdir=runs/cirkd_baseline_r18 --config.data.manual_dir=/data/cityscapes \
        --config.student.pretrained=/data/resnet18-imagenet.pth

The same-run baseline of configs/cityscapes_cirkd_{skd,kd,cwd,dist}.py: the same data, model,
optimiser and steps (512x1024 crops, random scale 0.5..2.0, flip, global batch 16, 40,000 steps of
SGD lr 0.02, poly 0.9, weight decay 1e-4), loss CE + 0.4 aux CE, every distillation weight 0.

Source: CIRKD at commit 91735ef, train_scripts/train_baseline/citys/deeplabv3_res18.sh lines 1-8
(train_baseline.py with its defaults: --lr 0.02, --weight-decay 1e-4, --batch-size 16,
--max-iterations 40000, aux weight 0.4 for ResNet students); published: README.md line 53 and
line 68 (DeepLabV3-ResNet18 baseline, 74.21 val).

Sized for 8 GPUs (2 images each) or a TPU v4-8 and up. Expected: about 74.2 val mIoU.
"""

from skd_jax import config_base


def get_config():
  return config_base.cirkd_cityscapes(config_base.cirkd_baseline)
