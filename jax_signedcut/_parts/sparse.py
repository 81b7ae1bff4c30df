"""The sparse part: entries stored apart as (flat index, value) pairs.

Heavy-tailed matrices (a few entries many robust standard deviations out) are
fitted badly by cuts, whose every entry has one magnitude; storing those few
entries apart (8 bytes each: an int32 flat index ``row * n + col`` and an f32
value) and cutting the rest costs little on well-behaved matrices and helps a
lot on heavy-tailed ones. :mod:`jax_signedcut._signedcut.outliers` chooses them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_signedcut._core import protocol as _protocol
from jax_signedcut._core.protocol import Compressed

#: Bytes one stored entry takes: an int32 flat index and an f32 value.
BYTES_PER_ENTRY = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sparse(Compressed):
  """Entries of (m, n) matrices stored apart, possibly batched.

  Attributes:
    idx: int32 (..., k) flat indices (row * n + col), ascending over the used
      slots; slots past ``count`` hold index 0.
    val: float32 (..., k) their values; 0 past ``count``.
    count: int32 (...) slots in use.
    shape: static (m, n).
  """

  idx: jax.Array
  val: jax.Array
  count: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def capacity(self) -> int:
    """k, the number of slots (static)."""
    return self.idx.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.idx.shape[:-1])

  def check(self, name: str = "f") -> Sparse:
    """That idx, val and count fit each other, and (when concrete) that every index is
    in ``0..m·n−1`` and every count in ``0..k``: an index out of range would be
    dropped by one product and clamped by another.

    Raises:
      TypeError / ValueError: naming ``name`` and the field.
    """
    m, n = _protocol.check_shape(name, self.shape)
    idx = self.idx
    if not hasattr(idx, "shape") or idx.ndim < 1:
      raise ValueError(f"{name}.idx must have shape (..., k), got {getattr(idx, 'shape', idx)!r}")
    batch, k = tuple(idx.shape[:-1]), idx.shape[-1]
    _protocol.check_field(name, "idx", idx, batch + (k,), "int")
    _protocol.check_field(name, "val", self.val, batch + (k,), "float")
    _protocol.check_field(name, "count", self.count, batch, "int")
    _protocol.check_range(name, "idx", idx, 0, m * n - 1)
    _protocol.check_range(name, "count", self.count, 0, k)
    return self

  def _dense(self):
    m, n = self.shape
    batch = self.batch_shape
    flat = jnp.zeros((*batch, m * n), jnp.float32).reshape(-1, m * n)
    idx = self.idx.reshape(flat.shape[0], -1)
    val = self.val.astype(jnp.float32).reshape(idx.shape)
    # Unused slots hold index 0 and value 0: adding them changes nothing.
    flat = jax.vmap(lambda o, i, v: o.at[i].add(v))(flat, idx, val)
    return flat.reshape(*batch, m, n)

  def stored_bytes(self):
    return self.count.astype(jnp.int32) * BYTES_PER_ENTRY

  def _matmul(self, x2, precision=None):  # exact products of the stored values
    _, n = self.shape
    rows, cols = self.idx // n, self.idx % n
    contrib = x2[:, rows] * self.val.astype(jnp.float32)[None, :]
    return jnp.zeros((x2.shape[0], n), jnp.float32).at[:, cols].add(contrib)

  def add_to(self, dense: jax.Array) -> jax.Array:
    """``dense + this part``, by a scatter-add into the (..., m, n) f32 matrices."""
    m, n = self.shape
    flat = dense.reshape(-1, m * n)
    idx = self.idx.reshape(flat.shape[0], -1)
    val = self.val.reshape(idx.shape)
    flat = jax.vmap(lambda o, i, v: o.at[i].add(v))(flat, idx, val)
    return flat.reshape(dense.shape)
