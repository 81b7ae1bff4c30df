"""Dense inputs of ``compress`` (and ``inspect --original``), read one leaf at a time.

A ``.safetensors`` file, a directory of ``.safetensors`` shards, or an orbax
checkpoint directory (restored leaf by leaf with partial restores), so that
memory stays near one matrix.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from jax_signedcut._checkpoint import orbax as _orbax
from jax_signedcut._cli.args import CliError
from jax_signedcut._core import keypath as _keypath


class Source:
  """A dense checkpoint read leaf by leaf: ``entries`` and ``get(i)``."""

  entries: list    # [(key components, path, shape, np.dtype)]

  def get(self, i: int) -> np.ndarray:
    raise NotImplementedError

  def close(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class SafetensorsSource(Source):

  def __init__(self, files):
    self._files, self._where, self.entries = [], [], []
    try:
      self._open(files)
    except BaseException:
      self.close()
      raise

  def _open(self, files):
    from jax_signedcut._checkpoint import format as _format  # noqa: PLC0415
    from jax_signedcut._checkpoint.reader import TensorFile  # noqa: PLC0415

    seen = {}
    for file in files:
      f = TensorFile(file)
      self._files.append(f)
      if f.metadata.get("format") == _format.FORMAT:
        raise CliError(f"{file}: is already a jax_signedcut (compressed) checkpoint; use "
                     "'expand', or load it with truncate_rate= to lower its rate")
      for name in f.keys():
        if name in seen:
          raise CliError(f"{file}: tensor {name!r} is also in {seen[name]}")
        seen[name] = file
        dtype = f.dtype(name)
        if dtype is None:
          raise CliError(f"{file}: tensor {name!r} has a dtype this tool cannot read")
        self.entries.append(([["d", name]], name, f.shape(name), dtype))
        self._where.append((f, name))

  def get(self, i):
    f, name = self._where[i]
    return f.get(name)

  def close(self):
    for f in self._files:
      f.close()
    self._files = []


class OrbaxSource(Source):
  """An orbax checkpoint read one leaf at a time (partial restores)."""

  def __init__(self, directory):
    self._dir = directory
    specs, self._tree = _orbax.orbax_leaf_specs(directory)
    self.entries = [(comps, _keypath.join(comps), shape, dtype) for comps, shape, dtype in specs]

  def get(self, i):
    return _orbax.restore_orbax_leaf(self._dir, self._tree, i)


def open_source(path) -> Source:
  if not os.path.exists(path):
    raise CliError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    if _orbax.is_orbax_dir(path):
      return OrbaxSource(path)
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
      raise CliError(f"{path}: a directory with neither .safetensors shards nor an orbax "
                   "checkpoint")
    return SafetensorsSource(shards)
  return SafetensorsSource([path])
