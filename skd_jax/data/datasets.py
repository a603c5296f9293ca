"""The registry of the datasets the input pipeline reads: name -> `spec.Dataset`.

    name          tfds builder                       manual directory
    cityscapes    cityscapes/semantic_segmentation   the two official zips (tfds's own builder)
    camvid        camvid                             SegNet's CamVid folders (skd_jax.data.camvid)
    voc           voc2012_aug                        VOCdevkit + SBD (skd_jax.data.voc)
    ade20k        ade20k                             ADEChallengeData2016 (skd_jax.data.ade20k)

Each dataset module defines its class table, its manual-directory check and one `DATASET`; importing
them registers their tfds builders.
"""

from __future__ import annotations

from skd_jax.data import ade20k
from skd_jax.data import camvid
from skd_jax.data import cityscapes
from skd_jax.data import spec
from skd_jax.data import voc

_REGISTRY: dict[str, spec.Dataset] = {
    d.info.name: d for d in (cityscapes.DATASET, camvid.DATASET, voc.DATASET, ade20k.DATASET)}


def names() -> tuple[str, ...]:
  """The registered dataset names."""
  return tuple(_REGISTRY)


def get(name: str) -> spec.Dataset:
  """The registered dataset `name` (config.data.dataset)."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown dataset {name!r} (config.data.dataset): expected one of '
                     f'{", ".join(_REGISTRY)}')
  return _REGISTRY[name]
