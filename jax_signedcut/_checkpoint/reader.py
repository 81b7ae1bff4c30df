"""Reading a checkpoint: the header checked up front, leaves decoded and validated one at a time."""

from __future__ import annotations

import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._checkpoint import codec as _codec
from jax_signedcut._checkpoint import format as _format
from jax_signedcut._checkpoint import legacy as _legacy
from jax_signedcut._checkpoint import structure as _structure
from jax_signedcut._checkpoint import types as _types  # noqa: F401  (registers the codecs)
from jax_signedcut._core.protocol import map_compressed
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut import factors as _factors
from jax_signedcut._signedcut.factors import SignedCut


class TensorFile:
  """A safetensors file whose tensors are read one at a time with plain reads.

  The header is checked in full when the file is opened, before any tensor is
  allocated: its length against the file's size, no duplicate JSON keys, and
  every tensor's dtype, shape and data offsets (in order, no gaps or overlaps,
  the data region exactly covered, each range exactly the bytes its shape and
  dtype take). Whatever a header says, a tensor read then takes at most the
  bytes the file holds for it. The data are read with ``readinto`` rather than
  through a memory map, because pages of a mapped file stay counted in the
  process's resident set after use: reading a checkpoint matrix by matrix
  through the map makes the peak grow with the file size, plain reads keep it
  at one matrix.
  """

  def __init__(self, path):
    self.path = _format.file_path(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"{self.path}: no such file")
    if os.path.isdir(self.path):
      raise _format.CheckpointError(f"{self.path}: is a directory, expected a .safetensors file")
    self._fh = open(self.path, "rb")  # noqa: SIM115  (closed by close())
    try:
      self._read_header()
    except BaseException:
      self._fh.close()
      raise

  def _err(self, msg) -> _format.CheckpointError:
    return _format.CheckpointError(f"{self.path}: not a readable safetensors file "
                                   f"(truncated or corrupt?): {msg}")

  def _read_header(self):
    self.size = os.fstat(self._fh.fileno()).st_size
    head = self._fh.read(8)
    if len(head) < 8:
      raise self._err(f"{self.size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", head)
    if n > self.size - 8 or n > _format.MAX_HEADER:
      raise self._err(f"the header length {n} exceeds the file's {self.size} bytes "
                      f"(or the limit of {_format.MAX_HEADER})")
    raw = self._fh.read(n)
    try:
      header = _format.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
      raise self._err(f"the header is not JSON ({_format.one_line(e)})") from None
    if not isinstance(header, dict):
      raise self._err("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
      raise self._err("__metadata__ is not a mapping of strings")
    self._start = 8 + n
    data = self.size - self._start
    spans = []
    for name, e in header.items():
      if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise self._err(f"tensor {name!r}: malformed entry {str(e)[:200]}")
      shape, offs, code = e["shape"], e["data_offsets"], e["dtype"]
      if not isinstance(code, str) or not isinstance(shape, list) \
          or not all(_format.is_count(d) for d in shape) or not isinstance(offs, list) \
          or len(offs) != 2 or not all(_format.is_count(o) for o in offs) or offs[0] > offs[1]:
        raise self._err(f"tensor {name!r}: malformed dtype, shape or data_offsets "
                        f"{str(e)[:200]}")
      if offs[1] > data:
        raise self._err(f"tensor {name!r}: data_offsets {offs} run past the {data} bytes of "
                        "data")
      dtype = _format.DTYPES.get(code)
      if dtype is not None and math.prod(shape) * dtype.itemsize != offs[1] - offs[0]:
        raise self._err(f"tensor {name!r}: shape {tuple(shape)} of {dtype} takes "
                        f"{math.prod(shape) * dtype.itemsize} bytes, data_offsets {offs} hold "
                        f"{offs[1] - offs[0]}")
      spans.append((offs[0], offs[1], name))
    at = 0
    for begin, end, name in sorted(spans):
      if begin != at:
        raise self._err(f"tensor {name!r}: data_offsets start at {begin}, expected {at} "
                        "(a gap or an overlap)")
      at = end
    if at != data:
      raise self._err(f"the tensors cover {at} bytes of the {data} bytes of data")
    self.metadata = meta
    self._entries = header

  @property
  def table(self) -> dict:
    """The tensor table as the header gives it (``{name: {"dtype", "shape", "data_offsets"}}``)."""
    return self._entries

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name):
    """The numpy dtype of a tensor, or None for a dtype numpy cannot hold."""
    return _format.DTYPES.get(self._entries[name]["dtype"])

  def get(self, name) -> np.ndarray:
    e = self._entries[name]
    dtype = self.dtype(name)
    if dtype is None:
      raise _format.CheckpointError(f"{self.path}: tensor {name!r} has dtype {e['dtype']}, which "
                            "cannot be read into numpy")
    begin, _ = e["data_offsets"]
    a = np.empty(e["shape"], dtype)   # its size was checked against the file's bytes
    self._fh.seek(self._start + begin)
    if a.nbytes and self._fh.readinto(a.reshape(-1).view(np.uint8)) != a.nbytes:
      raise _format.CheckpointError(f"{self.path}: tensor {name!r} is cut short (truncated file?)")
    return a

  def close(self):
    if not self._fh.closed:
      self._fh.close()


#: Zero slots padded back on load may add at most PAD_FACTOR × the file's size +
#: PAD_SLACK bytes (over the whole file). A file saved from a value far wider
#: than it uses (a huge width of which a few cuts are used, in every leaf) can
#: exceed it; such a file is refused with an error that says so.
PAD_FACTOR = 16
PAD_SLACK = 64 << 20


class Reader:
  """A jax_signedcut safetensors file opened lazily; tensors read on demand.

  Use as a context manager. ``info`` is the parsed metadata body (entries of
  format versions 1 and 2 rewritten into the current form, see
  :mod:`jax_signedcut._checkpoint.legacy`); ``leaf(i)`` decodes and checks leaf ``i``.
  """

  def __init__(self, path, *, verify: bool = True):
    self.path = _format.file_path(path)
    self.verify = verify
    self._f = TensorFile(self.path)
    self._names = set(self._f.keys())
    self._pad = [PAD_FACTOR * self._f.size + PAD_SLACK,
                 f"a file of {self._f.size} bytes ({PAD_FACTOR}x its size + "
                 f"{PAD_SLACK >> 20} MiB)"]
    try:
      self.format_version, self.info = self._parse(self._f.metadata)
    except _format.CheckpointError:
      self._f.close()
      raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError) as ex:
      self._f.close()
      raise self._err(f"malformed metadata: {type(ex).__name__}: {_format.one_line(ex)}") \
          from None
    except BaseException:
      self._f.close()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    self._f.close()

  def _err(self, msg) -> _format.CheckpointError:
    return _format.CheckpointError(f"{self.path}: {msg}")

  def _parse(self, meta) -> tuple[int, dict]:
    version, body = _format.parse_header(meta, self._f.table, self._err)
    described = set()
    leaves = []
    for i, e in enumerate(body["leaves"]):
      if version < 3 and isinstance(e, dict) and e.get("kind") == "signed_cut" \
          and isinstance(e.get("path"), str):
        e = _legacy.entry(e, self._err)
      _format.check_entry(i, e, self._err)
      if e["kind"] == "array":
        names = [e["tensor"]]
      else:
        specs = _codec.tensor_specs(e["value"])
        names = [s.get("tensor") for s in specs]
      for name in names:
        if name not in self._names:
          raise self._err(f"leaf {e.get('path')!r}: tensor {name!r} is missing from the file")
        if name in described:
          raise self._err(f"leaf {e.get('path')!r}: tensor {name!r} is described twice")
        described.add(name)
      leaves.append(e)
    extra = self._names - described
    if extra:
      raise self._err(f"tensors not described by the metadata: {sorted(extra)[:5]}")
    return version, dict(body, leaves=leaves)

  @property
  def entries(self) -> list[dict]:
    return self.info["leaves"]

  @property
  def user_metadata(self) -> dict:
    return self.info.get("user", {})

  def tensor(self, name: str, dtype=None, shape=None, what="") -> np.ndarray:
    """Reads one tensor, checking its dtype and shape (before reading) and its CRC."""
    stored = self._f.shape(name)
    if dtype is not None and self._f.dtype(name) != np.dtype(dtype):
      got = self._f.dtype(name) or self._f.table[name]["dtype"]
      raise self._err(f"tensor {name!r}{what} has dtype {got}, expected {np.dtype(dtype)}")
    if shape is not None:
      shape = tuple(shape)
      # Files written through safetensors' numpy API store 0-d tensors as shape (1,).
      if stored != shape and not (shape == () and stored == (1,)):
        raise self._err(f"tensor {name!r}{what} has shape {stored}, the metadata says {shape}")
    a = self._f.get(name)
    if self.verify and _format.crc32(a) != self.info["crc32"][name]:
      raise self._err(f"tensor {name!r} is corrupt (CRC-32 mismatch)")
    if shape == () and a.shape == (1,):
      a = a.reshape(())
    return a

  def leaf(self, i: int, *, full_width: bool = True):
    """Leaf ``i``, checked: an ``np.ndarray``, or a compressed value of ``jax.Array`` s.

    ``full_width=False`` leaves trimmed slots (unused cuts, sparse slots) off,
    which is what expanding needs. Zero slots padded back may add at most
    :data:`PAD_FACTOR` × the file's size + :data:`PAD_SLACK` bytes over the
    whole file (a header cannot make a small file allocate much more than its
    own size).
    """
    e = self.entries[i]
    path = e.get("path")
    try:
      return self._leaf(e, path, full_width)
    except _format.CheckpointError:
      raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError, MemoryError) as ex:
      raise self._err(f"leaf {path!r}: {type(ex).__name__}: {_format.one_line(ex)}") from None

  def _leaf(self, e, path, full_width):
    if e["kind"] == "array":
      try:
        dtype = _format.numpy_dtype(e["dtype"])
        shape = tuple(int(d) for d in e["shape"])
      except (KeyError, TypeError, ValueError) as ex:
        raise self._err(f"leaf {path!r}: malformed dtype/shape ({ex!r})") from None
      return self.tensor(e["tensor"], dtype, shape)

    def read(spec):
      try:
        dtype = _format.DTYPES[spec["dtype"]]
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(_format.is_count(d) for d in shape):
          raise ValueError("shape is not a list of ints >= 0")
      except (KeyError, TypeError, ValueError) as ex:
        raise self._err(f"leaf {path!r}: malformed tensor description {str(spec)[:200]} "
                        f"({ex!r})") from None
      return self.tensor(spec["tensor"], dtype, shape, f" of {path!r}")

    try:
      with _types.padding_limit(self._pad):
        x = _codec.decode(e["value"], read, full=full_width)
    except _format.CheckpointError:
      raise
    except ValueError as ex:
      raise self._err(f"leaf {path!r}: {_format.one_line(ex)}") from None
    want = (e.get("batch_shape", ()), e.get("shape", ()))
    want = tuple(tuple(w) if isinstance(w, list) else w for w in want)
    if (tuple(x.batch_shape), tuple(x.shape)) != want:
      raise self._err(f"leaf {path!r}: the value has batch shape {x.batch_shape} and shape "
                      f"{x.shape}, the entry says {want[0]} and {want[1]}")
    x = jax.tree.map(jnp.asarray, x)
    if "nbytes" in e and e["nbytes"] != x.nbytes:
      raise self._err(f"leaf {path!r}: the value stores {x.nbytes} bytes, the entry says "
                      f"{e['nbytes']!r}")
    return x

  def tree(self, *, full_width: bool = True):
    items = [(e["key"], self.leaf(i, full_width=full_width)) for i, e in enumerate(self.entries)]
    return _structure.unflatten(items, self.path)


def has_cuts(x) -> bool:
  """Whether a compressed value is a SignedCut or a Sum holding one (what truncation takes)."""
  return isinstance(x, SignedCut) or (isinstance(x, Sum) and x.part(SignedCut) is not None)


def truncate_tree(tree, rate, bits):
  """Every leaf with cuts truncated to a rate or bits budget; other leaves as they are."""
  if rate is None and bits is None:
    return tree
  if rate is not None and bits is not None:
    raise ValueError(f"give at most one of truncate_rate and truncate_bits, got "
                     f"truncate_rate={rate!r}, truncate_bits={bits!r}")
  return map_compressed(
      lambda x: _factors.truncate(x, rate=rate, bits_per_weight=bits) if has_cuts(x) else x,
      tree)


def load(path, *, truncate_rate: float | None = None, truncate_bits: float | None = None,
         verify: bool = True):
  """Loads a pytree saved by :func:`save` (or ``jax-signedcut compress``).

  Files of every format version are read (versions 1 and 2 into the current
  types: a ``SignedCut``, or a ``Sum`` of a ``LowRankPart``, the cuts and a
  ``Sparse`` part).

  Args:
    path: the safetensors file, or the directory of a sharded checkpoint
      (``jax-signedcut compress --distributed``: shard files and an index).
    truncate_rate: keep of every leaf with signed cuts (a ``SignedCut`` or a
      ``Sum`` holding one) only the cuts this rate pays for after its other
      parts (``truncate(f, rate=...)``): greedy cuts are prefix-consistent, so
      this equals compressing at the lower rate with the same seed. Leaves of
      other methods are returned as saved.
    truncate_bits: the same with a bits-per-weight budget.
    verify: check every tensor's CRC-32 (on by default).

  Returns:
    Nested dicts and lists rebuilt from the saved key paths (tuples come back
    as lists, custom pytree nodes such as ``nnx.State`` as dicts keyed by
    their field names; ``None`` leaves are not stored, and a tree without
    leaves, such as ``{}``, comes back as ``{}``) of ``np.ndarray``
    leaves and compressed leaves (of ``jax.Array`` s, at their saved width).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a truncated, corrupt or inconsistent file, a newer format
      version, a file that is not a jax_signedcut checkpoint (all naming the
      file), or a bad truncation budget.
  """
  from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415  (a directory of shards)

  with _sharded.open_reader(path, verify=verify) as r:
    tree = r.tree()
  return truncate_tree(tree, truncate_rate, truncate_bits)


def load_info(path) -> dict:
  """The metadata of a saved file: ``{"version", "leaves", "crc32", "user"}``.

  Leaf entries of older format versions are given in the current form;
  ``"version"`` is the file's own format version.
  """
  from jax_signedcut._checkpoint import sharded as _sharded  # noqa: PLC0415  (a directory of shards)

  with _sharded.open_reader(path, verify=False) as r:
    return r.info
