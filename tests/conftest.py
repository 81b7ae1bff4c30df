"""Helpers shared by the test modules (import them: ``from conftest import gaussian``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jax_signedcut as sc
from jax_signedcut._signedcut.factors import split_cuts


def gaussian(shape, seed=1, dtype=jnp.float32):
  """N(0, 1) entries of ``shape`` from ``jax.random.key(seed)``."""
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def heavy(key, shape, planted=5, value=80.0):
  """Gaussian entries with ``planted`` entries set to ``value`` (a heavy-tailed matrix)."""
  a = jax.random.normal(key, shape)
  idx = jax.random.choice(jax.random.fold_in(key, 1), a.size, (planted,), replace=False)
  return a.reshape(-1).at[idx].set(value).reshape(shape)


def cuts(f) -> sc.SignedCut:
  """The :class:`SignedCut` of ``f`` (itself, or the one part of a Sum)."""
  return split_cuts(f)[0]


def part(f, cls):
  """The part of type ``cls`` of ``f`` (a Sum), or None; ``f`` itself if it is a ``cls``."""
  if isinstance(f, cls):
    return f
  return f.part(cls) if isinstance(f, sc.Sum) else None


def assert_same_factors(f, g):
  """``f`` and ``g`` are the same compressed pytree: structure, types, dtypes and bits."""
  fl, fd = jax.tree.flatten(f)
  gl, gd = jax.tree.flatten(g)
  assert fd == gd, (fd, gd)
  for i, (a, b) in enumerate(zip(fl, gl)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
    np.testing.assert_array_equal(a, b, err_msg=f"leaf {i}")


def reseal(data: bytes) -> bytes:
  """A safetensors file's bytes with the jax_signedcut header checksum recomputed.

  What a writer that edits a header on purpose does (the tests that check
  the structural checks behind the checksum use it); the header is written
  back in JSON with the data unchanged.
  """
  import json  # noqa: PLC0415
  import struct  # noqa: PLC0415

  from jax_signedcut._checkpoint import format as _format  # noqa: PLC0415

  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  meta = header.pop("__metadata__")
  meta[_format.HEADER_CRC] = _format.header_checksum(header, meta)
  header["__metadata__"] = meta
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  return struct.pack("<Q", len(blob)) + blob + data[8 + n:]
