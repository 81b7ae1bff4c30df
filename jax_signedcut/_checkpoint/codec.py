"""One codec for every compressed type, driven by its dataclass fields.

A compressed value is written as a *node* (JSON in the file's metadata) plus
tensors. For each field of the type's dataclass:

* a static field (``metadata=dict(static=True)``: a shape, a code width, a
  grid name) goes into ``node["static"]`` as JSON (tuples as lists);
* an array field becomes one tensor named ``<prefix>/<field>``, described by
  ``{"tensor": name, "dtype": code, "shape": [...]}``;
* a compressed field (``LowRank.u`` as a ``QuantizedMatrix``) becomes a nested
  node ``{"node": {...}}`` whose tensors are named under ``<prefix>/<field>``;
* a tuple field (``Sum.parts``, ``SignedTensorCut.bits``) becomes
  ``{"tuple": [...]}`` of the above, element ``i`` under ``<prefix>/<field>/<i>``;
* ``None`` is ``null``.

What a type adds is one :func:`register` call: a stable name (what the file
says, independent of the Python class name), a version, and a ``validate``
hook that checks the decoded arrays against the static fields (word counts,
index ranges, dtypes) before anything is handed back. Optionally ``trim`` /
``pad`` hooks drop slots that hold zeros by the type's invariant (unused cut
slots) on write and restore them on read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jax_signedcut._checkpoint import format as _format
from jax_signedcut._core.protocol import Compressed


@dataclasses.dataclass(frozen=True)
class Codec:
  """How one compressed type is stored (see the module doc).

  Attributes:
    cls: the dataclass type.
    name: its stable name in files.
    version: the newest layout version of this type that is written and read.
    validate: ``validate(value)`` on the decoded value (numpy arrays, before
      ``pad``); raises ``ValueError`` with a message naming the field.
    trim: optional ``trim(value) -> (value, slots)`` before writing; ``slots``
      is JSON stored in the node.
    pad: optional ``pad(value, slots) -> value`` after reading (the inverse of
      ``trim``, restoring the zero slots).
  """

  cls: type
  name: str
  version: int
  validate: Callable[[Any], None]
  trim: Callable | None = None
  pad: Callable | None = None


_BY_CLASS: dict[type, Codec] = {}
_BY_NAME: dict[str, Codec] = {}


def register(cls: type, name: str, *, version: int = 1, validate: Callable[[Any], None],
             trim: Callable | None = None, pad: Callable | None = None) -> Codec:
  """Registers the codec of a compressed dataclass type (see the module doc).

  Raises:
    TypeError: ``cls`` is not a :class:`Compressed` dataclass.
    ValueError: ``name`` or ``cls`` is already registered.
  """
  if not (isinstance(cls, type) and issubclass(cls, Compressed) and dataclasses.is_dataclass(cls)):
    raise TypeError(f"cls must be a Compressed dataclass, got {cls!r}")
  if name in _BY_NAME or cls in _BY_CLASS:
    raise ValueError(f"a codec for {cls.__name__} or named {name!r} is already registered")
  codec = Codec(cls=cls, name=name, version=int(version), validate=validate, trim=trim, pad=pad)
  _BY_CLASS[cls] = codec
  _BY_NAME[name] = codec
  return codec


def codec_for(x) -> Codec:
  """The codec of a compressed value's type; TypeError naming the type when none is registered."""
  codec = _BY_CLASS.get(type(x))
  if codec is None:
    raise TypeError(f"no checkpoint codec is registered for {type(x).__name__} "
                    "(jax_signedcut._checkpoint.codec.register)")
  return codec


def registered() -> dict[str, Codec]:
  """The registered codecs by name."""
  return dict(_BY_NAME)


# ----------------------------------------------------------------------------
# Encoding


def encode(x, prefix: str, *, trim: bool = True) -> tuple[dict, list[tuple[str, np.ndarray]]]:
  """``(node, [(tensor name, array)])`` of one compressed value (concrete values).

  ``trim=False`` keeps every slot (no ``trim`` hook runs).
  """
  tensors: list = []
  node = _encode_node(x, prefix, tensors, trim)
  return node, tensors


def _encode_node(x, prefix, tensors, trim):
  codec = codec_for(x)
  slots = None
  if trim and codec.trim is not None:
    x, slots = codec.trim(x)
  static, fields = {}, {}
  for f in dataclasses.fields(x):
    v = getattr(x, f.name)
    if f.metadata.get("static"):
      static[f.name] = _to_json(v)
    else:
      fields[f.name] = _encode_value(v, f"{prefix}/{f.name}", tensors, trim)
  node = {"type": codec.name, "version": codec.version, "static": static, "fields": fields}
  if slots is not None:
    node["slots"] = slots
  return node


def _encode_value(v, name, tensors, trim):
  if v is None:
    return None
  if isinstance(v, Compressed):
    return {"node": _encode_node(v, name, tensors, trim)}
  if isinstance(v, (tuple, list)):
    return {"tuple": [_encode_value(e, f"{name}/{i}", tensors, trim) for i, e in enumerate(v)]}
  if isinstance(v, jax.core.Tracer):
    raise TypeError("save needs concrete values: call it outside jax.jit")
  a = np.asarray(v)
  if not a.flags.c_contiguous:
    a = a.copy(order="C")   # (np.ascontiguousarray would make a 0-d array 1-d)
  if (np.issubdtype(a.dtype, np.floating) or a.dtype == _format.DTYPES["BF16"]) \
      and not np.all(np.isfinite(a.astype(np.float32, copy=False))):
    raise ValueError(f"{name} holds NaN or Inf; a compressed value must be finite to be saved "
                     "(load refuses it)")
  tensors.append((name, a))
  return {"tensor": name, "dtype": _format.dtype_code(a.dtype), "shape": list(a.shape)}


def _to_json(v):
  if isinstance(v, (tuple, list)):
    return [_to_json(e) for e in v]
  if isinstance(v, (np.integer,)):
    return int(v)
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  raise TypeError(f"static field value {v!r} of type {type(v).__name__} is not JSON-able")


def _from_json(v):
  return tuple(_from_json(e) for e in v) if isinstance(v, list) else v


# ----------------------------------------------------------------------------
# Decoding


def tensor_specs(node) -> list[dict]:
  """Every ``{"tensor": ...}`` spec of a node, nested ones included (for checks and listing)."""
  out = []

  def walk_value(v):
    if isinstance(v, dict):
      if "tensor" in v:
        out.append(v)
      elif "node" in v:
        walk_node(v["node"])
      elif "tuple" in v and isinstance(v["tuple"], list):
        for e in v["tuple"]:
          walk_value(e)

  def walk_node(n):
    if isinstance(n, dict) and isinstance(n.get("fields"), dict):
      for v in n["fields"].values():
        walk_value(v)

  walk_node(node)
  return out


def decode(node, read: Callable[[dict], np.ndarray], *, full: bool = True):
  """The value a node describes, with numpy arrays, validated (and padded when ``full``).

  ``read(spec)`` returns the array of a ``{"tensor": ...}`` spec (checked
  against its dtype and shape). Raises ``ValueError`` (a message without the
  file's name, which the reader adds) on any inconsistency.
  """
  if not isinstance(node, dict) or not isinstance(node.get("fields"), dict) \
      or not isinstance(node.get("static", {}), dict):
    raise ValueError(f"malformed value description {str(node)[:200]}")
  name = node.get("type")
  codec = _BY_NAME.get(name)
  if codec is None:
    raise ValueError(f"unknown compressed type {name!r} (known: {sorted(_BY_NAME)}); it was "
                     "written by a newer jax_signedcut or by an extension that is not imported")
  version = node.get("version")
  if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= codec.version:
    raise ValueError(f"{name} layout version {version!r} is not one this jax_signedcut reads "
                     f"(1..{codec.version}); upgrade jax_signedcut")
  kwargs = {}
  for f in dataclasses.fields(codec.cls):
    if f.metadata.get("static"):
      if f.name not in node.get("static", {}):
        if f.default is dataclasses.MISSING:
          raise ValueError(f"{name}: static field {f.name!r} is missing")
        continue
      kwargs[f.name] = _from_json(node["static"][f.name])
    else:
      if f.name not in node["fields"]:
        raise ValueError(f"{name}: field {f.name!r} is missing")
      kwargs[f.name] = _decode_value(node["fields"][f.name], read, full, f"{name}.{f.name}")
  try:
    x = codec.cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}: {_format.one_line(e)}") from None
  try:
    codec.validate(x)
  except (TypeError, ValueError, AttributeError, IndexError) as e:
    raise ValueError(f"{name}: {_format.one_line(e)}") from None
  if full and codec.pad is not None and "slots" in node:   # no "slots": written untrimmed
    try:
      x = codec.pad(x, node["slots"])
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: {_format.one_line(e)}") from None
  return x


def _decode_value(v, read, full, what):
  if v is None:
    return None
  if isinstance(v, dict):
    if "tensor" in v:
      return read(v)
    if "zeros" in v:    # (legacy entries: an empty sparse part)
      shape = v["zeros"]
      if not isinstance(shape, list) or not all(_format.is_count(d) for d in shape) \
          or 0 not in shape or v.get("dtype") not in _format.DTYPES:
        raise ValueError(f"{what}: malformed empty field {str(v)[:200]}")
      return np.zeros(tuple(shape), _format.DTYPES[v["dtype"]])
    if "node" in v:
      try:
        return decode(v["node"], read, full=full)
      except _format.CheckpointError:
        raise       # from ``read``: it already names the file and tensor
      except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if isinstance(v.get("tuple"), list):
      return tuple(_decode_value(e, read, full, f"{what}[{i}]") for i, e in enumerate(v["tuple"]))
  raise ValueError(f"{what}: malformed field description {str(v)[:200]}")
