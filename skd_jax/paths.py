"""Paths that may be local or on cloud storage (``gs://bucket/...`` for TPU pods)."""

from __future__ import annotations

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path`: cloud URIs kept as they are, local paths made absolute (orbax needs that).

  `pathlib` would turn ``gs://bucket/run`` into ``./gs:/bucket/run``.
  """
  text = os.fspath(path)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))
