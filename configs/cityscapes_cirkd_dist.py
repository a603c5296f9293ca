r"""DIST under the CIRKD benchmark protocol: DeepLabV3-ResNet101 -> DeepLabV3-ResNet18.

    python -m skd_jax.main --config=configs/cityscapes_cirkd_dist.py \
        --workdir=runs/cirkd_dist_r18 --config.data.manual_dir=/data/cityscapes \
        --config.teacher.checkpoint=exports/cirkd_teacher_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth

Loss CE + 0.4 aux CE + 1 DIST on the logits + 0.4 DIST on the aux logits against the teacher's
aux logits (beta = gamma = 1, no temperature; the intra-class term over each GPU's 2 images, i.e.
8 groups of the global 16: `loss.dist_groups`); SGD lr 0.02, weight decay 5e-4, poly 0.9 with a
1e-4 floor (`optim.min_lr`); otherwise the protocol of configs/cityscapes_cirkd_baseline.py.

Source: DIST_KD (hunto/DIST_KD) at commit 2418f18, segmentation/train_scripts/train_kd/
deeplabv3_res18.sh lines 1-12 (train_kd.py with its defaults), segmentation/train_kd.py lines
63-72 (--lr 0.02, --weight-decay 5e-4, --lambda-kd 1.), 196 (``DIST()``: beta = gamma = 1),
218 (``1e-4 + (base_lr - 1e-4) * (1 - iter / max_iter) ** power``) and 254-258 (the aux term,
``0.4 * lambda_kd``); published: segmentation/README.md line 33 (DIST, 77.10 val).

Sized for 8 GPUs (2 images each) or a TPU v4-8 and up. Expected: about 77.1 val mIoU.
"""

from skd_jax import config_base


def get_config():
  return config_base.cirkd_cityscapes(config_base.cirkd_dist)
