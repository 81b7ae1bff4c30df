"""The file format's constants and checks: header metadata, dtypes, CRCs, errors.

See ``README.md`` beside this module for the layout of a file.
"""

from __future__ import annotations

import json
import zlib

import jax.numpy as jnp
import numpy as np

from jax_signedcut._core import keypath as _keypath

FORMAT = "jax_signedcut"
#: The version this release writes and the newest it reads. Versions 1 and 2
#: (signed cuts with optional sparse and low-rank fields in one leaf entry) are
#: read through :mod:`jax_signedcut._checkpoint.legacy`.
VERSION = 3

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
  """The ``__metadata__`` strings of a jax_signedcut file."""
  body = {"version": VERSION, "leaves": leaves, "crc32": crc, "user": user or {}}
  return {"format": FORMAT, "format_version": str(VERSION),
          FORMAT: json.dumps(body, separators=(",", ":"))}


def parse_header(meta: dict, err) -> tuple[int, dict]:
  """``(format version, metadata body)`` of a file's ``__metadata__``; ``err(msg)`` makes errors."""
  if meta.get("format") != FORMAT:
    raise err("not a jax_signedcut checkpoint (no 'format': 'jax_signedcut' in the header "
              "metadata); a plain safetensors checkpoint is an input for `jax-signedcut compress`")
  try:
    version = int(meta.get("format_version", ""))
  except ValueError:
    raise err(f"bad format_version {meta.get('format_version')!r}") from None
  if version > VERSION:
    raise err(f"format version {version} is newer than this jax_signedcut reads "
              f"(<= {VERSION}); upgrade jax_signedcut")
  if version < 1:
    raise err(f"bad format_version {version}")
  try:
    body = json.loads(meta[FORMAT])
  except (KeyError, ValueError) as e:
    raise err(f"the {FORMAT!r} header entry is missing or not JSON ({e})") from None
  if not isinstance(body, dict) or not isinstance(body.get("leaves"), list) \
      or not isinstance(body.get("crc32", {}), dict):
    raise err("the metadata has no list of leaves")
  return version, body


def check_entry(i: int, e, err) -> None:
  """The fields every leaf entry has (the value's own fields are the codecs' to check)."""
  ok = isinstance(e, dict) and e.get("kind") in KINDS and _keypath.is_components(e.get("key")) \
      and isinstance(e.get("path"), str)
  if ok and e["kind"] == "array":
    ok = isinstance(e.get("tensor"), str)
  if ok and e["kind"] == "compressed":
    ok = isinstance(e.get("value"), dict)
  if not ok:
    raise err(f"metadata of leaf {i} is malformed: {str(e)[:200]}")
