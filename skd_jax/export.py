r"""Exports a network for serving, as artefacts that need neither skd_jax nor Flax to run.

    python -m skd_jax.export --config=configs/cityscapes.py --checkpoint=runs/skd_r18 \
        --out=exports/skd_r18_serving [--model=student|teacher] [--input_shape=b,h,w] \
        [--formats=jax,saved_model] [--platforms=cpu,cuda,tpu]

The network of ``--checkpoint`` (a run's workdir: its best checkpoint, else its latest; a step
folder; an export of `skd_jax.convert`; or a PyTorch .pth; ``--model=teacher`` defaults to
``config.teacher.checkpoint``) becomes one function

    images uint8 [N, H, W, 3] RGB, 0..255  ->  {'labels': int32 [N, H, W] train ids,
                                                'logits': float32 [N, H, W, C]}

with the config's normalisation (``data.normalization``), its evaluation inference
(``config.eval``: by default the whole image, logits at 1/8 upsampled with align_corners=True to
the input size; `inference.predict` itself is traced) and the argmax inside. Each of N, H, W is a
fixed size or a symbolic one (``--input_shape=b,h,w``, the default, takes any batch and image
size; ``1,1024,2048`` fixes all three). OUT receives:

  jax_exported.bin  the `jax.export` serialisation (StableHLO, weights inside), for JAX alone:
                        exported = jax.export.deserialize(bytearray(open(path, 'rb').read()))
                        outputs = exported.call(images)
  saved_model/      a TensorFlow SavedModel made by `jax2tf` (the same StableHLO in one
                    XlaCallModule op, the weights as variables), signature 'serving_default':
                        model = tf.saved_model.load(path)
                        outputs = model.signatures['serving_default'](images=images)
                    for TensorFlow Serving, or `tf.lite.TFLiteConverter.from_saved_model`;
  model.json        class names, palette, input and output specs, normalisation, inference mode,
                    the network and the checkpoint it came from.

Both artefacts run on the platforms they were lowered for (``--platforms``). A symbolic H or W
needs a single-scale inference without sliding window: tiles and scaled sizes are computed from
the image size while tracing. The TFLite converter needs fixed N, H, W (it cannot lower the
argmax over a dynamic shape); with them, its model gives the SavedModel's labels (tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
import jax  # pylint: disable=g-import-not-at-top
from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from skd_jax import cli  # pylint: disable=g-import-not-at-top
from skd_jax import experiment  # pylint: disable=g-import-not-at-top
from skd_jax import inference  # pylint: disable=g-import-not-at-top
from skd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from skd_jax.paths import as_path  # pylint: disable=g-import-not-at-top

FORMATS = ('jax', 'saved_model')
PLATFORMS = ('cpu', 'cuda', 'tpu')
JAX_FILE = 'jax_exported.bin'
SAVED_MODEL_DIR = 'saved_model'
METADATA_FILE = 'model.json'
# An input size: a positive int, or a name for a symbolic one.
_DIM_RE = re.compile(r'^([1-9][0-9]*|[A-Za-z_][A-Za-z0-9_]*)$')

# What one call of the exported function computes: (variables, images uint8 [N, H, W, 3]) ->
# {'labels': int32 [N, H, W], 'logits': float32 [N, H, W, C]}.
ServeFn = Callable[[Any, jax.Array], dict[str, jax.Array]]


def normalize(images: jax.Array, normalization: str) -> jax.Array:
  """`pipeline.normalize` in JAX: RGB [..., 3] uint8 (0..255) -> float32 [..., 3]."""
  x = images.astype(jnp.float32)
  if normalization == 'caffe_bgr':
    return x[..., ::-1] - jnp.asarray(pipeline.CAFFE_BGR_MEAN, jnp.float32)
  if normalization == 'imagenet_rgb':
    return ((x / 255.0 - jnp.asarray(pipeline.IMAGENET_RGB_MEAN, jnp.float32))
            / jnp.asarray(pipeline.IMAGENET_RGB_STD, jnp.float32))
  raise ValueError(f'unknown data.normalization {normalization!r}, expected one of '
                   f'{pipeline.NORMALIZATIONS}')


def serving_fn(model, normalization: str, mode: inference.InferenceMode) -> ServeFn:
  """The exported computation: normalise, `inference.predict` at the input size, argmax."""
  def serve(variables, images):
    logits = inference.predict(model, variables, normalize(images, normalization),
                              images.shape[1:3], mode)
    return {'labels': jnp.argmax(logits, axis=-1).astype(jnp.int32), 'logits': logits}
  return serve


def without_aux_head(model, variables):
  """The network and its variables without the auxiliary head, which inference never reads."""
  if getattr(model, 'aux_channels', None) is None:
    return model, variables
  return model.clone(aux_channels=None), {
      collection: {k: v for k, v in tree.items() if k != 'aux_head'}
      for collection, tree in variables.items()}


def parse_input_shape(text: str) -> str:
  """``N,H,W`` (each a positive int or a name) -> the input spec ``'N, H, W, 3'``."""
  dims = [d.strip() for d in text.split(',')]
  if len(dims) != 3 or not all(_DIM_RE.match(d) for d in dims):
    raise ValueError(f'--input_shape={text!r}: give N,H,W, each a positive int or a name for a '
                     f'symbolic size, e.g. --input_shape=b,h,w or --input_shape=1,1024,2048')
  return ', '.join(dims + ['3'])


def check_inference(mode: inference.InferenceMode, spec: str) -> None:
  """A ValueError when `mode` needs the image size that `spec` leaves symbolic."""
  if not any(map(jax.export.is_symbolic_dim, jax.export.symbolic_shape(spec)[1:3])):
    return
  if mode.sliding_window or mode.scales != (1.0,):
    raise ValueError(
        f'the config\'s inference ({mode.describe()}) needs a fixed image size: export with '
        f'fixed H, W (e.g. --input_shape=b,1024,2048), or single-scale whole-image inference '
        f'(--config.eval.sliding_window=False --config.eval.scales="(1.0,)").')


def export_jax(serve: ServeFn, variables, spec: str, platforms: Sequence[str]) -> bytearray:
  """The `jax.export` serialisation of `serve` with `variables` built in."""
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec), jnp.uint8)
  exported = jax.export.export(jax.jit(lambda x: serve(variables, x)),
                               platforms=tuple(platforms))(images)
  return exported.serialize()


def export_saved_model(serve: ServeFn, variables, spec: str, platforms: Sequence[str],
                       directory) -> None:
  """A SavedModel of `serve` (jax2tf), the variables as TF variables, at `directory`."""
  tf_variables = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), variables)
  serve_tf = jax2tf.convert(serve, polymorphic_shapes=[None, f'({spec})'],
                            native_serialization_platforms=tuple(platforms),
                            with_gradient=False)   # serving only; gradients do not lower
  shape = [None if jax.export.is_symbolic_dim(d) else d for d in jax.export.symbolic_shape(spec)]
  module = tf.Module()
  module.variables_ = tf_variables
  module.serve = tf.function(
      lambda images: serve_tf(tf_variables, images), autograph=False,
      input_signature=[tf.TensorSpec(shape, tf.uint8, name='images')])
  tf.saved_model.save(module, os.fspath(directory),
                      signatures={'serving_default': module.serve})


def metadata(config: ml_collections.ConfigDict, model, which: str, checkpoint: str, spec: str,
             mode: inference.InferenceMode, files: dict[str, str],
             platforms: Sequence[str]) -> dict[str, Any]:
  """What a client needs beside the artefact: classes, colours, input and output specs."""
  info = pipeline.dataset_info(config.data.dataset)
  num_classes = config.data.num_classes
  names = list(info.class_names) if len(info.class_names) == num_classes else [
      str(c) for c in range(num_classes)]
  shape = [str(d) if jax.export.is_symbolic_dim(d) else d for d in jax.export.symbolic_shape(spec)]
  return {
      'network': dict(network_fields(model), which=which, checkpoint=checkpoint),
      'dataset': config.data.dataset,
      'class_names': names,
      'palette': np.asarray(info.palette).tolist() if len(info.palette) == num_classes else None,
      'input': {'name': 'images', 'dtype': 'uint8', 'shape': shape,
                'layout': 'NHWC, RGB, 0..255 (the file\'s pixels, not normalised)'},
      'normalization': config.data.normalization,
      'inference': mode.describe(),
      'outputs': {
          'labels': {'dtype': 'int32', 'shape': shape[:3],
                     'meaning': 'argmax of the logits: train ids 0..C-1, index into class_names'},
          'logits': {'dtype': 'float32', 'shape': shape[:3] + [num_classes],
                     'meaning': 'class scores at the input size (before softmax)'}},
      'files': files,
      'platforms': list(platforms),
      'jax_version': jax.__version__,
  }


def network_fields(model) -> dict[str, Any]:
  """The network's definition: its module class and every field (depth, head, widths, ...)."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ('parent', 'name')}
  return {'module': type(model).__name__, **{
      k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
      for k, v in fields.items()}}


def writable_dir(path: str):
  """`path` as a folder that exists and takes files, else a ValueError saying so."""
  out = as_path(path)
  probe = out / '.skd_jax_export_probe'
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'--out={path}: cannot write there ({e.strerror or e}); give a folder you '
                     f'can create and write to.') from None
  return out


def export_model(config: ml_collections.ConfigDict, out: str, *, checkpoint: str | None = None,
                 which: str = 'student', input_shape: str = 'b,h,w',
                 formats: Sequence[str] = FORMATS, platforms: Sequence[str] = PLATFORMS
                 ) -> dict[str, Any]:
  """Writes the artefacts of `formats` and model.json to `out`; returns the metadata.

  Every argument is checked before the checkpoint is read; a bad one is a ValueError (a missing
  checkpoint a FileNotFoundError) whose message names it and the fix.
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ValueError(f'--formats={",".join(formats)}: unknown format(s) {unknown}; choose from '
                     f'{", ".join(FORMATS)}')
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f'--platforms={",".join(platforms)}: unknown platform(s) {unknown}; choose '
                     f'from {", ".join(PLATFORMS)}')
  if which not in ('student', 'teacher'):
    raise ValueError(f'--model={which}: expected student or teacher')
  spec = parse_input_shape(input_shape)
  mode = inference.InferenceMode(**inference.inference_options(config))
  check_inference(mode, spec)
  if config.data.normalization not in pipeline.NORMALIZATIONS:
    raise ValueError(f'unknown data.normalization {config.data.normalization!r}, expected one of '
                     f'{pipeline.NORMALIZATIONS}')
  checkpoint = checkpoint or (config.teacher.checkpoint if which == 'teacher' else '')
  if not checkpoint:
    raise ValueError('give the network to export: --checkpoint=a run\'s workdir, a step folder, '
                     'an export of `python -m skd_jax.convert` or a .pth file')
  out_dir = writable_dir(out)

  model, variables = without_aux_head(*experiment.load_model(config, config[which], checkpoint))
  serve = serving_fn(model, config.data.normalization, mode)
  files = {}
  if 'jax' in formats:
    start = time.perf_counter()
    (out_dir / JAX_FILE).write_bytes(bytes(export_jax(serve, variables, spec, platforms)))
    logging.info('jax.export: %.1f s', time.perf_counter() - start)
    files['jax'] = JAX_FILE
  if 'saved_model' in formats:
    start = time.perf_counter()
    export_saved_model(serve, variables, spec, platforms, out_dir / SAVED_MODEL_DIR)
    logging.info('jax2tf SavedModel: %.1f s', time.perf_counter() - start)
    files['saved_model'] = SAVED_MODEL_DIR
  meta = metadata(config, model, which, str(checkpoint), spec, mode, files, platforms)
  (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2))
  return meta


def export_and_report() -> None:
  """The program: exports as the flags say and prints what it wrote."""
  fl = flags.FLAGS
  meta = export_model(fl.config, fl.out, checkpoint=fl.checkpoint, which=fl.model,
                      input_shape=fl.input_shape, formats=fl.formats, platforms=fl.platforms)
  out = as_path(fl.out)
  net = meta['network']
  print(f'{net["which"]}: {net["module"]} depth {net.get("depth")}, {net.get("head")} head, width '
        f'x{net.get("width_multiplier")} from {net["checkpoint"]}'
        f': uint8 RGB [{", ".join(map(str, meta["input"]["shape"]))}] -> labels, logits '
        f'({meta["normalization"]} normalisation, {meta["inference"]}; for '
        f'{", ".join(meta["platforms"])})')
  for name in list(meta['files'].values()) + [METADATA_FILE]:
    path = os.fspath(out / name)
    files = [os.path.join(root, f) for root, _, names in tf.io.gfile.walk(path) for f in names]
    size = sum(tf.io.gfile.stat(f).length for f in files or [path])
    print(f'wrote {path} ({size / 2**20:.1f} MiB)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.run(export_and_report)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('checkpoint', None,
                      'The network: a run\'s workdir (its best checkpoint, else its latest), a '
                      'step folder, an export of skd_jax.convert, or a PyTorch .pth. Default with '
                      '--model=teacher: config.teacher.checkpoint.')
  flags.DEFINE_string('out', None, 'Folder for jax_exported.bin, saved_model/ and model.json.')
  flags.DEFINE_enum('model', 'student', ['student', 'teacher'],
                    'Which config section describes the network (its architecture where the '
                    'checkpoint does not record it).')
  flags.DEFINE_string('input_shape', 'b,h,w',
                      'N,H,W of the uint8 RGB input: each a positive int, or a name for a '
                      'symbolic size (any value at run time).')
  flags.DEFINE_list('formats', list(FORMATS), f'Artefacts to write: {", ".join(FORMATS)}.')
  flags.DEFINE_list('platforms', list(PLATFORMS),
                    f'Platforms the artefacts run on: {", ".join(PLATFORMS)}.')
  cli.define_multihost_flags()
  flags.adopt_module_key_flags(cli)   # the multi-host flags in --help
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main)
