"""The official Cityscapes pixel-level evaluation (``csEvalPixelLevelSemanticLabeling``), runnable
with today's NumPy.

    pip install -r requirements-test.txt          # cityscapesscripts==2.3.0, its last release
    CITYSCAPES_DATASET=/data/cityscapes CITYSCAPES_RESULTS=OUT python -m skd_jax.cityscapes_official

is ``csEvalPixelLevelSemanticLabeling`` with its default options (instance-level scores on, which
read ``gtFine/val/*/*_gtFine_instanceIds.png`` beside the label ids): it scores every
``gtFine/val`` image against its prediction in OUT (``skd_jax.evaluate --export_dir=OUT``), prints
the official tables and writes ``resultPixelLevelSemanticLabeling.json`` to
``CITYSCAPES_EXPORT_DIR`` (default ``CITYSCAPES_DATASET/evaluationResults``).

Why a wrapper: cityscapesscripts 2.3.0 (there is no later release) calls ``np.in1d``, which NumPy
2.4 removed, so the official command crashes in the pinned environment as soon as the
instance-level scores are computed. In this process only, ``np.in1d`` is given back as NumPy
defined it (``np.isin`` of the flattened input, flat); nothing else of the official code changes.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def _in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False, *, kind=None):
  """NumPy's removed ``in1d``: membership of each element of ``ar1`` (flattened) in ``ar2``."""
  return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert,
                 kind=kind)


def main() -> int:
  if 'CITYSCAPES_DATASET' not in os.environ:
    print('error: CITYSCAPES_DATASET is not set: set it to the Cityscapes root (the folder that '
          'holds gtFine/), and CITYSCAPES_RESULTS to the folder of predictions', file=sys.stderr)
    return 1
  try:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official  # optional: a test-only package
  except ImportError:
    print('error: cityscapesscripts is not installed: pip install -r requirements-test.txt '
          '(cityscapesscripts==2.3.0)', file=sys.stderr)
    return 1
  if not hasattr(np, 'in1d'):
    np.in1d = _in1d
  official.main()
  return 0


if __name__ == '__main__':
  sys.exit(main())
