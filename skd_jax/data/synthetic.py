"""A procedural street-scene dataset, written in the real Cityscapes on-disk format.

It exists so that the whole path of the real data (manual zips -> the tfds `cityscapes` builder ->
tf.data -> training and evaluation) runs on a laptop, offline, in seconds, and so that a small
model can actually learn something measurable on it.

Layout written (exactly that of the two official archives; city folder names lower case, as the
tfds builder's file-name pattern requires):

    leftImg8bit_trainvaltest.zip
      leftImg8bit/{train,val,test}/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png   RGB
    gtFine_trainvaltest.zip
      gtFine/{train,val,test}/<city>/<city>_<seq:06d>_<frame:06d>_gtFine_labelIds.png  8-bit grey

The labels are raw Cityscapes label ids (0..33), ignored ids included (unlabeled, ego vehicle,
static, parking, ...), so the id -> train-id map is exercised. The builder reads only
`*_gtFine_labelIds.png`; the official archive's `_color`, `_instanceIds` and `_polygons.json`
files are not written.

Scenes: sky, buildings with windows, trees, a road in perspective with lane marks, sidewalks,
terrain, cars (trucks, buses), persons (riders on bicycles), poles with traffic signs and lights,
and ignored regions. Colour alone does not solve the task: every class's colour is drawn per
instance from a range that overlaps other classes' ranges (grey road / sidewalk / building /
overcast sky / poles, green vegetation / terrain, any colour for vehicles and clothes), and every
image gets its own illumination, white balance, shading gradient, cast shadows, texture, noise and
blur.

Usage:
  python -m skd_jax.data.synthetic --out=/tmp/cityscapes_manual --num_train=200 --num_val=50
  python -m skd_jax.data.synthetic --out=DIR --data_dir=DIR2   # also prepare with tfds
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import time
import zipfile
from typing import Iterable, Iterator

from absl import app, flags
import numpy as np
from PIL import Image
from PIL import ImageFilter

from skd_jax.data import cityscapes
from skd_jax.data import pipeline


SPLITS = ('train', 'val', 'test')
# Real Cityscapes city names of each split, so that file names look exactly like the real ones.
CITIES = {
    'train': ('aachen', 'bochum', 'bremen', 'cologne'),
    'val': ('frankfurt', 'lindau', 'munster'),
    'test': ('berlin', 'bielefeld', 'bonn'),
}
# A fixed timestamp in the zip entries, so that the archives are byte-identical for a seed.
_ZIP_DATE_TIME = (2016, 2, 1, 0, 0, 0)
_README = b"""Synthetic street scenes in the Cityscapes layout, written by skd_jax.data.synthetic.
Not the Cityscapes dataset: see https://www.cityscapes-dataset.com for the real one.
"""

_ID = cityscapes.LABEL_IDS


@dataclasses.dataclass(frozen=True)
class Example:
  """One image and its label map, with the names that place it in the archives.

  Attributes:
    split: 'train', 'val' or 'test'.
    city: lower-case city name.
    seq: sequence number (6 digits in the file name).
    frame: frame number (6 digits in the file name).
    image: [H, W, 3] uint8 RGB.
    label_ids: [H, W] uint8 raw Cityscapes label ids.
  """
  split: str
  city: str
  seq: int
  frame: int
  image: np.ndarray
  label_ids: np.ndarray

  @property
  def image_id(self) -> str:
    return f'{self.city}_{self.seq:06d}_{self.frame:06d}'


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
  """Where `write_synthetic_cityscapes` wrote its archives, and how many images per split."""
  manual_dir: str
  left_img_zip: str
  gt_fine_zip: str
  num_examples: dict[str, int]


def _png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # compress_level 1: the archives are scratch data, and level 6 costs ~3x the time of level 1.
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def write_cityscapes_zips(manual_dir: str, examples: Iterable[Example]) -> tuple[str, str]:
  """Writes images and label-id maps as the two official Cityscapes archives.

  Args:
    manual_dir: directory to write `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip`
      into (created if missing; existing archives are replaced).
    examples: the images, consumed once (a generator is fine: nothing is held in memory).

  Returns:
    (path of leftImg8bit_trainvaltest.zip, path of gtFine_trainvaltest.zip).
  """
  os.makedirs(manual_dir, exist_ok=True)
  left_path = os.path.join(manual_dir, cityscapes.LEFT_IMAGE_ZIP)
  gt_path = os.path.join(manual_dir, cityscapes.GT_FINE_ZIP)
  # Written under temporary names and renamed at the end, so that an interrupted run never leaves
  # a truncated archive with the official name.
  left_tmp, gt_tmp = left_path + '.partial', gt_path + '.partial'

  def add(archive: zipfile.ZipFile, name: str, data: bytes):
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.external_attr = 0o644 << 16
    # PNG data is already deflated: storing it is as small and much faster.
    archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)

  with zipfile.ZipFile(left_tmp, 'w') as left_zip, zipfile.ZipFile(gt_tmp, 'w') as gt_zip:
    add(left_zip, 'README', _README)
    add(gt_zip, 'README', _README)
    for ex in examples:
      if ex.split not in SPLITS:
        raise ValueError(f'unknown split {ex.split!r}')
      if ex.image.dtype != np.uint8 or ex.image.ndim != 3 or ex.image.shape[-1] != 3:
        raise ValueError(f'image must be [H, W, 3] uint8, got {ex.image.shape} {ex.image.dtype}')
      if ex.label_ids.dtype != np.uint8 or ex.label_ids.shape != ex.image.shape[:2]:
        raise ValueError(f'label_ids must be [H, W] uint8, got {ex.label_ids.shape} '
                         f'{ex.label_ids.dtype} for an image of {ex.image.shape}')
      stem = f'{ex.split}/{ex.city}/{ex.image_id}'
      add(left_zip, f'leftImg8bit/{stem}_leftImg8bit.png', _png_bytes(ex.image))
      add(gt_zip, f'gtFine/{stem}_gtFine_labelIds.png', _png_bytes(ex.label_ids))
  os.replace(left_tmp, left_path)
  os.replace(gt_tmp, gt_path)
  return left_path, gt_path


# ---------------------------------------------------------------------------------------------
# Scene rendering. Everything works on one [H, W] canvas with NumPy masks; objects are painted
# back to front (far to near), so nearer objects occlude farther ones in image and label alike.


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  yy.flags.writeable = False
  xx.flags.writeable = False
  return yy, xx


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
  """Low-frequency noise [H, W] float32 in about [-1, 1]: random cells, bilinearly upsampled."""
  small = rng.uniform(-1.0, 1.0, size=(max(2, height // cell + 2), max(2, width // cell + 2)))
  image = Image.fromarray(small.astype(np.float32), mode='F')
  return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)


class _Canvas:
  """The label map, the colour image and the per-pixel texture amplitude being painted."""

  def __init__(self, rng: np.random.Generator, height: int, width: int):
    self.rng = rng
    self.h, self.w = height, width
    self.yy, self.xx = _grid(height, width)
    self.label = np.zeros((height, width), np.uint8)  # 0 = unlabeled until painted.
    self.color = np.zeros((height, width, 3), np.float32)
    self.texture = np.zeros((height, width), np.float32)  # std of the per-pixel grain.

  def paint(self, mask: np.ndarray, label_id: int, color, texture: float = 6.0,
            box: tuple[int, int, int, int] | None = None):
    """Paints `label_id` and `color` ([3] or [h, w, 3]) where `mask` is set.

    `box` = (y0, y1, x0, x1) restricts the work to a window; `mask` and an array `color` are
    then of the window's size.
    """
    if box is None:
      sl = (slice(None), slice(None))
    else:
      y0, y1, x0, x1 = box
      sl = (slice(max(y0, 0), min(y1, self.h)), slice(max(x0, 0), min(x1, self.w)))
      # Clip mask / colour the same way as the window when the box leaves the image.
      my0, mx0 = max(y0, 0) - y0, max(x0, 0) - x0
      my1, mx1 = my0 + (sl[0].stop - sl[0].start), mx0 + (sl[1].stop - sl[1].start)
      if my1 <= my0 or mx1 <= mx0:
        return
      mask = mask[my0:my1, mx0:mx1]
      color = np.asarray(color, np.float32)
      if color.ndim == 3:
        color = color[my0:my1, mx0:mx1]
    color = np.broadcast_to(np.asarray(color, np.float32), mask.shape + (3,))
    self.label[sl][mask] = label_id
    self.color[sl][mask] = color[mask]
    self.texture[sl][mask] = texture

  def window(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (yy, xx) of a window, the window allowed to leave the image."""
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]
    xx = np.arange(x0, x1, dtype=np.float32)[None, :]
    return np.broadcast_to(yy, (y1 - y0, x1 - x0)), np.broadcast_to(xx, (y1 - y0, x1 - x0))


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float) -> np.ndarray:
  return rng.uniform(lo, hi) + rng.uniform(-tint, tint, size=3)


def _any_color(rng: np.random.Generator) -> np.ndarray:
  return rng.uniform(0, 255, size=3)


def _render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
  """Draws one street scene: image [H, W, 3] uint8 RGB and label ids [H, W] uint8."""
  c = _Canvas(rng, height, width)
  h, w, yy, xx = height, width, c.yy, c.xx

  horizon = rng.uniform(0.36, 0.5) * h
  vanish_x = rng.uniform(0.35, 0.65) * w

  # Sky: blue or overcast grey (which overlaps buildings, sidewalks and poles), with a gradient.
  if rng.random() < 0.6:
    sky = np.array([rng.uniform(80, 170), rng.uniform(120, 200), rng.uniform(165, 245)])
  else:
    sky = _grey(rng, 140, 235, 8)
  gradient = (yy / max(horizon, 1.0))[..., None] * rng.uniform(-30, 40)
  c.paint(yy < horizon, _ID['sky'], sky + gradient, texture=2.0)

  # Buildings (some walls / fences) along the horizon, each with its own colour and windows.
  x = -rng.uniform(0, 0.1) * w
  while x < w:
    bw = rng.uniform(0.08, 0.28) * w
    x0, x1 = int(x), int(x + bw)
    x = x + bw
    if rng.random() < 0.15:
      continue  # a gap: sky reaches the horizon here.
    top = int(horizon - rng.uniform(0.08, 0.45) * h)
    bottom = int(horizon + rng.uniform(0.0, 0.08) * h)
    kind = rng.choice(['building', 'wall', 'fence'], p=[0.8, 0.1, 0.1])
    if kind != 'building':
      top = int(horizon - rng.uniform(0.03, 0.1) * h)
    base = _grey(rng, 45, 215, 35)
    wy, wx = c.window(top, bottom, x0, x1)
    color = np.broadcast_to(base, wy.shape + (3,)).copy()
    if kind == 'building':
      # Windows: a grid of darker (or lit) rectangles, period and size per building.
      py, px = rng.uniform(5, 14) * h / 128, rng.uniform(6, 16) * w / 256
      win = (((wy - top) % py) < 0.55 * py) & (((wx - x0) % px) < 0.5 * px)
      color[win] *= rng.uniform(0.35, 1.4)
    elif kind == 'fence':
      # See-through: only the bars are painted, the gaps keep what is behind (sky).
      bars = ((wx - x0) % max(2.0, rng.uniform(2, 5))) < 1
    c.paint(np.ones(wy.shape, bool) if kind != 'fence' else bars, _ID[kind], color,
            texture=rng.uniform(3, 9), box=(top, bottom, x0, x1))

  # Trees: textured green blobs (vegetation overlaps terrain and dark buildings in colour).
  for _ in range(rng.integers(0, 5)):
    cy = horizon - rng.uniform(0.0, 0.2) * h
    cx = rng.uniform(0, w)
    ry, rx = rng.uniform(0.06, 0.2) * h, rng.uniform(0.04, 0.14) * w
    y0, y1, x0, x1 = int(cy - ry), int(cy + ry) + 1, int(cx - rx), int(cx + rx) + 1
    wy, wx = c.window(y0, y1, x0, x1)
    wobble = 1.0 + 0.25 * np.sin(wx * 0.7 + rng.uniform(0, 6)) * np.cos(wy * 0.5)
    mask = ((wy - cy) / ry) ** 2 + ((wx - cx) / rx) ** 2 < wobble
    green = np.array([rng.uniform(25, 120), rng.uniform(55, 160), rng.uniform(15, 100)])
    c.paint(mask, _ID['vegetation'], green, texture=rng.uniform(10, 25), box=(y0, y1, x0, x1))

  # Ground: a road in perspective, sidewalks beside it, then terrain / vegetation / parking.
  depth = np.clip((yy - horizon) / (h - horizon), 0.0, 1.0)  # 0 at the horizon, 1 at the bottom.
  road_half = (rng.uniform(0.25, 0.6) * w) * depth + 1.0
  side_half = road_half * (1.0 + rng.uniform(0.25, 0.7))
  ground = yy >= horizon
  dx = np.abs(xx - vanish_x)
  beyond = rng.choice(['terrain', 'vegetation', 'parking', 'sidewalk'], p=[0.45, 0.2, 0.15, 0.2])
  if beyond == 'terrain':
    beyond_color = np.array([rng.uniform(70, 160), rng.uniform(80, 170), rng.uniform(30, 110)])
  elif beyond == 'vegetation':
    beyond_color = np.array([rng.uniform(25, 120), rng.uniform(55, 160), rng.uniform(15, 100)])
  else:
    beyond_color = _grey(rng, 80, 190, 20)
  c.paint(ground & (dx >= side_half), _ID[beyond], beyond_color, texture=rng.uniform(6, 18))
  sidewalk = _grey(rng, 85, 185, 25) + np.array([rng.uniform(0, 25), 0, 0])  # some are reddish
  # Paving: a tile grid whose rows get denser towards the horizon.
  tiles = ((np.log1p(depth * 40) * 6) % 1.0 < 0.12) | (((xx - vanish_x) / (depth + 0.02) / 9)
                                                      % 1.0 < 0.1)
  c.paint(ground & (dx < side_half) & (dx >= road_half), _ID['sidewalk'],
          sidewalk * np.where(tiles, 0.8, 1.0)[..., None], texture=5.0)
  road = _grey(rng, 50, 150, 12)
  # Dashed lane marks (labelled road, like real ones): white, so they look like sidewalk or sky.
  lane_x = vanish_x + rng.uniform(-0.3, 0.3) * road_half
  marks = (np.abs(xx - lane_x) < 0.012 * w * depth + 0.3) & ((np.log1p(depth * 30) * 3) % 1 < 0.5)
  road_color = np.where(marks[..., None], rng.uniform(180, 250), road)
  c.paint(ground & (dx < road_half), _ID['road'], road_color, texture=rng.uniform(3, 8))

  def scale_at(y_bottom: float) -> float:
    return max((y_bottom - horizon) / (h - horizon), 0.02)

  def x_at(y_bottom: float, where: str) -> float:
    s = scale_at(y_bottom)
    half_road = (road_half.max() - 1.0) * s + 1.0
    if where == 'road':
      return vanish_x + rng.uniform(-0.85, 0.85) * half_road
    side = rng.choice([-1.0, 1.0])
    return vanish_x + side * half_road * rng.uniform(1.05, 1.0 + (side_half.max() / road_half.max()
                                                                   - 1.0))

  # Objects, painted from far to near.
  objects = []
  for _ in range(rng.integers(1, 6)):
    objects.append(('car', rng.uniform(horizon + 0.04 * h, h * 1.05)))
  for _ in range(rng.integers(0, 5)):
    objects.append(('person', rng.uniform(horizon + 0.04 * h, h)))
  for _ in range(rng.integers(1, 5)):
    objects.append(('pole', rng.uniform(horizon + 0.02 * h, h)))
  if rng.random() < 0.3:
    objects.append(('rider', rng.uniform(horizon + 0.05 * h, h)))
  if rng.random() < 0.5:
    objects.append(('static', rng.uniform(horizon, h)))
  objects.sort(key=lambda o: o[1])
  for kind, yb in objects:
    s = scale_at(yb)
    if kind == 'car':
      vehicle = rng.choice(['car', 'truck', 'bus'], p=[0.8, 0.1, 0.1])
      vw = s * w * (rng.uniform(0.18, 0.3) if vehicle == 'car' else rng.uniform(0.3, 0.45))
      vh = vw * (rng.uniform(0.5, 0.75) if vehicle == 'car' else rng.uniform(0.8, 1.0))
      cx = x_at(yb, 'road')
      y0, y1, x0, x1 = int(yb - vh), int(yb) + 1, int(cx - vw / 2), int(cx + vw / 2) + 1
      wy, wx = c.window(y0, y1, x0, x1)
      rel_y, rel_x = (wy - y0) / max(vh, 1), (wx - x0) / max(vw, 1)
      # A car's roof is narrower than its body: cut the upper corners.
      mask = ~((rel_y < 0.35) & ((rel_x < 0.15 + 0.1 * (0.35 - rel_y) / 0.35) |
                                 (rel_x > 0.85 - 0.1 * (0.35 - rel_y) / 0.35)))
      if vehicle != 'car':
        mask = np.ones_like(mask)
      body = _any_color(rng)
      color = np.broadcast_to(body, wy.shape + (3,)).copy()
      glass = (rel_y > 0.1) & (rel_y < 0.4) & (rel_x > 0.2) & (rel_x < 0.8)
      color[glass] = rng.uniform(20, 90, size=3)
      wheels = (rel_y > 0.82) & ((np.abs(rel_x - 0.2) < 0.09) | (np.abs(rel_x - 0.8) < 0.09))
      color[wheels] = rng.uniform(5, 40)
      c.paint(mask, _ID[vehicle], color, texture=4.0, box=(y0, y1, x0, x1))
    elif kind in ('person', 'rider'):
      ph = s * h * rng.uniform(0.3, 0.5)
      pw = ph * rng.uniform(0.25, 0.38)
      cx = x_at(yb, 'side' if kind == 'person' else 'road')
      y0, y1, x0, x1 = int(yb - ph), int(yb) + 1, int(cx - pw / 2), int(cx + pw / 2) + 1
      wy, wx = c.window(y0, y1, x0, x1)
      rel_y, rel_x = (wy - y0) / max(ph, 1), (wx - cx) / max(pw / 2, 1)
      head = (rel_y < 0.16) & ((rel_y - 0.08) ** 2 * 40 + rel_x ** 2 < 0.3)
      torso = (rel_y >= 0.14) & (rel_y < 0.55) & (np.abs(rel_x) < 0.9)
      legs = (rel_y >= 0.55) & (np.abs(np.abs(rel_x) - 0.35) < 0.3)
      color = np.where((rel_y < 0.55)[..., None], _any_color(rng), _any_color(rng))
      color = np.where(head[..., None], rng.uniform(90, 230) * np.array([1.0, 0.8, 0.65]), color)
      if kind == 'rider':
        # The rider's bicycle: two wheels (rings) under the legs, labelled bicycle.
        bw = pw * 2.2
        by0, by1, bx0, bx1 = int(yb - bw * 0.5), int(yb) + 1, int(cx - bw / 2), int(cx + bw / 2) + 1
        by, bx = c.window(by0, by1, bx0, bx1)
        r = bw * 0.22
        ring = np.zeros(by.shape, bool)
        for wcx in (cx - bw * 0.27, cx + bw * 0.27):
          d = np.sqrt((bx - wcx) ** 2 + (by - (yb - r)) ** 2)
          ring |= np.abs(d - r) < max(0.8, r * 0.2)
        frame = (np.abs(by - (yb - r)) < max(0.6, r * 0.15)) & (np.abs(bx - cx) < bw * 0.27)
        c.paint(ring | frame, _ID['bicycle'], _any_color(rng), texture=3.0,
                box=(by0, by1, bx0, bx1))
      c.paint(head | torso | legs, _ID[kind], color, texture=5.0, box=(y0, y1, x0, x1))
    elif kind == 'pole':
      pole_h = s * h * rng.uniform(0.7, 1.3)
      pole_w = max(1.0, s * w * 0.012)
      cx = x_at(yb, 'side')
      y0, y1, x0, x1 = int(yb - pole_h), int(yb) + 1, int(cx - pole_w / 2), int(cx + pole_w / 2) + 1
      c.paint(np.ones((y1 - y0, x1 - x0), bool), _ID['pole'], _grey(rng, 50, 210, 10),
              texture=3.0, box=(y0, y1, x0, x1))
      attach = rng.random()
      if attach < 0.55:  # a traffic sign: a saturated disc or plate on top.
        r = max(1.5, s * w * rng.uniform(0.02, 0.035))
        sy0, sy1, sx0, sx1 = int(y0 - r), int(y0 + r) + 1, int(cx - r), int(cx + r) + 1
        sy, sx = c.window(sy0, sy1, sx0, sx1)
        if rng.random() < 0.5:
          mask = (sy - y0) ** 2 + (sx - cx) ** 2 < r ** 2
        else:
          mask = np.ones(sy.shape, bool)
        palette = np.array([[200, 30, 30], [30, 60, 190], [230, 200, 40], [235, 235, 235]])
        color = palette[rng.integers(0, 4)] + rng.uniform(-25, 25, size=3)
        c.paint(mask, _ID['traffic sign'], color, texture=3.0, box=(sy0, sy1, sx0, sx1))
      elif attach < 0.75:  # a traffic light: a dark box with one lit lamp.
        lw, lh = max(1.5, s * w * 0.02), max(3.0, s * w * 0.05)
        ly0, ly1, lx0, lx1 = int(y0), int(y0 + lh) + 1, int(cx - lw), int(cx + lw) + 1
        ly, lx = c.window(ly0, ly1, lx0, lx1)
        color = np.broadcast_to(rng.uniform(10, 60, size=3), ly.shape + (3,)).copy()
        lamp = rng.integers(0, 3)
        lit = np.abs((ly - ly0) / max(lh, 1) - (lamp + 0.5) / 3) < 0.12
        color[lit] = [[240, 40, 30], [240, 190, 30], [40, 230, 90]][lamp]
        c.paint(np.ones(ly.shape, bool), _ID['traffic light'], color, texture=2.0,
                box=(ly0, ly1, lx0, lx1))
    else:  # 'static': an ignored object of any colour (bins, boxes, ...).
      sw, sh = s * w * rng.uniform(0.03, 0.1), s * h * rng.uniform(0.05, 0.15)
      cx = x_at(yb, 'side')
      y0, y1, x0, x1 = int(yb - sh), int(yb) + 1, int(cx - sw / 2), int(cx + sw / 2) + 1
      c.paint(np.ones((y1 - y0, x1 - x0), bool), _ID[rng.choice(['static', 'dynamic'])],
              _any_color(rng), texture=8.0, box=(y0, y1, x0, x1))

  # The ego vehicle's bonnet at the bottom, and rectification borders: both ignored.
  if rng.random() < 0.5:
    bonnet = rng.uniform(0.06, 0.14) * h
    curve = h - bonnet * (1.0 - 0.6 * ((xx - w / 2) / (w / 2)) ** 2)
    c.paint(yy > curve, _ID['ego vehicle'], _grey(rng, 10, 90, 10), texture=2.0)
  if rng.random() < 0.3:
    border = max(1, int(rng.uniform(0.005, 0.02) * w))
    edge = (xx < border) | (xx >= w - border)
    c.paint(edge, _ID['rectification border'], np.zeros(3), texture=0.0)

  # Photometry, per image: so that no fixed colour -> class rule works across images.
  image = c.color
  image = image * (1.0 + 0.15 * _smooth_noise(rng, h, w, 16)[..., None])  # uneven surfaces
  image = image + rng.standard_normal(size=(h, w, 1), dtype=np.float32) * c.texture[..., None]
  if rng.random() < 0.6:
    # A cast shadow: a slanted band darkening whatever it crosses.
    slope = rng.uniform(-1.0, 1.0)
    offset = rng.uniform(0, w)
    band = np.abs(xx - offset - slope * (yy - horizon)) < rng.uniform(0.05, 0.25) * w
    image = image * np.where(band & (yy > horizon * 0.5), rng.uniform(0.45, 0.75), 1.0)[..., None]
  gain = rng.uniform(0.55, 1.35) * rng.uniform(0.8, 1.2, size=3)  # exposure and white balance
  shading = 1.0 + rng.uniform(-0.3, 0.3) * (xx / w - 0.5) + rng.uniform(-0.3, 0.3) * (yy / h - 0.5)
  image = image * gain.astype(np.float32) * shading[..., None]
  sensor_noise = rng.uniform(1.0, 7.0)
  image = image + rng.standard_normal(size=image.shape, dtype=np.float32) * sensor_noise
  image = np.clip(image, 0, 255).astype(np.uint8)
  pil = Image.fromarray(image)
  radius = rng.uniform(0.0, 1.1)
  if radius > 0.3:
    pil = pil.filter(ImageFilter.GaussianBlur(radius))
  return np.asarray(pil, dtype=np.uint8), c.label


def synthetic_examples(*, num_train: int, num_val: int, num_test: int, height: int, width: int,
                       seed: int) -> Iterator[Example]:
  """Yields the synthetic scenes of all splits; a pure function of its arguments."""
  counts = {'train': num_train, 'val': num_val, 'test': num_test}
  for split_index, split in enumerate(SPLITS):
    cities = CITIES[split]
    for i in range(counts[split]):
      # One generator per image: an image does not depend on how many came before it.
      rng = np.random.default_rng([seed, split_index, i])
      image, label_ids = _render_scene(rng, height, width)
      yield Example(split=split, city=cities[i % len(cities)], seq=i // len(cities),
                    frame=19, image=image, label_ids=label_ids)


def write_synthetic_cityscapes(manual_dir: str, *, num_train: int = 200, num_val: int = 50,
                               num_test: int = 20, height: int = 128, width: int = 256,
                               seed: int = 0) -> SyntheticPaths:
  """Writes synthetic street scenes as `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip`.

  Deterministic: the same arguments give the same pixels and labels, and byte-identical archives
  with the same Pillow / zlib.

  Args:
    manual_dir: the directory to write both archives into (what the tfds builder calls the
      manual directory).
    num_train, num_val, num_test: images per split.
    height, width: image size (Cityscapes is 1024 x 2048; the 1:2 aspect ratio is kept by default).
    seed: the scenes' seed.

  Returns:
    The archives' paths and the number of images per split.
  """
  if height < 16 or width < 16:
    raise ValueError(f'images must be at least 16x16, got {height}x{width}')
  examples = synthetic_examples(num_train=num_train, num_val=num_val, num_test=num_test,
                                height=height, width=width, seed=seed)
  left_path, gt_path = write_cityscapes_zips(manual_dir, examples)
  return SyntheticPaths(manual_dir=manual_dir, left_img_zip=left_path, gt_fine_zip=gt_path,
                        num_examples={'train': num_train, 'val': num_val, 'test': num_test})


def main(argv: list[str]) -> None:
  """`python -m skd_jax.data.synthetic`: the flags defined below, under ``__main__``."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  start = time.time()
  paths = write_synthetic_cityscapes(
      args.out, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
      height=args.height, width=args.width, seed=args.seed)
  print(f'wrote {paths.left_img_zip} and {paths.gt_fine_zip} ({paths.num_examples}) '
        f'in {time.time() - start:.1f} s')
  if args.data_dir:
    start = time.time()
    pipeline.prepare_cityscapes(args.out, args.data_dir)
    print(f'prepared cityscapes/semantic_segmentation in {args.data_dir} '
          f'in {time.time() - start:.1f} s')


if __name__ == '__main__':
  # The flags exist only when this module is the program: the library modules that import it
  # (the demo, the tests, the trainer's data preparation) define flags of their own.
  flags.DEFINE_string('out', None, 'Directory to write the two zips into.')
  flags.DEFINE_integer('num_train', 200, 'Training scenes.')
  flags.DEFINE_integer('num_val', 50, 'Validation scenes.')
  flags.DEFINE_integer('num_test', 20, 'Test scenes.')
  flags.DEFINE_integer('height', 128, 'Image height.')
  flags.DEFINE_integer('width', 256, 'Image width.')
  flags.DEFINE_integer('seed', 0, 'Seed of the scenes.')
  flags.DEFINE_string('data_dir', None,
                      'If set, also prepare the tfds dataset there from the written zips.')
  flags.mark_flag_as_required('out')
  app.run(main)
