"""The full set of config keys with the SKD reference's values; experiment configs start here.

Every experiment config in `configs/` calls `base_config()` and changes what differs. Keys are
locked when loaded through `--config=`, so a misspelt override is an error.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """The SKD reference protocol: PSPNet-R101 -> PSPNet-R18 on Cityscapes, 512x512, batch 8."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'             # compute dtype of the networks ('bfloat16' on accelerators)
  # Rematerialise the student backbone's residual blocks in the backward pass, by policy name:
  # 'none', 'convs_saveable' (keep the conv outputs), 'nothing_saveable' (keep block inputs
  # only); see skd_jax/models/resnet.py REMAT_POLICIES and the README's memory table.
  c.remat = 'none'
  # Device mesh: the batch is split over 'data'; 'model' > 1 splits the teacher's kernels along
  # their largest dimension (for teachers too big for one device). -1 = all remaining devices.
  # 'model' must divide the devices of one host.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'model': 1})
  c.mesh_shard_student = False    # True: the student's kernels (and momenta) split over 'model' too

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'cityscapes'
  c.data.num_classes = 19
  c.data.ignore_label = 255
  c.data.manual_dir = ''          # holds leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip
  c.data.tfds_data_dir = ''       # '' = WORKDIR/data/tfds
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.data.eval_pad_size = ()       # () = the split's largest image (datasets of mixed sizes)
  c.data.crop_size = (512, 512)
  c.data.scales = tuple(round(0.7 + 0.1 * i, 1) for i in range(15))  # 0.7, 0.8, ..., 2.1
  c.data.flip = True
  c.data.normalization = 'caffe_bgr'   # BGR minus the Caffe mean, no std (both reference codes)
  # Label values outside the dataset's table (ignored in training and evaluation): the share of
  # a split's label pixels above which the run stops at start-up (below: a warning).
  c.data.unknown_label_tolerance = 1e-3
  # A procedurally generated stand-in in the Cityscapes on-disk format (the demo and tests).
  c.data.synthetic = False
  c.data.synthetic_num_train = 200
  c.data.synthetic_num_val = 50
  c.data.synthetic_num_test = 20
  c.data.synthetic_height = 128
  c.data.synthetic_width = 256
  c.data.synthetic_seed = 0

  c.student = ml_collections.ConfigDict()
  c.student.arch = 'pspnet_resnet18'
  # Any Segmenter field (skd_jax/models/segmenter.py), e.g. width_multiplier; None = the preset's
  # value for the architecture.
  c.student.overrides = segmenter_overrides()
  # The dropout rates of the reference's heads, here so that the command line can set them
  # (--config.student.overrides.head_dropout=0 for a deterministic student, as in a parity check).
  c.student.overrides.head_dropout = 0.1
  c.student.overrides.aux_dropout = 0.1
  c.student.pretrained = ''       # a CSAIL/torchvision ImageNet .pth for the backbone

  c.teacher = ml_collections.ConfigDict()
  c.teacher.arch = 'pspnet_resnet101'
  c.teacher.overrides = segmenter_overrides()
  c.teacher.checkpoint = ''       # a teacher run's workdir, a `skd_jax.convert` export, or a .pth

  c.disc = ml_collections.ConfigDict()
  c.disc.features = (64, 128, 256, 512)
  c.disc.image_conditioned = False   # True: the paper's D(softmax(logits), image)
  c.disc.min_input_size = 0       # > 0: smaller logit maps are upsampled to this for D only
  c.disc.optimizer = 'sgd'        # reference; 'adam' for CIRKD and later forks
  c.disc.lr = 4e-4
  c.disc.momentum = 0.9
  c.disc.weight_decay = 5e-4
  c.disc.power = 0.9
  c.disc.min_lr = 0.0             # floor of the SGD poly schedule (optim.min_lr's, for D)
  c.disc.b1 = 0.9
  c.disc.b2 = 0.99
  # Spectral norm's gradient through sigma = u W v: 'own' = each D call's u, v (the intended
  # gradient; default); 'last' = the step's last call's for every call, as the reference's
  # in-place SpectralNorm gives it (README, faithfulness notes).
  c.disc.sn_backward = 'own'

  c.loss = ml_collections.ConfigDict()
  c.loss.aux_weight = 0.4
  c.loss.lambda_pi = 10.0         # pixel-wise; reference-code weight
  c.loss.lambda_pa = 0.5          # pair-wise; the code's 0.5, not the paper's 10
  c.loss.lambda_ho = 0.1          # adversarial term of the student
  c.loss.lambda_d = 0.1           # discriminator loss weight (the reference uses lambda_ho)
  c.loss.lambda_gp = 10.0
  c.loss.gan_loss = 'wgan_gp'     # or 'hinge' (CIRKD)
  c.loss.pi_temperature = 1.0
  c.loss.pi_reduction = 'batch_sum'   # reference; 'mean' = per-pixel mean
  c.loss.pa_pool = 'max'          # reference; 'avg' = the paper's reading
  c.loss.pa_pool_scale = 0.5
  c.loss.pa_pool_kernel = 0       # > 0: a fixed node kernel (CIRKD: 2)
  c.loss.pa_alpha = 0             # 0: global graph (reference); (2r+1)^2: the paper's local graph
  c.loss.pa_detach_norm = True    # reference; False = CIRKD's differentiable norm
  c.loss.ohem = False
  c.loss.ohem_thresh = 0.7
  c.loss.ohem_min_kept = 100000
  # The methods SKD is compared with (configs/cityscapes_cirkd_*.py), each absent at weight 0 and
  # free to combine with SKD's three terms; formulas and sources in skd_jax/losses.py.
  # Logit KD (Hinton): T^2 * per-pixel mean KL(softmax(z_T/T) || softmax(z_S/T)), main logits.
  c.loss.kd_weight = 0.0
  c.loss.kd_temperature = 1.0     # CIRKD's --kd-temperature default
  # CWD (Shu et al.): per-channel spatial softmax of x/T, KL summed over positions / (N * C).
  c.loss.cwd_logit_weight = 0.0   # on the logits (CIRKD's run: 3)
  c.loss.cwd_feature_weight = 0.0  # on the pre-classifier features, through a learned 1x1 conv
                                   # to the teacher's channels when they differ (CIRKD's run: 50)
  c.loss.cwd_temperature = 4.0    # CIRKD's CriterionCWD(temperature=4.) for both terms
  # The feature term's C: 'student' = the student's channels before the adapter (CIRKD's code);
  # 'compared' = the channels of the compared maps (the paper's 1/C; half as large for 128 -> 256).
  c.loss.cwd_divisor = 'student'
  # DIST (Huang et al.): beta * (1 - mean Pearson over each pixel's classes) + gamma * (1 - mean
  # Pearson over each class's pixels), of softmax(z/T).
  c.loss.dist_weight = 0.0        # on the main logits (DIST_KD's run: 1)
  c.loss.dist_aux_weight = 0.0    # on the aux logits against the teacher's (DIST_KD's run: 0.4)
  c.loss.dist_beta = 1.0
  c.loss.dist_gamma = 1.0
  c.loss.dist_temperature = 1.0   # DIST_KD's segmentation code has none (T = 1)
  # The intra-class term over G equal groups of images, averaged: G = the reference's GPUs (its
  # per-GPU batches); 1 = the whole global batch at once.
  c.loss.dist_groups = 1

  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 8          # global, over all devices
  c.optim.num_steps = 40000
  c.optim.lr = 0.01
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.power = 0.9
  c.optim.min_lr = 0.0            # poly floor: min_lr + (lr - min_lr) * (1 - t/T)^power (DIST: 1e-4)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8           # global
  c.eval.every_steps = 4000
  c.eval.ignore_absent_classes = False   # reference: absent classes count as IoU 0
  # Inference (any combination; see skd_jax/inference.py). The reference reports whole-image,
  # single-scale, unflipped results; its code also has the sliding window (tiles of crop_size,
  # 1/3 overlap), multi-scale and flip.
  c.eval.sliding_window = False
  c.eval.crop_size = ()           # sliding-window tile (h, w); () = data.crop_size
  c.eval.scales = (1.0,)          # logits averaged over these image scales
  c.eval.flip = False             # also average the horizontally flipped image's logits

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 2000
  c.checkpoint.keep = 3

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.num_images = 4

  # With phases, `python -m skd_jax.main` runs them in subfolders instead of one run (skd_jax.demo):
  # 'teacher' (config.teacher's network trained alone for teacher_num_steps), 'student' (alone),
  # 'student_skd' (distilled from that teacher). () = one plain run.
  c.demo = ml_collections.ConfigDict()
  c.demo.phases = ()
  c.demo.teacher_num_steps = 0
  return c


def get_config() -> ml_collections.ConfigDict:
  """`base_config`, for ``--config=skd_jax/config_base.py`` (the default of `skd_jax.convert`)."""
  return base_config()


def segmenter_overrides() -> ml_collections.ConfigDict:
  """Every `Segmenter` field a config may set, each None (= the architecture preset's value).

  `skd_jax.models.create_segmenter` takes the ones that are not None; the test suite checks that
  this list is the Segmenter's fields but num_classes, dtype and remat (the config's own keys).
  """
  fields = {'depth': int, 'head': str, 'head_channels': int, 'aux_channels': int,
            'head_dropout': float, 'aspp_dropout': float, 'aux_dropout': float,
            'output_stride': int, 'dilation_schedule': str, 'stem_ceil_mode': bool,
            'width_multiplier': float, 'stem': str, 'bn_momentum': float}
  return ml_collections.ConfigDict(
      {name: config_dict.placeholder(kind) for name, kind in fields.items()})


def distillation_off(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The student-alone baseline (or a teacher run): every distillation weight 0."""
  c.loss.lambda_pi = 0.0
  c.loss.lambda_pa = 0.0
  c.loss.lambda_ho = 0.0
  c.loss.kd_weight = 0.0
  c.loss.cwd_logit_weight = 0.0
  c.loss.cwd_feature_weight = 0.0
  c.loss.dist_weight = 0.0
  c.loss.dist_aux_weight = 0.0
  return c


def cirkd_protocol(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CIRKD benchmark's settings (cirkd-protocol.md), for any dataset.

  DeepLabV3 R101 -> R18, random scale 0.5..2.0, global batch 16, SGD lr 0.02 with weight decay
  1e-4; CE + 0.4 aux CE + 1.0 per-pixel KL + 10 pair-wise (2x2 max-pooled nodes, norm not
  detached) + 0.001 adversarial; hinge discriminator, constant Adam(4e-4, 0.9/0.99), weight 0.1.
  The dataset, class count and crop stay the caller's.
  """
  c.student.arch = 'deeplabv3_resnet18'
  c.student.overrides.aspp_dropout = 0.5   # the ASPP projection's (settable, as the other two)
  c.teacher.arch = 'deeplabv3_resnet101'
  c.data.scales = tuple(round(0.5 + 0.1 * i, 1) for i in range(16))  # 0.5, 0.6, ..., 2.0
  c.optim.batch_size = 16
  c.optim.lr = 0.02
  c.optim.weight_decay = 1e-4
  c.loss.lambda_pi = 1.0
  c.loss.pi_reduction = 'mean'
  c.loss.lambda_pa = 10.0
  c.loss.pa_pool_kernel = 2
  c.loss.pa_detach_norm = False
  c.loss.lambda_ho = 0.001
  c.loss.lambda_d = 0.1
  c.loss.gan_loss = 'hinge'
  c.disc.optimizer = 'adam'
  c.disc.weight_decay = 0.0
  c.eval.batch_size = 8
  return c


# The methods of the CIRKD benchmark, each applied to a `cirkd_protocol` config
# (configs/cityscapes_cirkd_*.py give the command, the source of each weight and the published
# number). Each starts from the protocol's SKD terms and replaces them.


def cirkd_skd(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SKD as CIRKD ran it: the protocol's own terms (pixel KL 1.0, pair-wise 10, adversarial
  0.001, hinge critic 0.1)."""
  return c


def cirkd_baseline(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The student alone on the same protocol (CE + 0.4 aux CE)."""
  return distillation_off(c)


def cirkd_kd(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Logit KD alone: 1.0 * T^2 * per-pixel KL at T = 1 (CIRKD's --lambda-kd 1.0)."""
  distillation_off(c)
  c.loss.kd_weight = 1.0
  c.loss.kd_temperature = 1.0
  return c


def cirkd_cwd(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CIRKD's CWD run: CWD 3 on logits and 50 on features (T = 4), KD 1.0 and the adversarial
  terms 0.001 (student) / 0.1 (hinge critic) as that run did."""
  distillation_off(c)
  c.loss.kd_weight = 1.0
  c.loss.cwd_logit_weight = 3.0
  c.loss.cwd_feature_weight = 50.0
  c.loss.cwd_temperature = 4.0
  c.loss.cwd_divisor = 'student'
  c.loss.lambda_ho = 0.001
  c.loss.lambda_d = 0.1
  c.loss.gan_loss = 'hinge'
  return c


def cirkd_dist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DIST_KD's segmentation run: DIST 1 on the logits and 0.4 on the aux logits, its intra-class
  term per GPU (8 groups of the 16 images), weight decay 5e-4, poly lr with a 1e-4 floor."""
  distillation_off(c)
  c.loss.dist_weight = 1.0
  c.loss.dist_aux_weight = 0.4
  c.loss.dist_beta = 1.0
  c.loss.dist_gamma = 1.0
  c.loss.dist_temperature = 1.0
  c.loss.dist_groups = 8
  c.optim.weight_decay = 5e-4
  c.optim.min_lr = 1e-4
  return c


def cirkd_cityscapes(method) -> ml_collections.ConfigDict:
  """A CIRKD-benchmark method (`cirkd_skd`, `cirkd_kd`, ...) on Cityscapes, 512x1024 crops."""
  c = cirkd_protocol(base_config())
  c.data.crop_size = (512, 1024)
  return method(c)
