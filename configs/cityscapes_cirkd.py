"""The former name of configs/cityscapes_cirkd_skd.py (SKD under the CIRKD protocol), kept so that
commands and scripts that name it keep working; see that file for the command and the sources.

    python -m skd_jax.main --config=configs/cityscapes_cirkd.py --workdir=runs/cirkd_skd_r18 ...
"""

from skd_jax import config_base


def get_config():
  return config_base.cirkd_cityscapes(config_base.cirkd_skd)
