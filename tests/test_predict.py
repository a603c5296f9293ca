"""skd_jax.predict: the real command on a folder of mixed sizes and formats with unreadable files.

The expected outputs are computed here without predict_lib: each image decoded by Pillow, normalised
by the input pipeline's TensorFlow `normalize`, predicted alone (batch 1) by `inference.predict`
and argmaxed; the colour mask is a NumPy palette lookup, the overlay a NumPy blend, the label ids
a lookup in the dataset's table.
"""

import functools
import io
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from skd_jax import checkpoint as ckpt_lib
from skd_jax import cli
from skd_jax import experiment
from skd_jax import export
from skd_jax import inference
from skd_jax import predict_lib
from skd_jax import torch_convert
from skd_jax.data import ade20k
from skd_jax.data import cityscapes
from skd_jax.data import pipeline
from skd_jax.models import create_segmenter
from test_export import random_student
from test_train import ROOT, load_test_config

# Good images: name -> (height, width, Pillow mode); three sizes, JPEG and PNG, one grey file, one
# in a subfolder. With --batch_size=2 the 40x56 pair shares a batch, 33x47 too, 64x64 is alone.
GOOD = {'a.png': (40, 56, 'RGB'), 'b.jpg': (40, 56, 'RGB'), 'sub/c.png': (33, 47, 'RGB'),
        'e.png': (33, 47, 'L'), 'd.jpg': (64, 64, 'RGB')}
# Not an image at all; a PNG cut short (its header reads, the size does not); a JPEG cut in its
# pixel data (the size reads, the pixels do not).
BAD = ('bad.jpg', 'truncated.png', 'cut.jpg')
OPACITY = 0.3
PARITY_PTH = pathlib.Path(__file__).parent / 'data' / 'parity' / 'skd_student_r18.pth'
PARITY_CLASSES = 5   # tests/data/parity/manifest.json
# Logits of the same image, batch 1 here and a padded batch of 2 in the program, differ by float32
# rounding: measured max |difference| / max |logit| 3.0e-7 over GOOD (0 labels differed; 1 pixel of
# 11678 had its two best classes closer than the bar). A pixel that close may take either label;
# all others must agree. The bar is 33x the measured difference.
LOGIT_RTOL = 1e-5


def write_images(folder: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  for name, (h, w, mode) in GOOD.items():
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
  (folder / 'bad.jpg').write_text('this is not a JPEG')
  for name in ('truncated.png', 'cut.jpg'):
    whole = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
        whole, format=name.split('.')[1].replace('jpg', 'jpeg'))
    (folder / name).write_bytes(whole.getvalue()[:len(whole.getvalue()) * 3 // 4])
  (folder / 'notes.txt').write_text('not an image: left out of a folder')


def save_workdir(workdir: pathlib.Path, config, best, latest) -> None:
  """A training workdir whose best/ holds `best`'s variables and checkpoints/ (a later step)
  `latest`'s, in the layout `train` writes (a TrainState dict's student fields, and meta)."""
  for folder, step, variables in (('best', 3, best), ('checkpoints', 6, latest)):
    manager = ckpt_lib.open_manager(workdir / folder)
    state = {'student_params': variables['params'],
             'student_batch_stats': variables['batch_stats']}
    ckpt_lib.save_train_state(manager, step, state, dict(experiment.model_metadata(config), step=step))
    ckpt_lib.finish_saves(manager)


def run_predict(*args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'skd_jax.predict', *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


@functools.partial(jax.jit, static_argnums=0)
def evaluate_logits(model, variables, images):
  """`inference.predict` at the images' own size, with the default (whole-image) inference."""
  return inference.predict(model, variables, images, images.shape[1:3])


def reference_labels(model, variables, path: pathlib.Path, normalization='caffe_bgr'):
  """(labels [H, W], logits [H, W, C]) of one image, predicted alone (see the module docstring)."""
  photo = np.asarray(Image.open(path).convert('RGB'))
  x = pipeline.normalize(photo[None], normalization).numpy()
  logits = np.asarray(evaluate_logits(model, variables, x))[0]
  return logits.argmax(-1), logits, photo


def assert_labels_match(got: np.ndarray, want: np.ndarray, logits: np.ndarray) -> None:
  assert got.shape == want.shape
  top2 = np.sort(logits, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 2 * LOGIT_RTOL * np.abs(logits).max()
  assert decided.mean() > 0.99
  np.testing.assert_array_equal(got[decided], want[decided])


def read_png(path: pathlib.Path) -> np.ndarray:
  return np.asarray(Image.open(path))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  config = load_test_config()
  model, variables = random_student(config, seed=0)
  # The latest checkpoint: another network (the best one must be used).
  rng = np.random.default_rng(1)
  other = dict(variables, params=jax.tree.map(
      lambda x: np.asarray(x) + rng.normal(0, 0.5, x.shape).astype(x.dtype), variables['params']))
  save_workdir(root / 'workdir', config, best=variables, latest=other)
  ckpt_lib.save_variables(root / 'weights', variables, metadata=experiment.model_metadata(config))
  export.export_model(config, str(root / 'export'), checkpoint=str(root / 'weights'),
                      formats=('jax',), platforms=('cpu',))
  images = root / 'images'
  write_images(images)
  model, variables = export.without_aux_head(model, variables)
  expected = {name: reference_labels(model, variables, images / name) for name in GOOD}
  return {'root': root, 'images': images, 'expected': expected}


def check_run(run, out: pathlib.Path, images: pathlib.Path, names, bad) -> None:
  """Exit status 2, each bad file named on a skipped line, the error line counting them."""
  assert run.returncode == 2, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  for name in bad:
    assert f'skipped {images / name}: cannot read the image' in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {len(bad)} of {len(names) + len(bad)} images could not be '
                         f'predicted and were skipped'), last
  assert f'the other {len(names)} were written to {out}' in last
  assert f'{len(names) + len(bad)}/{len(names) + len(bad)} images ({len(bad)} failed)' in run.stdout
  written = sorted(str(p.relative_to(out)) for p in out.rglob('*.png'))
  assert written == sorted(f'{d}/{os.path.splitext(n)[0]}.png' for d in predict_lib.OUTPUT_DIRS
                           for n in names)


def test_workdir_folder_mixed_sizes_and_unreadable_files(setup):
  out = setup['root'] / 'out_workdir'
  run = run_predict('--config=configs/test.py', f'--checkpoint={setup["root"] / "workdir"}',
                    f'--out={out}', f'--opacity={OPACITY}', '--batch_size=2', setup['images'])
  check_run(run, out, setup['images'], GOOD, BAD)
  assert 'bad.jpg: cannot read the image (not an image file that Pillow can decode)' in run.stderr
  assert 'cut.jpg: cannot read the image (image file is truncated' in run.stderr
  for name, (want, logits, photo) in setup['expected'].items():
    stem = os.path.splitext(name)[0]
    labels = read_png(out / 'labels' / f'{stem}.png')
    assert labels.dtype == np.uint8 and labels.ndim == 2
    assert_labels_match(labels, want, logits)
    # The colour mask and the overlay are of the program's own labels.
    mask = cityscapes.PALETTE[labels]
    np.testing.assert_array_equal(read_png(out / 'color' / f'{stem}.png'), mask)
    blend = (1 - OPACITY) * photo.astype(np.float64) + OPACITY * mask
    overlay = read_png(out / 'overlay' / f'{stem}.png').astype(np.float64)
    assert overlay.shape == photo.shape
    assert np.abs(overlay - blend).max() <= 1.0   # uint8 rounding


def test_export_folder_glob_with_label_ids(setup):
  out = setup['root'] / 'out_export'
  # No --config: the export carries normalisation, inference and classes.
  run = run_predict(f'--checkpoint={setup["root"] / "export"}', f'--out={out}', '--label_ids',
                    f'--input={setup["images"]}/*.png')
  names = [n for n in GOOD if n.endswith('.png') and '/' not in n]
  check_run(run, out, setup['images'], names, ['truncated.png'])
  for name in names:
    want, logits, _ = setup['expected'][name]
    label_ids = read_png(out / 'labels' / f'{os.path.splitext(name)[0]}.png')
    decided_train_ids = cityscapes.LABEL_ID_TO_TRAIN_ID[label_ids]
    assert set(np.unique(label_ids)) <= set(cityscapes.TRAIN_ID_TO_LABEL_ID)
    assert_labels_match(decided_train_ids, want, logits)
    np.testing.assert_array_equal(
        label_ids, cityscapes.TRAIN_ID_TO_LABEL_ID[decided_train_ids])


def test_pytorch_checkpoint_converted_on_the_fly(tmp_path, setup):
  out = tmp_path / 'out'
  image = setup['images'] / 'sub' / 'c.png'
  run = run_predict('--config=configs/test.py', f'--config.data.num_classes={PARITY_CLASSES}',
                    f'--checkpoint={PARITY_PTH}', f'--out={out}', image)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '1/1 images (0 failed)' in run.stdout
  config = load_test_config()
  variables, overrides = torch_convert.load_torch_variables(str(PARITY_PTH), 'pspnet_resnet18',
                                                      PARITY_CLASSES, width_multiplier=1 / 16)
  model = create_segmenter('pspnet_resnet18', PARITY_CLASSES, **overrides)
  want, logits, _ = reference_labels(model, variables, image, config.data.normalization)
  labels = read_png(out / 'labels' / 'c.png')
  assert_labels_match(labels, want, logits)
  # The Cityscapes palette has 19 colours: 5 classes get 5 distinct generated ones.
  mask = read_png(out / 'color' / 'c.png')
  colours = {tuple(mask[labels == c][0]) for c in np.unique(labels)}
  assert len(colours) == len(np.unique(labels))


def test_config_inference_mode_sliding_window_and_flip(setup, tmp_path):
  # In process, on one image: the config's sliding window (32x32 tiles on 40x56: 2 x 3 tiles,
  # overlapping) and flip, as evaluate's; its whole-image labels differ (checked below).
  config = load_test_config()
  config.eval.sliding_window, config.eval.crop_size, config.eval.flip = True, (32, 32), True
  image = setup['images'] / 'a.png'
  result = predict_lib.predict_images([str(image)], str(tmp_path), config=config,
                                      checkpoint=str(setup['root'] / 'weights'))
  assert result == {'written': 1, 'failed': []}
  model, variables = export.without_aux_head(*random_student(load_test_config(), seed=0))
  mode = inference.InferenceMode(**inference.inference_options(config))
  photo = np.asarray(Image.open(image).convert('RGB'))
  x = pipeline.normalize(photo[None], config.data.normalization).numpy()
  logits = np.asarray(jax.jit(lambda v, x: inference.predict(model, v, x, x.shape[1:3], mode))(
      variables, x))[0]
  labels = read_png(tmp_path / 'labels' / 'a.png')
  assert_labels_match(labels, logits.argmax(-1), logits)
  assert (labels != setup['expected']['a.png'][0]).mean() > 0.05


def test_fixed_size_export_skips_other_sizes(setup, tmp_path):
  export.export_model(load_test_config(), str(tmp_path / 'fixed'),
                      checkpoint=str(setup['root'] / 'weights'), input_shape='1,40,56',
                      formats=('jax',), platforms=('cpu',))
  names = ['a.png', 'b.jpg', 'd.jpg']
  with pytest.raises(predict_lib.ImagesFailed, match=r'^1 of 3 images could not be predicted'):
    predict_lib.predict_images([str(setup['images'] / n) for n in names], str(tmp_path / 'out'),
                               checkpoint=str(tmp_path / 'fixed'))
  for name in names[:2]:   # 40x56: predicted one at a time (the export's batch is 1)
    want, logits, _ = setup['expected'][name]
    labels = read_png(tmp_path / 'out' / 'labels' / f'{os.path.splitext(name)[0]}.png')
    assert_labels_match(labels, want, logits)
  assert not (tmp_path / 'out' / 'labels' / 'd.png').exists()


def test_unknown_model_source_is_one_error_line(setup):
  out = setup['root'] / 'never_written'
  run = run_predict(f'--checkpoint={setup["root"] / "no_such_run"}', f'--out={out}',
                    setup['images'])
  assert run.returncode == 1
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: --checkpoint={setup["root"] / "no_such_run"}: no such file or '
                         f'folder'), run.stderr[-2000:]
  assert 'Traceback' not in run.stderr and not out.exists()


@pytest.mark.parametrize('inputs,flags,message', [
    ([], {}, 'give the images to predict'),
    (['{images}/*.gif'], {}, '--input={images}/*.gif: the pattern matches no file'),
    (['{images}/none'], {}, '--input={images}/none: no such file or folder'),
    (['{images}'], dict(checkpoint='{root}/weights'),
     '--checkpoint={root}/weights is a network\'s weights: give its training config'),
    (['{images}'], dict(opacity=1.5), '--opacity=1.5'),
])
def test_bad_flags_are_named_before_anything_is_written(setup, inputs, flags, message):
  # In process: the same ValueError that the command above turns into its one line.
  fill = lambda s: s.format(root=setup['root'], images=setup['images'])
  flags = dict(dict(checkpoint=str(setup['root'] / 'export')), **flags)
  flags = {k: fill(v) if isinstance(v, str) else v for k, v in flags.items()}
  out = setup['root'] / 'never_written'
  with pytest.raises(ValueError) as info:
    predict_lib.predict_images([fill(i) for i in inputs], str(out), **flags)
  line = cli.error_line(info.value)
  assert line.startswith(f'error: {fill(message)}') and '\n' not in line, line
  assert not out.exists()


def test_label_id_tables_invert_the_datasets():
  np.testing.assert_array_equal(predict_lib.label_id_table('cityscapes', 19),
                                cityscapes.TRAIN_ID_TO_LABEL_ID)
  # ADE20K stores 0 as "other" and class k as k + 1.
  np.testing.assert_array_equal(predict_lib.label_id_table('ade20k', ade20k.NUM_CLASSES),
                                np.arange(1, ade20k.NUM_CLASSES + 1))
  with pytest.raises(ValueError, match='--label_ids: the cityscapes table has no label id'):
    predict_lib.label_id_table('cityscapes', 20)


def test_batches_hold_one_size_and_pad_to_powers_of_two():
  images = [predict_lib.InputImage(str(i), str(i)) for i in range(7)]
  sizes = [(4, 5), (6, 5), (4, 5), (4, 5), (6, 5), (4, 5), (4, 5)]
  batches = predict_lib.size_batches(list(zip(images, sizes)), 3)
  assert [[int(i.name) for i in b] for b in batches] == [[0, 2, 3], [5, 6], [1, 4]]
  assert [predict_lib.batch_rows(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  assert predict_lib.batch_rows(3, 3) == 3


def test_outputs_that_would_collide_are_refused(tmp_path):
  for name in ('x.jpg', 'x.png'):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
  with pytest.raises(ValueError, match=r'x.jpg and .*x.png would both be written as x.png'):
    predict_lib.find_images([str(tmp_path)])
  # The same file through two inputs is predicted once.
  assert len(predict_lib.find_images([str(tmp_path / 'x.png'), str(tmp_path / '*.png')])) == 1


def test_generated_palette_colours_are_distinct():
  palette = predict_lib.generated_palette(256)
  assert len({tuple(c) for c in palette}) == 256 and tuple(palette[0]) == (0, 0, 0)
