"""What a config names, built: networks, checkpoints, the data, and the standalone evaluation.

The programs (`skd_jax.main`, `skd_jax.evaluate`, `skd_jax.export`) and the training loop
(`skd_jax.train`) read a config through these functions:

  * networks: `build_model` (the one place a segmenter is made from a config section and, where a
    checkpoint records it, that checkpoint's architecture), `build_discriminator`,
    `model_metadata` (what a checkpoint records of its network);
  * weights: `load_model` (a run's workdir, a checkpoint, an export or a PyTorch .pth, checked
    against the network), `load_teacher`, `pretrained_backbone` (ImageNet weights of the student);
  * data: `prepare_data` (tfds preparation and the start-up checks), `train_iterator`,
    `eval_iterator`, `class_names`, `palette`;
  * evaluation: `config_evaluator`, `evaluate_checkpoint` and `evaluate_and_report` (the
    standalone evaluation of `python -m skd_jax.evaluate`).

TensorFlow (tf.data, tfds) is imported only inside the functions that read data, so that the
training step and the networks load without it.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from skd_jax import checkpoint as ckpt_lib
from skd_jax import torch_convert
from skd_jax import evaluator as evaluator_lib
from skd_jax import inference
from skd_jax import sharding as sharding_lib
from skd_jax.models import create_segmenter
from skd_jax.models.discriminator import Discriminator
from skd_jax.paths import as_path

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Networks and their weights.


def overrides(section: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `Segmenter` fields that `section` (config.student or config.teacher) sets: those of its
  `overrides` that are not None (None = the preset's value)."""
  return {k: v for k, v in section.overrides.items() if v is not None}


def build_model(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                metadata: dict[str, Any] | None = None) -> nn.Module:
  """The segmenter of `section` (config.student or config.teacher), or of a checkpoint's record.

  `metadata`: what a checkpoint records of its network (`model_metadata`); its architecture wins
  over the config's (it is what the weights fit), a disagreement is logged, and the config's
  `section` fills what it lacks.
  """
  metadata = metadata or {}
  arch = metadata.get('arch', section.arch)
  configured = overrides(section)
  recorded = {k: v for k, v in metadata.get('overrides', {}).items() if v is not None}
  model_overrides = dict(configured, **recorded)
  if arch != section.arch or model_overrides != configured:
    logging.warning('the checkpoint was written for %s %s; the config says %s %s: using the '
                    'checkpoint\'s', arch, recorded, section.arch, configured)
  return create_segmenter(arch, config.data.num_classes, dtype=config.dtype, **model_overrides)


def build_discriminator(config: ml_collections.ConfigDict) -> Discriminator:
  """The critic of ``config.disc`` (the reference's SAGAN discriminator, `models.discriminator`)."""
  return Discriminator(features=tuple(config.disc.features),
                       image_conditioned=config.disc.image_conditioned,
                       min_input_size=config.disc.min_input_size)


def model_metadata(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint of the student records of its network (read back by `build_model`)."""
  return {'arch': config.student.arch, 'num_classes': config.data.num_classes,
          'overrides': overrides(config.student)}


def load_model(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
               path: str | pathlib.Path):
  """(module, variables) of a network from a run's workdir, a checkpoint, an export or a .pth.

  `section` (config.teacher or config.student) gives the architecture where the checkpoint does
  not record it (a .pth); the variables are checked against the network before use. They come
  back as host (NumPy) arrays, which `jax.device_put` can place on a mesh over several hosts.
  """
  if str(path).endswith(('.pth', '.pt')):
    variables, recorded_overrides = torch_convert.load_torch_variables(
        str(path), section.arch, config.data.num_classes, **overrides(section))
    metadata = {'arch': section.arch, 'overrides': recorded_overrides}
  else:
    variables, metadata = ckpt_lib.load_variables(path)
    recorded = metadata.get('num_classes')
    if recorded is not None and recorded != config.data.num_classes:
      raise ValueError(
          f'checkpoint {path} predicts {recorded} classes, but {config.data.dataset} has '
          f'data.num_classes = {config.data.num_classes}: give a network trained on these '
          'classes (a teacher run of this config, or a converted .pth of this dataset).')
  model = build_model(config, section, metadata)
  expected = jax.eval_shape(
      lambda: model.init(jax.random.key(0, impl='rbg'), jnp.zeros((1, 64, 64, 3)), train=False))
  check_same_structure(expected, variables, f'checkpoint {path}')
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return model, jax.tree.map(np.asarray, variables)


def load_teacher(config: ml_collections.ConfigDict):
  """(teacher module, variables) from ``config.teacher.checkpoint``."""
  if not config.teacher.checkpoint:
    raise ValueError('the distillation weights are not all 0, so a teacher is needed: set '
                     '--config.teacher.checkpoint to a teacher run\'s workdir, an export from '
                     '`python -m skd_jax.convert`, or a PyTorch .pth file.')
  return load_model(config, config.teacher, config.teacher.checkpoint)


def check_same_structure(expected: PyTree, got: PyTree, what: str) -> None:
  """A ValueError naming what of `got` (variables) is missing, unexpected or misshapen against
  `expected` (an abstract init of the configured network)."""
  exp = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(p): np.shape(x)
          for p, x in jax.tree_util.tree_leaves_with_path(
              {'params': got.get('params'), 'batch_stats': got.get('batch_stats')})}
  missing = sorted(set(exp) - set(have))
  unexpected = sorted(set(have) - set(exp))
  misshapen = sorted(k for k in set(exp) & set(have) if tuple(exp[k]) != tuple(have[k]))
  if missing or unexpected or misshapen:
    raise ValueError(
        f'{what} does not fit the configured network: missing {missing[:5]}, unexpected '
        f'{unexpected[:5]}, misshapen {[(k, have[k], exp[k]) for k in misshapen[:5]]} '
        f'(check config.teacher.arch / overrides and data.num_classes).')


def pretrained_backbone(config: ml_collections.ConfigDict, student: nn.Module,
                        image_shape: tuple[int, ...]) -> PyTree | None:
  """The student's variables with its backbone from ``config.student.pretrained`` (an ImageNet
  .pth), the rest freshly initialised from ``config.seed``; None when it is not set."""
  if not config.student.pretrained:
    return None
  fresh = jax.jit(lambda: student.init(jax.random.key(config.seed, impl='rbg'),
                                       jnp.zeros((1, *image_shape[1:])), train=False))()
  return torch_convert.load_torch_backbone(config.student.pretrained, fresh)


# ---------------------------------------------------------------------------------------------
# Data.


def prepare_data(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                 training: bool = True) -> str:
  """Prepares `config.data.dataset` with tfds (writing the synthetic Cityscapes stand-in first if
  configured) and checks it; returns the tfds data dir.

  The checks (`skd_jax.data.checks`): after the first preparation every example is decoded once
  and its label values counted; this census is then checked against the config (label values
  outside the dataset's table, the class count and, for `training`, the crop size), so that
  damaged files and wrong labels stop the run before its first step, each with its one line.
  """
  from skd_jax.data import checks, cityscapes, pipeline, synthetic  # optional: TensorFlow, tf.data
  data = config.data
  manual_dir = data.manual_dir or str(workdir / 'data' / 'manual')
  data_dir = data.tfds_data_dir or str(workdir / 'data' / 'tfds')
  if data.synthetic and data.dataset != 'cityscapes':
    raise ValueError(
        'config.data.synthetic writes a Cityscapes stand-in, but config.data.dataset is '
        f'{data.dataset!r}: set --config.data.synthetic=False and --config.data.manual_dir.')

  def prepare() -> None:
    if data.synthetic and not all((as_path(manual_dir) / z).exists()
                                  for z in cityscapes.CITYSCAPES_ZIPS):
      logging.info('Writing the synthetic Cityscapes stand-in to %s', manual_dir)
      synthetic.write_synthetic_cityscapes(
          manual_dir, num_train=data.synthetic_num_train, num_val=data.synthetic_num_val,
          num_test=data.synthetic_num_test, height=data.synthetic_height,
          width=data.synthetic_width, seed=data.synthetic_seed)
    pipeline.prepare_dataset(data.dataset, manual_dir, data_dir)
    return checks.load_or_take_census(data_dir, data.dataset, manual_dir)

  # Multi-host: process 0 prepares while the others wait, so that no two write one folder. The
  # others then find it prepared (a shared folder) or, where the folder is host-local, prepare
  # their own copy (synthetic data is a pure function of its seed).
  if jax.process_index() == 0:
    census = prepare()
  sharding_lib.sync('prepare_data')
  if jax.process_index() > 0:
    census = prepare()
  warnings = checks.check_labels(census, data.dataset, data.num_classes,
                                 data.unknown_label_tolerance)
  if training:
    warnings.append(checks.check_crop(census, data.train_split, data.crop_size, data.scales))
  for warning in filter(None, warnings):
    logging.warning('%s', warning)
  return data_dir


def train_iterator(config, data_dir: str, start_step: int, mesh: jax.sharding.Mesh | None = None,
                   **process) -> Iterator:
  """This process's rows of the global training batches of ``config.optim.batch_size``.

  With `mesh`, the rows its devices hold here (`sharding_lib.process_rows`); without, the
  `pipeline.make_train_iterator` keywords `process_index`, `process_count` (and `rows`) say
  whose rows (by default: this process's block).
  """
  from skd_jax.data import pipeline  # optional: TensorFlow (tf.data), where data is read
  data = config.data
  if mesh is not None:
    process = {'rows': sharding_lib.process_rows(mesh, config.optim.batch_size)}
  process.setdefault('process_index', jax.process_index())
  process.setdefault('process_count', jax.process_count())
  return pipeline.make_train_iterator(
      data_dir=data_dir, split=data.train_split,
      batch_size=config.optim.batch_size // process['process_count'],
      crop_size=tuple(data.crop_size), scales=tuple(data.scales) or None, flip=data.flip,
      normalization=data.normalization, seed=config.seed, start_step=start_step,
      dataset=data.dataset, **process)


def eval_iterator(config, data_dir: str, per_process_batch: int) -> Iterator:
  from skd_jax.data import pipeline  # optional: TensorFlow (tf.data), where data is read
  return pipeline.make_eval_iterator(
      data_dir=data_dir, split=config.data.eval_split, batch_size=per_process_batch,
      normalization=config.data.normalization, process_index=jax.process_index(),
      process_count=jax.process_count(), dataset=config.data.dataset,
      pad_size=tuple(config.data.eval_pad_size) or None)


def class_names(config) -> list[str]:
  """The class names of ``config.data.dataset``, index = train id."""
  return list(_dataset_info(config).class_names)


def palette(config) -> np.ndarray:
  """[C, 3] uint8 RGB colours of the classes of ``config.data.dataset``."""
  return np.asarray(_dataset_info(config).palette)


def _dataset_info(config):
  from skd_jax.data import datasets  # optional: TensorFlow (tfds builders of the registry)
  return datasets.get(config.data.dataset).info


# ---------------------------------------------------------------------------------------------
# The standalone evaluation.


def config_evaluator(model: nn.Module, mesh: jax.sharding.Mesh,
                     config: ml_collections.ConfigDict) -> Callable[..., np.ndarray]:
  """`evaluator.make_evaluator` with the config's classes, ignore label and inference."""
  return evaluator_lib.make_evaluator(model, mesh, num_classes=config.data.num_classes,
                                      ignore_label=config.data.ignore_label,
                                      **inference.inference_options(config))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                        checkpoint: str | None = None, which: str = 'student',
                        export_dir: str | None = None, export_color: bool = False
                        ) -> dict[str, Any]:
  """Evaluates a run's best (else latest) checkpoint, `checkpoint`, or the config's teacher.

  Uses the inference of ``config.eval`` (whole image, sliding window, scales, flip). With
  `export_dir`, also writes each image's prediction there as a Cityscapes label-id PNG (and, with
  `export_color`, a colour rendering to ``<export_dir>_color``); see
  `predictions.PredictionExporter`.
  """
  mesh = sharding_lib.make_mesh(shape=config.mesh)
  per_process_batch = sharding_lib.check_batch_size(config.eval.batch_size, mesh,
                                                    'eval.batch_size')
  data_dir = prepare_data(config, workdir, training=False)
  if which == 'teacher':
    model, variables = load_teacher(config)
    name = f'teacher {config.teacher.checkpoint}'
  else:
    path = checkpoint or workdir
    model, variables = load_model(config, config.student, path)
    name = f'student from {path}'
  # Kernels split over 'model' as in training (replicated when config.mesh.model is 1).
  variables = jax.device_put(variables, sharding_lib.model_parallel(variables, mesh))
  evaluate = config_evaluator(model, mesh, config)
  exporter = None
  if export_dir:
    from skd_jax import predictions  # optional: TensorFlow (tfds), for --export_dir only
    exporter = predictions.prediction_exporter(
        data_dir, config.data.eval_split, export_dir, dataset=config.data.dataset,
        num_classes=config.data.num_classes, color=export_color)
  from skd_jax.data import pipeline  # optional: TensorFlow (tfds), where data is read
  confusion = evaluate(variables, eval_iterator(config, data_dir, per_process_batch),
                       on_predictions=exporter)
  metrics = evaluator_lib.metrics_from_confusion(
      confusion, class_names(config), ignore_absent_classes=config.eval.ignore_absent_classes)
  # Each process wrote the images of its own rows.
  num_exported = int(sharding_lib.gather_to_all(
      {'n': np.array([exporter.num_written if exporter else 0])})['n'].sum())
  return {'metrics': metrics, 'name': name, 'split': config.data.eval_split,
          'num_images': pipeline.num_examples(data_dir, config.data.eval_split,
                                              config.data.dataset),
          'inference': inference.InferenceMode(**inference.inference_options(config)).describe(),
          'confusion': confusion,
          'export_dir': str(exporter.export_dir) if exporter else None,
          'color_dir': str(exporter.color_dir) if exporter and exporter.color_dir else None,
          'num_exported': num_exported}


def evaluate_and_report(config: ml_collections.ConfigDict, workdir: str, *,
                        checkpoint: str | None = None, which: str = 'student',
                        export_dir: str | None = None, export_color: bool = False) -> None:
  """`python -m skd_jax.evaluate`: `evaluate_checkpoint`, then (process 0) prints the table and
  writes it to ``WORKDIR/eval_<which>_<split>.json``."""
  workdir = as_path(workdir)
  start = time.time()
  result = evaluate_checkpoint(config, workdir, checkpoint=checkpoint, which=which,
                               export_dir=export_dir, export_color=export_color)
  if jax.process_index() != 0:
    return
  print(evaluator_lib.format_table(result['metrics'], f'{result["name"]} on {result["split"]} '
                     f'({result["num_images"]} images, {result["inference"]}, '
                     f'{time.time() - start:.0f} s):'))
  if result['split'].startswith('test'):
    print('(the Cityscapes test labels are placeholders: these scores mean nothing; submit the '
          'exported PNGs to the server instead)')
  if result.get('export_dir'):
    print(f'wrote {result["num_exported"]} label-id PNGs to {result["export_dir"]}'
          + (f' and colour PNGs to {result["color_dir"]}' if result.get('color_dir') else ''))
  out = workdir / f'eval_{which}_{result["split"]}.json'
  workdir.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(result['metrics'], inference=result['inference'],
                                 confusion_matrix=result['confusion'].tolist()), indent=2))
  print(f'wrote {out}')
