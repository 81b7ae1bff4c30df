"""A checkpoint split over several files: shard files plus an index (the Hugging Face layout).

``jax-signedcut compress --distributed`` writes into a directory::

    OUTDIR/model-00001-of-00002.safetensors     each an ordinary jax_signedcut file
    OUTDIR/model-00002-of-00002.safetensors     holding some of the leaves
    OUTDIR/model.safetensors.index.json         written last, by process 0

The index follows the ``*.safetensors.index.json`` convention (``weight_map``:
tensor name → shard file) and adds, under ``"jax_signedcut"``, the leaf paths in
checkpoint order (so a load gives the tree in its original order) and the run's
user metadata. :func:`open_reader` gives one reader over all shards with the
interface of :class:`reader.Reader`; ``load``, ``expand`` and ``inspect`` use it
for a directory.
"""

from __future__ import annotations

import glob
import json
import os

from jax_signedcut._checkpoint import format as _format
from jax_signedcut._checkpoint import reader as _reader
from jax_signedcut._checkpoint import structure as _structure

INDEX = "model.safetensors.index.json"


def shard_name(i: int, count: int) -> str:
  """The file name of shard ``i`` (0-based) of ``count``: ``model-00001-of-00002.safetensors``."""
  return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_index(outdir, shards: list[str], order: list[str], user: dict) -> str:
  """Writes the index of the complete shard files ``shards`` (names in ``outdir``), atomically.

  ``order``: every leaf path in checkpoint order. Returns the index's path.
  """
  weight_map, total = {}, 0
  for name in shards:
    with _reader.Reader(os.path.join(outdir, name), verify=False) as r:
      for t in r._f.keys():  # noqa: SLF001
        weight_map[t] = name
      total += os.path.getsize(r.path)
  body = {"metadata": {"total_size": total, "format": _format.FORMAT,
                       "format_version": str(_format.VERSION)},
          "weight_map": weight_map,
          _format.FORMAT: {"shards": list(shards), "leaves": list(order), "user": user}}
  path = os.path.join(outdir, INDEX)
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(body, f, indent=1, sort_keys=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def find_index(path) -> str | None:
  """The index file of a sharded checkpoint directory, or None if ``path`` is not one."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return None
  if os.path.exists(os.path.join(path, INDEX)):
    return os.path.join(path, INDEX)
  found = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
  return found[0] if len(found) == 1 else None


class ShardedReader:
  """The leaves of all shard files of a directory, in checkpoint order (a :class:`Reader`'s
  interface: ``entries``, ``leaf(i)``, ``info``, ``user_metadata``, ``tree()``)."""

  def __init__(self, path, *, verify: bool = True):
    self.path = os.fspath(path)
    index = find_index(self.path)
    if index is None:
      raise _format.CheckpointError(
          f"{self.path}: a directory with no (or more than one) *.safetensors.index.json; "
          "an incomplete sharded output (rerun the same compress command to finish it)?")
    try:
      with open(index, encoding="utf-8") as f:
        body = json.load(f)
      if not isinstance(body, dict) or _format.FORMAT not in body:
        raise _format.CheckpointError(
            f"{index}: not a jax_signedcut index (no {_format.FORMAT!r} entry); a plain "
            "sharded safetensors checkpoint is an input for `jax-signedcut compress`")
      own = body[_format.FORMAT]
      shards, order = list(own["shards"]), list(own["leaves"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise _format.CheckpointError(f"{index}: not a jax_signedcut index "
                                    f"({_format.one_line(e)})") from None
    self._readers = []
    try:
      for name in shards:
        self._readers.append(_reader.Reader(os.path.join(self.path, name), verify=verify))
    except BaseException:
      self.close()
      raise
    where = {}
    for r in self._readers:
      for j, e in enumerate(r.entries):
        if e["path"] in where:
          raise _format.CheckpointError(f"{self.path}: leaf {e['path']!r} is in two shards")
        where[e["path"]] = (r, j)
    missing = [p for p in order if p not in where]
    if missing or len(where) != len(order):
      raise _format.CheckpointError(
          f"{self.path}: the index lists {len(order)} leaves, the shards hold {len(where)} "
          f"(missing: {missing[:5]})")
    self._at = [where[p] for p in order]
    first = self._readers[0] if self._readers else None
    self.format_version = first.format_version if first else _format.VERSION
    crc = {}
    for r in self._readers:
      crc.update(r.info.get("crc32", {}))
    self.info = {"version": self.format_version, "leaves": [r.entries[j] for r, j in self._at],
                 "crc32": crc, "user": own.get("user", {}), "shards": shards}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    for r in self._readers:
      r.close()

  @property
  def entries(self) -> list[dict]:
    return self.info["leaves"]

  @property
  def user_metadata(self) -> dict:
    return self.info.get("user", {})

  def leaf(self, i: int, *, full_width: bool = True):
    r, j = self._at[i]
    return r.leaf(j, full_width=full_width)

  def tree(self, *, full_width: bool = True):
    items = [(e["key"], self.leaf(i, full_width=full_width)) for i, e in enumerate(self.entries)]
    return _structure.unflatten(items, self.path)


def open_reader(path, *, verify: bool = True):
  """A :class:`ShardedReader` for a directory, else a :class:`reader.Reader` for a file."""
  path = _format.file_path(path)   # a TypeError naming `path` for None, ints, bytes
  if os.path.isdir(path):
    return ShardedReader(path, verify=verify)
  return _reader.Reader(path, verify=verify)
