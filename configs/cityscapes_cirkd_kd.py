r"""Logit KD under the CIRKD benchmark protocol: DeepLabV3-ResNet101 -> DeepLabV3-ResNet18.

    python -m skd_jax.main --config=configs/cityscapes_cirkd_kd.py --workdir=runs/cirkd_kd_r18 \
        --config.data.manual_dir=/data/cityscapes \
        --config.teacher.checkpoint=exports/cirkd_teacher_r101 \
        --config.student.pretrained=/data/resnet18-imagenet.pth

Loss CE + 0.4 aux CE + 1.0 * T^2 * per-pixel KL(p_T || p_S) at T = 1 on the 1/8 logits
(`loss.kd_weight`), nothing else; protocol as configs/cityscapes_cirkd_baseline.py.

Source: CIRKD at commit 91735ef, train_kd.py lines 76-77 (--kd-temperature 1.0, --lambda-kd) and
343 (``lambda_kd * CriterionKD(s_outputs[0], t_outputs[0])``), at the --lambda-kd 1.0 that every
CIRKD distillation script passes (train_scripts/train_kd/train_cwd.sh line 8, train_skd.sh line 8).
Nothing is published for KD alone in CIRKD's README (none in the sources read here): the KD term
is the common part of its published SKD (75.42) and CWD (75.55) runs (README.md lines 69, 71);
the student alone 74.21 (line 68).

Sized for 8 GPUs (2 images each) or a TPU v4-8 and up.
"""

from skd_jax import config_base


def get_config():
  return config_base.cirkd_cityscapes(config_base.cirkd_kd)
