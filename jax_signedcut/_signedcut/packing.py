"""Packing of ±1 sign vectors into uint32 words.

Layout (shared by every backend, the checkpoint format and the Flax layers):
element ``i`` of a sign vector of length ``d`` is bit ``i % 32`` of word
``i // 32``; **bit 1 means -1**, bit 0 means +1; the unused high bits of the
last word are 0. A vector of length ``d`` takes ``num_words(d) = ceil(d / 32)``
words.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32


def num_words(d: int) -> int:
  """Number of uint32 words holding ``d`` signs."""
  return -(-d // WORD_BITS)


def tail_mask(d: int) -> int:
  """Mask of the bits of the last word that hold signs of a length-``d`` vector."""
  r = d % WORD_BITS
  return 0xFFFFFFFF if r == 0 else (1 << r) - 1


def pack_signs(x: jax.Array) -> jax.Array:
  """Packs the signs of ``x`` (..., d) into uint32 words (..., ceil(d/32)).

  ``sgn(0) = +1``: only strictly negative entries set their bit.
  """
  d = x.shape[-1]
  nw = num_words(d)
  neg = (x < 0).astype(jnp.uint32)
  neg = jnp.pad(neg, [(0, 0)] * (x.ndim - 1) + [(0, nw * WORD_BITS - d)])
  neg = neg.reshape(*x.shape[:-1], nw, WORD_BITS)
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape((1,) * (neg.ndim - 1) + (WORD_BITS,))
  # Bits are disjoint, so a sum is an OR.
  return jnp.sum(neg << shifts, axis=-1, dtype=jnp.uint32)


def unpack_signs(words: jax.Array, d: int, dtype=jnp.float32) -> jax.Array:
  """Unpacks uint32 words (..., ceil(d/32)) into ±1 values (..., d) of ``dtype``."""
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape((1,) * words.ndim + (WORD_BITS,))
  bits = (words[..., :, None] >> shifts) & jnp.uint32(1)
  bits = bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)[..., :d]
  return (1 - 2 * bits.astype(jnp.int32)).astype(dtype)


def pack_signs_np(x: np.ndarray) -> np.ndarray:
  """NumPy twin of :func:`pack_signs` (the same words): for eager pipelines whose shapes
  change from call to call, where each eager jnp op would compile once per shape."""
  x = np.asarray(x)
  d = x.shape[-1]
  nw = num_words(d)
  neg = (x < 0).astype(np.uint32)
  neg = np.pad(neg, [(0, 0)] * (x.ndim - 1) + [(0, nw * WORD_BITS - d)])
  neg = neg.reshape(*x.shape[:-1], nw, WORD_BITS)
  return np.sum(neg << np.arange(WORD_BITS, dtype=np.uint32), axis=-1, dtype=np.uint32)


def unpack_signs_np(words: np.ndarray, d: int) -> np.ndarray:
  """NumPy twin of :func:`unpack_signs` (int8 ±1), for host-side checks."""
  words = np.asarray(words, dtype=np.uint32)
  bits = (words[..., :, None] >> np.arange(WORD_BITS, dtype=np.uint32)) & 1
  bits = bits.reshape(*words.shape[:-1], -1)[..., :d]
  return (1 - 2 * bits.astype(np.int8)).astype(np.int8)
