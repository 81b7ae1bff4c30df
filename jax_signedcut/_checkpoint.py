"""Checkpoints of factor pytrees: safetensors files, orbax directories, expand.

The safetensors file (format ``jax_signedcut``, version 1)
==========================================================

A plain safetensors file (``safetensors.safe_open`` reads it) whose
``__metadata__`` header holds two string entries:

* ``"format": "jax_signedcut"`` and ``"format_version": "1"`` (``"2"`` when a
  leaf has a low-rank part, so that a reader of version 1, which would drop
  it, refuses the file);
* ``"jax_signedcut"``: JSON with ``{"version", "leaves": [...], "crc32":
  {tensor: crc}, "user": {...}}``. One entry per leaf, in tree order, with its
  key path (``"key"``: a list of ``["d", dict key]`` / ``["i", sequence
  index]`` / ``["a", attribute]``), its ``/``-joined ``"path"``, its kind and
  the names of its tensors.

A plain array leaf is one tensor named by its path, so a file of dense leaves
reads like any other safetensors checkpoint. A :class:`SignedCut` leaf at path
``p`` is stored as the tensors ``p/s_bits``, ``p/t_bits``, ``p/c``,
``p/num_cuts`` (and ``p/sparse_idx``, ``p/sparse_val``, ``p/num_sparse`` when
it has a sparse part; ``p/lr_u``, ``p/lr_v`` (bf16) and ``"lowrank": r`` in
the entry when it has a low-rank part), with its static shape (m, n), batch
shape and width in the leaf entry.

Only the used cuts are written: the cut slots are trimmed to ``max(num_cuts)``
over the batch and the sparse slots to ``max(num_sparse)``. Slots past those
counts always hold zeros (a ``SignedCut`` invariant), so :func:`load` pads
them back and returns factors equal to the saved ones, width included.

Every tensor's CRC-32 is stored, and :func:`load` checks it together with the
shapes, dtypes, counts and indices against the metadata: a truncated, corrupt
or inconsistent file, or one of a newer format version, raises ``ValueError``
naming the file and the problem; it never gives back garbage.

Limits of the tree structure: the file stores the key path of every leaf, and
:func:`load` rebuilds nested ``dict`` s (dict keys and attribute names) and
``list`` s (sequence indices). Tuples come back as lists, and custom pytree
nodes (dataclasses, ``nnx.State``, NamedTuples) as dicts keyed by their field
names: pass the result to ``nnx.update`` or ``nnx.State(...)``, or rebuild your
own type from it. ``None`` leaves are not stored. A trailing ``value``
attribute (what an ``nnx.Variable`` flattens to) is dropped, as in
:func:`jax_signedcut._core.tree.leaf_path`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import tempfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._signedcut import factors as _factors
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut

FORMAT = "jax_signedcut"
VERSION = 2          # the newest version read; files without a low-rank part are written as 1

_CUT_FIELDS = ("s_bits", "t_bits", "c", "num_cuts")
_SPARSE_FIELDS = ("sparse_idx", "sparse_val", "num_sparse")
_LOWRANK_FIELDS = ("lr_u", "lr_v")

# safetensors dtype codes.
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "BF16": np.dtype(jnp.bfloat16),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: corrupt, truncated, inconsistent or too new."""


# ----------------------------------------------------------------------------
# Key paths


def key_components(path) -> list:
  """JSON-able components of a ``jax.tree_util`` key path (see module doc)."""
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      key = k.key
      out.append(["d", key if isinstance(key, (str, int)) and not isinstance(key, bool)
                  else str(key)])
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(["i", int(k.idx)])
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(["a", k.name])
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(["i", int(k.key)])
    else:
      out.append(["d", str(k)])
  if out and out[-1] == ["a", "value"]:
    out.pop()
  return out


def path_of(components) -> str:
  """The ``/``-joined path of key components (as ``_tree.leaf_path`` spells it)."""
  return "/".join(str(c[1]) for c in components)


def flatten(tree) -> list[tuple[list, Any]]:
  """``[(key components, leaf)]`` with ``SignedCut`` as leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, SignedCut))
  return [(key_components(kp), leaf) for kp, leaf in flat]


def unflatten(items, where: str = "tree"):
  """Nested dicts/lists from ``[(key components, leaf)]`` (see module doc)."""
  if len(items) == 1 and not items[0][0]:
    return items[0][1]
  root: Any = None

  def container(kind):
    return [] if kind == "i" else {}

  for comps, leaf in items:
    if not comps:
      raise CheckpointError(f"{where}: a leaf with an empty key path among other leaves")
    if root is None:
      root = container(comps[0][0])
    node = root
    for depth, (kind, key) in enumerate(comps):
      last = depth == len(comps) - 1
      if isinstance(node, list) != (kind == "i"):
        raise CheckpointError(f"{where}: key path {path_of(comps)!r} mixes sequence and mapping "
                              f"keys at depth {depth}")
      if kind == "i":
        if not isinstance(key, int) or key < 0:
          raise CheckpointError(f"{where}: bad sequence index {key!r} in {path_of(comps)!r}")
        while len(node) <= key:
          node.append(None)
        slot_exists = node[key] is not None
      else:
        slot_exists = key in node
      if last:
        if slot_exists:
          raise CheckpointError(f"{where}: two leaves at {path_of(comps)!r}")
        node[key] = leaf
      else:
        if not slot_exists:
          node[key] = container(comps[depth + 1][0])
        node = node[key]
        if not isinstance(node, (dict, list)):
          raise CheckpointError(f"{where}: {path_of(comps[:depth + 1])!r} is both a leaf and a "
                                "container")
  return root


# ----------------------------------------------------------------------------
# Encoding one leaf


def _max_count(x) -> int:
  return int(np.max(np.asarray(x))) if np.size(x) else 0


def encode_leaf(comps, leaf, *, extra: dict | None = None) -> tuple[list, dict]:
  """Tensors ``[(name, np.ndarray)]`` and the metadata entry of one leaf."""
  path = path_of(comps)
  entry: dict = {"key": comps, "path": path}
  if isinstance(leaf, SignedCut):
    if isinstance(leaf.c, jax.core.Tracer):
      raise TypeError("save needs concrete factors: call it outside jax.jit")
    m, n = leaf.shape
    width = leaf.width
    used = max(1, min(width, _max_count(leaf.num_cuts)))
    arrays = {
        "s_bits": np.asarray(leaf.s_bits[..., :used, :], np.uint32),
        "t_bits": np.asarray(leaf.t_bits[..., :used, :], np.uint32),
        "c": np.asarray(leaf.c[..., :used], np.float32),
        "num_cuts": np.asarray(leaf.num_cuts, np.int32),
    }
    entry.update(kind="signed_cut", shape=[int(m), int(n)],
                 batch_shape=[int(d) for d in leaf.batch_shape], width=int(width),
                 stored_width=int(used), sparse_slots=None, stored_sparse=0,
                 nbytes=_factors.nbytes(leaf))
    if leaf.sparse_idx is not None:
      slots = int(leaf.sparse_idx.shape[-1])
      k = min(slots, _max_count(leaf.num_sparse))
      arrays["num_sparse"] = np.asarray(leaf.num_sparse, np.int32)
      if k:
        arrays["sparse_idx"] = np.asarray(leaf.sparse_idx[..., :k], np.int32)
        arrays["sparse_val"] = np.asarray(leaf.sparse_val[..., :k], np.float32)
      entry.update(sparse_slots=slots, stored_sparse=k)
    if leaf.lr_u is not None:
      arrays["lr_u"] = np.asarray(leaf.lr_u).astype(jnp.bfloat16)
      arrays["lr_v"] = np.asarray(leaf.lr_v).astype(jnp.bfloat16)
      entry["lowrank"] = int(leaf.rank)
    entry["tensors"] = {f: f"{path}/{f}" for f in arrays}
    tensors = [(f"{path}/{f}", a) for f, a in arrays.items()]
  else:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      leaf = np.asarray(leaf)
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError("save needs concrete arrays: call it outside jax.jit")
    a = np.asarray(leaf)
    if a.dtype not in _CODES:
      raise TypeError(f"leaf {path!r}: dtype {a.dtype} cannot be stored in safetensors")
    entry.update(kind="array", tensor=path, dtype=str(a.dtype), shape=list(a.shape))
    tensors = [(path, a)]
  if extra:
    entry.update(extra)
  return tensors, entry


# ----------------------------------------------------------------------------
# Writing


class Writer:
  """Writes a safetensors file one tensor at a time, atomically.

  Tensors are appended to a spool file as they come (so only one is in memory
  at a time); :meth:`finish` writes the header and the data to a temporary
  file in the destination's directory and ``os.replace`` s it onto the
  destination. An exception (or Ctrl-C) before that leaves no output file and
  removes the temporaries.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{self.path}: the directory {d} does not exist")
    if os.path.isdir(self.path):
      raise IsADirectoryError(f"{self.path}: is a directory; name the output file")
    fd, self._spool_name = tempfile.mkstemp(prefix=".spool-", suffix=".tmp", dir=d)
    self._spool = os.fdopen(fd, "wb")
    self._header: dict = {}
    self._crc: dict = {}
    self._offset = 0

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    self._cleanup()

  def _cleanup(self):
    if not self._spool.closed:
      self._spool.close()
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self._spool_name)

  def add(self, name: str, array) -> None:
    """Appends one tensor."""
    if name in self._header or name == "__metadata__":
      raise ValueError(f"{self.path}: two tensors named {name!r} (or a reserved name)")
    a = np.ascontiguousarray(array)
    if a.dtype not in _CODES:
      raise TypeError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
    data = _bytes_view(a)     # no copy: the array may be the largest in the file
    self._spool.write(data)
    self._header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                          "data_offsets": [self._offset, self._offset + a.nbytes]}
    self._crc[name] = zlib.crc32(data)
    self._offset += a.nbytes

  @property
  def crc32(self) -> dict:
    return dict(self._crc)

  def finish(self, metadata: dict[str, str]) -> None:
    """Writes header + data and renames the result onto the destination."""
    self._spool.close()
    header = dict(self._header)
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    d = os.path.dirname(os.path.abspath(self.path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=d)
    try:
      with os.fdopen(fd, "wb") as out, open(self._spool_name, "rb") as spool:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        shutil.copyfileobj(spool, out, 1 << 22)
        out.flush()
        os.fsync(out.fileno())
      os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual mode
      os.replace(tmp, self.path)
    except BaseException:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
      raise
    finally:
      self._cleanup()


def _bytes_view(a: np.ndarray) -> memoryview:
  """The bytes of a C-contiguous array, without a copy."""
  return memoryview(a.reshape(-1).view(np.uint8))


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def header_metadata(leaves: list[dict], crc32: dict, user: dict | None) -> dict[str, str]:
  """The ``__metadata__`` strings of a jax_signedcut file."""
  version = 2 if any(e.get("lowrank") is not None for e in leaves) else 1
  body = {"version": version, "leaves": leaves, "crc32": crc32, "user": user or {}}
  return {"format": FORMAT, "format_version": str(version),
          FORMAT: json.dumps(body, separators=(",", ":"))}


def save(path, tree, *, metadata: dict | None = None) -> None:
  """Saves a pytree of ``SignedCut`` and array leaves to a safetensors file.

  Only the used cut and sparse slots are written (see the module doc for the
  layout); the file is written to a temporary name and renamed, so an
  interrupted save leaves no partial file.

  Args:
    path: destination file (conventionally ``*.safetensors``).
    tree: a pytree (dicts, lists, tuples, ``nnx.State``, …) whose leaves are
      :class:`SignedCut` or arrays of a safetensors dtype.
    metadata: JSON-serialisable dict stored in the header (``load_info`` gives
      it back under ``"user"``).

  Raises:
    TypeError: a leaf of an unsupported type/dtype, or traced values.
    ValueError: two leaves that would share a tensor name, or metadata that
      is not JSON-serialisable.

  Example:
    >>> import jax, tempfile, os
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(0), (32, 32))
    >>> tree = {"w": sc.decompose(a, key=jax.random.key(1), rate=0.5), "b": jax.numpy.ones(32)}
    >>> p = os.path.join(tempfile.mkdtemp(), "f.safetensors")
    >>> sc.save(p, tree)
    >>> back = sc.load(p)
    >>> bool((back["w"].c == tree["w"].c).all()), back["b"].shape
    (True, (32,))
  """
  try:
    json.dumps(metadata or {})
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
  with Writer(path) as w:
    entries = []
    for comps, leaf in flatten(tree):
      tensors, entry = encode_leaf(comps, leaf)
      for name, a in tensors:
        w.add(name, a)
      entries.append(entry)
    w.finish(header_metadata(entries, w.crc32, metadata))


# ----------------------------------------------------------------------------
# Reading


class TensorFile:
  """A safetensors file whose tensors are read one at a time with plain reads.

  ``safetensors.safe_open`` checks the header (offsets in order, the file fully
  covered); the data are then read with ``readinto`` rather than through its
  memory map, because pages of a mapped file stay counted in the process's
  resident set after use: reading a checkpoint matrix by matrix through the map
  makes the peak grow with the file size, plain reads keep it at one matrix.
  """

  def __init__(self, path):
    from safetensors import safe_open  # noqa: PLC0415

    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"{self.path}: no such file")
    if os.path.isdir(self.path):
      raise CheckpointError(f"{self.path}: is a directory, expected a .safetensors file")
    try:
      with safe_open(self.path, framework="numpy") as f:
        self.metadata = dict(f.metadata() or {})
      with open(self.path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
      raise CheckpointError(f"{self.path}: not a readable safetensors file "
                            f"(truncated or corrupt?): {_one_line(e)}") from None
    header.pop("__metadata__", None)
    self._start = 8 + n
    self._entries = header
    self._fh = open(self.path, "rb")  # noqa: SIM115  (closed by close())

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name):
    """The numpy dtype of a tensor, or None for a dtype numpy cannot hold."""
    return _DTYPES.get(self._entries[name]["dtype"])

  def get(self, name) -> np.ndarray:
    e = self._entries[name]
    dtype = self.dtype(name)
    if dtype is None:
      raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {e['dtype']}, which "
                            "cannot be read into numpy")
    begin, end = e["data_offsets"]
    a = np.empty(e["shape"], dtype)
    if a.nbytes != end - begin:
      raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape "
                            f"{tuple(e['shape'])} of {dtype}")
    self._fh.seek(self._start + begin)
    if a.nbytes and self._fh.readinto(a.reshape(-1).view(np.uint8)) != a.nbytes:
      raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (truncated file?)")
    return a

  def close(self):
    if not self._fh.closed:
      self._fh.close()


class Reader:
  """A jax_signedcut safetensors file opened lazily; tensors read on demand.

  Use as a context manager. ``info`` is the parsed metadata body; ``leaf(i)``
  decodes and checks leaf ``i``.
  """

  def __init__(self, path, *, verify: bool = True):
    self.path = os.fspath(path)
    self.verify = verify
    self._f = TensorFile(self.path)
    self._names = set(self._f.keys())
    try:
      self.info = self._parse(self._f.metadata)
    except BaseException:
      self._f.close()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    self._f.close()

  def _err(self, msg) -> CheckpointError:
    return CheckpointError(f"{self.path}: {msg}")

  def _parse(self, meta) -> dict:
    if meta.get("format") != FORMAT:
      raise self._err(
          "not a jax_signedcut checkpoint (no 'format': 'jax_signedcut' in the header "
          "metadata); a plain safetensors checkpoint is an input for `jax-signedcut compress`")
    try:
      version = int(meta.get("format_version", ""))
    except ValueError:
      raise self._err(f"bad format_version {meta.get('format_version')!r}") from None
    if version > VERSION:
      raise self._err(f"format version {version} is newer than this jax_signedcut reads "
                      f"(<= {VERSION}); upgrade jax_signedcut")
    if version < 1:
      raise self._err(f"bad format_version {version}")
    try:
      body = json.loads(meta[FORMAT])
    except (KeyError, ValueError) as e:
      raise self._err(f"the {FORMAT!r} header entry is missing or not JSON ({e})") from None
    if not isinstance(body, dict) or not isinstance(body.get("leaves"), list) \
        or not isinstance(body.get("crc32", {}), dict):
      raise self._err("the metadata has no list of leaves")
    described = set()
    for i, e in enumerate(body["leaves"]):
      if not isinstance(e, dict) or e.get("kind") not in ("array", "signed_cut") \
          or not isinstance(e.get("key"), list) or not isinstance(e.get("path"), str) \
          or not all(isinstance(c, list) and len(c) == 2 and c[0] in ("d", "i", "a")
                     for c in e["key"]) \
          or (e["kind"] == "signed_cut" and not isinstance(e.get("tensors"), dict)):
        raise self._err(f"metadata of leaf {i} is malformed: {str(e)[:200]}")
      names = [e.get("tensor")] if e["kind"] == "array" else list(e["tensors"].values())
      for name in names:
        if name not in self._names:
          raise self._err(f"leaf {e.get('path')!r}: tensor {name!r} is missing from the file")
        described.add(name)
    extra = self._names - described
    if extra:
      raise self._err(f"tensors not described by the metadata: {sorted(extra)[:5]}")
    return body

  @property
  def entries(self) -> list[dict]:
    return self.info["leaves"]

  @property
  def user_metadata(self) -> dict:
    return self.info.get("user", {})

  def tensor(self, name: str, dtype=None, shape=None, what="") -> np.ndarray:
    """Reads one tensor, checking its CRC, dtype and shape."""
    a = self._f.get(name)
    if self.verify:
      want = self.info.get("crc32", {}).get(name)
      if want is not None and zlib.crc32(_bytes_view(np.ascontiguousarray(a))) != want:
        raise self._err(f"tensor {name!r} is corrupt (CRC-32 mismatch)")
    if shape is not None and tuple(shape) == () and a.shape == (1,):
      a = a.reshape(())   # safetensors' numpy API reads 0-d tensors as shape (1,)
    if dtype is not None and a.dtype != np.dtype(dtype):
      raise self._err(f"tensor {name!r}{what} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
      raise self._err(f"tensor {name!r}{what} has shape {tuple(a.shape)}, the metadata says "
                      f"{tuple(shape)}")
    return a

  def leaf(self, i: int, *, full_width: bool = True):
    """Leaf ``i`` (an ``np.ndarray`` or a ``SignedCut`` of jax arrays), checked."""
    e = self.entries[i]
    if e["kind"] == "array":
      try:
        dtype = np.dtype(jnp.bfloat16) if e["dtype"] == "bfloat16" else np.dtype(e["dtype"])
        shape = tuple(int(d) for d in e["shape"])
      except (KeyError, TypeError, ValueError) as ex:
        raise self._err(f"leaf {e.get('path')!r}: malformed dtype/shape ({ex!r})") from None
      return self.tensor(e["tensor"], dtype, shape)
    return self._signed_cut(e, full_width=full_width)

  def _signed_cut(self, e, *, full_width):
    path = e.get("path")
    err = lambda msg: self._err(f"leaf {path!r}: {msg}")  # noqa: E731
    try:
      m, n = (int(d) for d in e["shape"])
      batch = tuple(int(d) for d in e["batch_shape"])
      width, k = int(e["width"]), int(e["stored_width"])
      slots = e.get("sparse_slots")
      ks = int(e.get("stored_sparse", 0))
      names = e["tensors"]
    except (KeyError, TypeError, ValueError) as ex:
      raise err(f"malformed metadata ({ex!r})") from None
    if m < 1 or n < 1 or any(d < 0 for d in batch):
      raise err(f"bad shape {(m, n)} / batch shape {batch}")
    if not 1 <= k <= width:
      raise err(f"stored width {k} is not in 1..width ({width})")
    for f in _CUT_FIELDS:
      if f not in names:
        raise err(f"no {f} tensor")
    wm, wn = _packing.num_words(m), _packing.num_words(n)
    s_bits = self.tensor(names["s_bits"], np.uint32, (*batch, k, wm), f" of {path!r}")
    t_bits = self.tensor(names["t_bits"], np.uint32, (*batch, k, wn), f" of {path!r}")
    c = self.tensor(names["c"], np.float32, (*batch, k), f" of {path!r}")
    num_cuts = self.tensor(names["num_cuts"], np.int32, batch, f" of {path!r}")
    if np.any(num_cuts < 0) or np.any(num_cuts > k):
      raise err(f"num_cuts {_range(num_cuts)} outside 0..{k} (the stored width; width {width})")
    if not np.all(np.isfinite(c)):
      raise err("the scales c contain NaN/Inf")
    past = np.arange(k) >= num_cuts[..., None]
    if np.any(c[past] != 0):
      raise err("cut slots past num_cuts have non-zero scales")
    for name, bits, dim in (("s_bits", s_bits, m), ("t_bits", t_bits, n)):
      if dim % 32 and np.any(bits[..., -1] >> np.uint32(dim % 32)):
        raise err(f"{name} has bits set past the {dim} signs of a cut")
    f = SignedCut(s_bits=s_bits, t_bits=t_bits, c=c, num_cuts=num_cuts, shape=(m, n))
    if slots is not None:
      slots = int(slots)
      if not 0 <= ks <= slots or "num_sparse" not in names:
        raise err(f"stored sparse count {ks} not in 0..{slots} or no num_sparse tensor")
      num_sparse = self.tensor(names["num_sparse"], np.int32, batch, f" of {path!r}")
      if np.any(num_sparse < 0) or np.any(num_sparse > ks):
        raise err(f"num_sparse {_range(num_sparse)} outside 0..{ks}")
      if ks:
        idx = self.tensor(names["sparse_idx"], np.int32, (*batch, ks), f" of {path!r}")
        val = self.tensor(names["sparse_val"], np.float32, (*batch, ks), f" of {path!r}")
        used = np.arange(ks) < num_sparse[..., None]
        if np.any(used & ((idx < 0) | (idx >= m * n))):
          raise err(f"sparse indices out of range 0..{m * n - 1} (shape {(m, n)})")
        if np.any(~used & ((idx != 0) | (val != 0))) or not np.all(np.isfinite(val)):
          raise err("sparse slots past num_sparse are not zero, or values are NaN/Inf")
        if ks > 1 and np.any(used[..., 1:] & (np.diff(idx, axis=-1) <= 0)):
          raise err("sparse indices are not strictly ascending")
      else:
        idx = np.zeros((*batch, 0), np.int32)
        val = np.zeros((*batch, 0), np.float32)
      f = dataclasses.replace(f, sparse_idx=idx, sparse_val=val, num_sparse=num_sparse)
    elif any(x in names for x in _SPARSE_FIELDS):
      raise err("sparse tensors present but sparse_slots is null")
    rank = e.get("lowrank")
    if rank is not None:
      if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(m, n) \
          or any(x not in names for x in _LOWRANK_FIELDS):
        raise err(f"lowrank {rank!r} is not an int in 0..{min(m, n)} or no lr_u/lr_v tensors")
      bf16 = np.dtype(jnp.bfloat16)
      lr_u = self.tensor(names["lr_u"], bf16, (*batch, m, rank), f" of {path!r}")
      lr_v = self.tensor(names["lr_v"], bf16, (*batch, n, rank), f" of {path!r}")
      if not (np.all(np.isfinite(lr_u.astype(np.float32)))
              and np.all(np.isfinite(lr_v.astype(np.float32)))):
        raise err("the low-rank factors lr_u/lr_v contain NaN/Inf")
      f = dataclasses.replace(f, lr_u=lr_u, lr_v=lr_v)
    elif any(x in names for x in _LOWRANK_FIELDS):
      raise err("low-rank tensors present but lowrank is null")
    return _to_jax(f, width=width if full_width else k, slots=slots if full_width else None)

  def tree(self, *, full_width: bool = True):
    items = [(e["key"], self.leaf(i, full_width=full_width)) for i, e in enumerate(self.entries)]
    return unflatten(items, self.path)


def _range(x) -> str:
  return f"{int(np.min(x))}..{int(np.max(x))}" if np.size(x) else "(empty)"


def _one_line(e) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def _pad_last(a, axis, size):
  pad = size - a.shape[axis]
  if pad <= 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return np.pad(a, widths)


def _to_jax(f: SignedCut, *, width: int, slots: int | None) -> SignedCut:
  """Pads the trimmed slots back with zeros and moves the arrays to JAX."""
  g = dataclasses.replace(
      f, s_bits=_pad_last(f.s_bits, -2, width), t_bits=_pad_last(f.t_bits, -2, width),
      c=_pad_last(f.c, -1, width))
  if f.sparse_idx is not None and slots is not None:
    g = dataclasses.replace(g, sparse_idx=_pad_last(f.sparse_idx, -1, slots),
                            sparse_val=_pad_last(f.sparse_val, -1, slots))
  if g.sparse_idx is not None and g.sparse_idx.shape[-1] == 0:
    # No stored entries and no slots to restore: an empty sparse part is no sparse part.
    g = dataclasses.replace(g, sparse_idx=None, sparse_val=None, num_sparse=None)
  return jax.tree.map(jnp.asarray, g)


def _truncate_tree(tree, rate, bits):
  if rate is None and bits is None:
    return tree
  if rate is not None and bits is not None:
    raise ValueError(f"give at most one of truncate_rate and truncate_bits, got "
                     f"truncate_rate={rate!r}, truncate_bits={bits!r}")
  return jax.tree.map(
      lambda x: _factors.truncate(x, rate=rate, bits_per_weight=bits)
      if isinstance(x, SignedCut) else x,
      tree, is_leaf=lambda x: isinstance(x, SignedCut))


def load(path, *, truncate_rate: float | None = None, truncate_bits: float | None = None,
         verify: bool = True):
  """Loads a pytree saved by :func:`save` (or ``jax-signedcut compress``).

  Args:
    path: the safetensors file.
    truncate_rate: keep of every ``SignedCut`` leaf only the cuts that this
      rate pays for (``truncate(f, rate=...)``): greedy cuts are
      prefix-consistent, so this equals compressing at the lower rate with the
      same seed.
    truncate_bits: the same with a bits-per-weight budget.
    verify: check every tensor's CRC-32 (on by default).

  Returns:
    Nested dicts/lists (see the module doc) of ``np.ndarray`` leaves and
    :class:`SignedCut` leaves (of ``jax.Array`` s, at their saved width).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a truncated, corrupt or inconsistent file, a newer format
      version, a file that is not a jax_signedcut checkpoint (all naming the
      file), or a bad truncation budget.
  """
  with Reader(path, verify=verify) as r:
    tree = r.tree()
  return _truncate_tree(tree, truncate_rate, truncate_bits)


def load_info(path) -> dict:
  """The metadata of a saved file: ``{"version", "leaves", "crc32", "user"}``."""
  with Reader(path, verify=False) as r:
    return r.info


# ----------------------------------------------------------------------------
# Expand


def expand(tree, dtype=jnp.bfloat16):
  """A dense checkpoint back: every ``SignedCut`` leaf becomes its matrices.

  Like the reference pipeline's expand step: ``reconstruct`` of each factor
  leaf, cast to ``dtype``; other leaves are kept as they are.

  Args:
    tree: a pytree with ``SignedCut`` leaves (e.g. from :func:`load`).
    dtype: ``jnp.bfloat16`` (default) or ``jnp.float32``.

  Returns:
    The tree with dense (..., m, n) arrays in place of the factors.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import jax_signedcut as sc
    >>> f = sc.decompose(jnp.ones((16, 16)), key=jax.random.key(0), width=4)
    >>> sc.expand({"w": f})["w"].dtype
    dtype(bfloat16)
  """
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
  return jax.tree.map(
      lambda x: expand_leaf(x, dtype) if isinstance(x, SignedCut) else x,
      tree, is_leaf=lambda x: isinstance(x, SignedCut))


def expand_leaf(f: SignedCut, dtype) -> jax.Array:
  """``reconstruct`` of one factor leaf, skipping trailing empty cut slots."""
  if not isinstance(f.num_cuts, jax.core.Tracer):
    used = max(1, _max_count(f.num_cuts))
    if used < f.width:
      f = _factors.truncate(f, used)
  return _factors.reconstruct(f, dtype)


# ----------------------------------------------------------------------------
# Orbax

_MARK = "__signed_cut__"


def _to_orbax_tree(tree):
  def enc(x):
    if not isinstance(x, SignedCut):
      return x
    d = {f: getattr(x, f) for f in _CUT_FIELDS + _SPARSE_FIELDS + _LOWRANK_FIELDS
         if getattr(x, f) is not None}
    d["shape"] = np.asarray(x.shape, np.int64)
    return {_MARK: d}
  return jax.tree.map(enc, tree, is_leaf=lambda x: isinstance(x, SignedCut))


def _from_orbax_tree(tree, where):
  if isinstance(tree, dict):
    if set(tree) == {_MARK}:
      d = tree[_MARK]
      try:
        m, n = (int(v) for v in np.asarray(d["shape"]))
        f = SignedCut(**{k: jnp.asarray(d[k]) for k in _CUT_FIELDS}, shape=(m, n),
                      **{k: jnp.asarray(d[k]) for k in _SPARSE_FIELDS if k in d},
                      **{k: jnp.asarray(d[k], jnp.bfloat16) for k in _LOWRANK_FIELDS if k in d})
      except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: a signed cut entry is malformed ({e!r})") from None
      wm, wn = _packing.num_words(m), _packing.num_words(n)
      if f.s_bits.shape[-1] != wm or f.t_bits.shape[-1] != wn or \
          f.s_bits.shape[:-1] != f.c.shape or f.t_bits.shape[:-1] != f.c.shape:
        raise CheckpointError(f"{where}: signed cut word arrays {f.s_bits.shape}, "
                              f"{f.t_bits.shape} disagree with shape {(m, n)} / c {f.c.shape}")
      if (f.lr_u is None) != (f.lr_v is None) or (f.lr_u is not None and (
          f.lr_u.shape[:-2] != f.c.shape[:-1] or f.lr_u.shape[-2] != m
          or f.lr_v.shape != (*f.c.shape[:-1], n, f.lr_u.shape[-1]))):
        raise CheckpointError(
            f"{where}: low-rank factors {None if f.lr_u is None else f.lr_u.shape}, "
            f"{None if f.lr_v is None else f.lr_v.shape} disagree with shape {(m, n)} / "
            f"c {f.c.shape}")
      return f
    return {k: _from_orbax_tree(v, where) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_from_orbax_tree(v, where) for v in tree)
  return tree


def save_orbax(directory, tree) -> None:
  """Saves a pytree (``SignedCut`` leaves allowed) as an orbax checkpoint.

  ``SignedCut`` leaves are stored as ``{"__signed_cut__": {fields…, "shape"}}``
  sub-trees of arrays; a Flax ``nnx.state(model)`` (``SignedCutDense``
  factors are plain arrays there) or a Linen variables dict is saved as it is.

  Args:
    directory: the checkpoint directory; it must not exist yet.
    tree: the pytree.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, _to_orbax_tree(tree))
    ckptr.wait_until_finished()


def load_orbax(directory, *, like=None):
  """Loads an orbax checkpoint written by :func:`save_orbax` (or by Flax/orbax).

  Args:
    directory: the checkpoint directory.
    like: optional: a tree of the saved structure (e.g. ``nnx.state(model)``
      or ``jax.eval_shape`` of it) to restore into. Without it the saved
      structure comes back as nested dicts/lists.

  Returns:
    The tree, with ``SignedCut`` leaves rebuilt.

  Raises:
    FileNotFoundError: no such directory.
    ValueError: the directory is not a readable orbax checkpoint.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such checkpoint directory")
  target = None if like is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x,
      _to_orbax_tree(like))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(directory, target) if target is not None else ckptr.restore(directory)
  except Exception as e:  # noqa: BLE001  (orbax raises many types, FileNotFoundError included)
    raise CheckpointError(f"{directory}: cannot restore the orbax checkpoint: "
                          f"{_one_line(e)[:300]}") from None
  if like is not None:
    return jax.tree.map(
        lambda x: _from_orbax_tree(x, directory) if isinstance(x, dict) else x,
        tree, is_leaf=lambda x: isinstance(x, dict) and set(x) == {_MARK})
  return _from_orbax_tree(tree, directory)


def orbax_leaf_specs(directory):
  """The leaves of a dense orbax checkpoint, read from its metadata (no array is loaded).

  Returns:
    ``(specs, tree)``: ``specs`` is ``[(key components, shape, numpy dtype)]`` in
    ``flatten`` order, ``tree`` the metadata tree that :func:`restore_orbax_leaf`
    takes.

  Raises:
    CheckpointError: an unreadable checkpoint, or one that already holds
      signed cuts (``save_orbax`` of a compressed tree).
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(directory).item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    specs = [(key_components(kp), tuple(int(d) for d in x.shape), np.dtype(x.dtype))
             for kp, x in flat]
  except Exception as e:  # noqa: BLE001  (orbax raises many types)
    raise CheckpointError(f"{directory}: cannot read the orbax checkpoint's metadata: "
                          f"{_one_line(e)[:300]}") from None
  for comps, _, _ in specs:
    if any(c[1] == _MARK for c in comps):
      raise CheckpointError(f"{directory}: is already a jax_signedcut (compressed) checkpoint; "
                            "use 'expand', or load_orbax it")
  return specs, tree


def restore_orbax_leaf(directory, tree, index: int) -> np.ndarray:
  """Restores only leaf ``index`` (in ``orbax_leaf_specs`` order) of an orbax checkpoint.

  An orbax partial restore: the other leaves are not read, so a checkpoint can
  be processed one matrix at a time in the memory of one.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  directory = os.path.abspath(os.fspath(directory))
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  item = jax.tree_util.tree_unflatten(treedef, [
      jax.ShapeDtypeStruct(x.shape, x.dtype) if i == index else None
      for i, x in enumerate(leaves)])
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{directory}: cannot restore leaf {index} of the orbax checkpoint: "
                          f"{_one_line(e)[:300]}") from None
  got = [x for x in jax.tree_util.tree_leaves(out) if x is not None]
  if len(got) != 1 or tuple(got[0].shape) != tuple(leaves[index].shape):
    raise CheckpointError(f"{directory}: leaf {index} came back as "
                          f"{[tuple(np.shape(x)) for x in got]}, expected {tuple(leaves[index].shape)}")
  return np.asarray(got[0])


def is_orbax_dir(path) -> bool:
  """Whether ``path`` looks like an orbax checkpoint directory."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return False
  names = set(os.listdir(path))
  return bool(names & {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "_sharding",
                       "checkpoint"}) or any(n.startswith("ocdbt.process") for n in names)

