"""Start signs of every cut, derived from the key.

The one derivation every backend uses (so that backends can be compared bit
for bit): the start column signs ``t`` of cut ``j`` are the packed words

    jax.random.bits(jax.random.fold_in(key, j), (ceil(n/32),), jnp.uint32)

with the unused tail bits of the last word cleared. They depend only on
``(key, j)``, so a width-w run starts its first k cuts exactly as a width-k run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_signedcut._core import checks as _checks
from jax_signedcut._signedcut import packing as _packing


def as_key(key, *, name: str = "key") -> jax.Array:
  """A typed PRNG key array from a typed key or a raw uint32 (..., 2) key."""
  return _checks.key(name, key)


def start_words(key: jax.Array, width: int, n: int) -> jax.Array:
  """uint32 (width, ceil(n/32)): packed start signs of cuts 0..width-1 for one key."""
  nw = _packing.num_words(n)
  mask = jnp.uint32(_packing.tail_mask(n))

  def one(j):
    w = jax.random.bits(jax.random.fold_in(key, j), (nw,), jnp.uint32)
    return w.at[-1].set(w[-1] & mask)

  return jax.vmap(one)(jnp.arange(width, dtype=jnp.uint32))
