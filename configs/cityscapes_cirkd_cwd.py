r"""Channel-wise distillation (CWD) under the CIRKD benchmark protocol: DeepLabV3-R101 -> R18.

    python -m skd_jax.main --config=configs/cityscapes_cirkd_cwd.py --workdir=runs/cirkd_cwd_r18 \
        --config.data.manual_dir=/data/cityscapes \
        --config.teacher.checkpoint=exports/cirkd_teacher_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth

Loss CE + 0.4 aux CE + 1.0 KD (T = 1) + 3 CWD on the logits + 50 CWD on the pre-classifier
features (both T = 4; the student's 128 channels through a learned 1x1 conv to the teacher's 256,
trained by the student's SGD, the divisor N * 128 as CIRKD's code has it: `loss.cwd_divisor`) +
0.001 adversarial, with the hinge critic (Adam 4e-4, weight 0.1); protocol as
configs/cityscapes_cirkd_baseline.py.

Source: CIRKD at commit 91735ef, train_scripts/train_kd/train_cwd.sh lines 1-17 (--lambda-kd 1.0
--lambda-d 0.1 --lambda-adv 0.001 --lambda-cwd-fea 50. --lambda-cwd-logit 3.), train_kd.py line
244 (``CriterionCWD(s_channels, t_channels, norm_type='channel', divergence='kl',
temperature=4.)``) and lines 343-349 (the terms on ``s_outputs[0]`` and ``s_outputs[-1]``);
published: README.md line 71 (CWD, 75.55 val).

Sized for 8 GPUs (2 images each) or a TPU v4-8 and up. Expected: about 75.5 val mIoU.
"""

from skd_jax import config_base


def get_config():
  return config_base.cirkd_cityscapes(config_base.cirkd_cwd)
