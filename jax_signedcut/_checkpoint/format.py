"""The file format's constants and checks: header metadata, dtypes, CRCs, errors.

See ``README.md`` beside this module for the layout of a file.
"""

from __future__ import annotations

import json
import os
import zlib

import jax.numpy as jnp
import numpy as np

from jax_signedcut._core import keypath as _keypath

FORMAT = "jax_signedcut"
#: The version this release writes and the newest it reads. Versions 1 and 2
#: (signed cuts with optional sparse and low-rank fields in one leaf entry) are
#: read through :mod:`jax_signedcut._checkpoint.legacy`. Version 4 is version 3
#: plus :data:`HEADER_CRC`, a checksum of the whole header.
VERSION = 4

#: The ``__metadata__`` key of the header checksum (required from version 4 on).
HEADER_CRC = "header_crc32"
#: Header lengths above this are refused before anything is read (safetensors' own limit).
MAX_HEADER = 100_000_000

#: safetensors dtype codes.
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "BF16": np.dtype(jnp.bfloat16),
}
CODES = {v: k for k, v in DTYPES.items()}

#: Leaf kinds of an entry: a plain array, or a compressed value of a registered type.
KINDS = ("array", "compressed")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: corrupt, truncated, inconsistent or too new."""


def file_path(path) -> str:
  """``path`` as a str (a str or an ``os.PathLike``), else a TypeError naming the argument."""
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a str or os.PathLike naming a .safetensors file (or a "
                    f"directory of shards), got "
                    f"{path!r} of type {type(path).__name__}")
  path = os.fspath(path)
  if not isinstance(path, str):
    raise TypeError(f"path must be a str or os.PathLike of str, got {path!r}")
  return path


def bytes_view(a: np.ndarray) -> memoryview:
  """The bytes of a C-contiguous array, without a copy."""
  return memoryview(a.reshape(-1).view(np.uint8))


def crc32(a: np.ndarray) -> int:
  return zlib.crc32(bytes_view(np.ascontiguousarray(a)))


def dtype_code(dtype) -> str:
  """The safetensors code of a numpy dtype; TypeError if it has none."""
  dtype = np.dtype(dtype)
  if dtype not in CODES:
    raise TypeError(f"dtype {dtype} cannot be stored in safetensors")
  return CODES[dtype]


def numpy_dtype(name: str):
  """The numpy dtype of an array entry's ``"dtype"`` (numpy's name, ``bfloat16`` too)."""
  return np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)


def one_line(e) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def header_metadata(leaves: list[dict], crc: dict, user: dict | None) -> dict[str, str]:
  """The ``__metadata__`` strings of a jax_signedcut file (the writer adds :data:`HEADER_CRC`)."""
  body = {"version": VERSION, "leaves": leaves, "crc32": crc, "user": user or {}}
  return {"format": FORMAT, "format_version": str(VERSION),
          FORMAT: json.dumps(body, separators=(",", ":"))}


def header_checksum(table: dict, metadata: dict) -> str:
  """The :data:`HEADER_CRC` value: CRC-32 (8 hex digits) of the header in a canonical form.

  ``table`` is the safetensors tensor table (``{name: {"dtype", "shape",
  "data_offsets"}}``), ``metadata`` the ``__metadata__`` strings; the checksum
  entry itself is left out. The canonical form (sorted keys, no spaces, ASCII)
  is what the JSON says, so every edit of a name, dtype, shape, offset or
  metadata string changes it, while the bytes the writer happened to choose
  (key order, padding) do not matter.
  """
  meta = {k: v for k, v in metadata.items() if k != HEADER_CRC}
  blob = json.dumps({"tensors": table, "metadata": meta}, sort_keys=True,
                    separators=(",", ":"), ensure_ascii=True, allow_nan=True)
  return f"{zlib.crc32(blob.encode('ascii')):08x}"


def _no_duplicates(pairs):
  d = {}
  for k, v in pairs:
    if k in d:
      raise ValueError(f"duplicate key {k!r}")
    d[k] = v
  return d


def loads(text):
  """``json.loads`` that refuses duplicate keys (a reader must not pick one of two values)."""
  return json.loads(text, object_pairs_hook=_no_duplicates)


def is_count(x) -> bool:
  """An int >= 0 as JSON gives it (not a bool)."""
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(meta: dict, table: dict, err) -> tuple[int, dict]:
  """``(format version, metadata body)`` of a file's ``__metadata__``; ``err(msg)`` makes errors.

  From version 4 on the header checksum is required and checked (before any
  other field is believed); a file of an older version has none and gets the
  structural checks only. ``table`` is the tensor table the checksum covers.
  """
  if meta.get("format") != FORMAT:
    raise err("not a jax_signedcut checkpoint (no 'format': 'jax_signedcut' in the header "
              "metadata); a plain safetensors checkpoint is an input for `jax-signedcut compress`")
  text = meta.get("format_version", "")
  if not isinstance(text, str) or not text.isascii() or not text.isdigit() \
      or text != str(int(text)):
    raise err(f"bad format_version {text!r}")
  version = int(text)
  if version > VERSION:
    raise err(f"format version {version} is newer than this jax_signedcut reads "
              f"(<= {VERSION}); upgrade jax_signedcut")
  if version < 1:
    raise err(f"bad format_version {version}")
  if HEADER_CRC in meta or version >= 4:
    want = meta.get(HEADER_CRC)
    if want is None:
      raise err(f"the header has no {HEADER_CRC!r} entry (required from format version 4 on)")
    if want != header_checksum(table, meta):
      raise err(f"the header is corrupt ({HEADER_CRC} mismatch: the metadata or the tensor "
                "table was changed after writing)")
  try:
    body = loads(meta[FORMAT])
  except (KeyError, TypeError, ValueError, RecursionError) as e:
    raise err(f"the {FORMAT!r} header entry is missing or not JSON ({one_line(e)})") from None
  if not isinstance(body, dict) or not isinstance(body.get("leaves"), list) \
      or not isinstance(body.get("crc32"), dict) or not isinstance(body.get("user", {}), dict):
    raise err("the metadata is malformed: it needs a list of leaves, a crc32 mapping and a "
              "user mapping")
  if body.get("version") != version:
    raise err(f"the metadata says version {body.get('version')!r}, the header "
              f"format_version {version}")
  names = set(table)
  crc = body["crc32"]
  missing = sorted(names - set(crc))
  if missing:
    raise err(f"tensor {missing[0]!r} has no CRC-32 entry (every tensor must have one)")
  unknown = sorted(set(crc) - names)
  if unknown:
    raise err(f"a CRC-32 entry for {unknown[0]!r}, which is not a tensor of the file")
  for name, v in crc.items():
    if not is_count(v) or v >= 1 << 32:
      raise err(f"the CRC-32 entry of tensor {name!r} is {v!r}, not an int in 0..2**32-1")
  return version, body


def check_entry(i: int, e, err) -> None:
  """The fields every leaf entry has (the value's own fields are the codecs' to check)."""
  ok = isinstance(e, dict) and e.get("kind") in KINDS and _keypath.is_components(e.get("key")) \
      and isinstance(e.get("path"), str) and e["path"] == _keypath.join(e["key"])
  if ok and e["kind"] == "array":
    ok = isinstance(e.get("tensor"), str)
  if ok and e["kind"] == "compressed":
    ok = isinstance(e.get("value"), dict)
  if not ok:
    raise err(f"metadata of leaf {i} is malformed: {str(e)[:200]}")
