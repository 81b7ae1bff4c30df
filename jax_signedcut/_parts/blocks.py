"""Row blocks: a matrix whose (permuted) rows are stacked from separately compressed parts.

``RowBlocks(perm, parts)`` is the (m, n) matrix ``A`` with ``A[perm] =
concat(parts)``: part b holds the rows ``perm[o_b : o_b + m_b]`` of ``A``.
For a Flax kernel (in, out) the rows are input channels, so a layer ``y = x A``
computes ``Σ_b x[..., perm[o_b : o_b + m_b]] · part_b`` — one gather of x and
one product per part, never the dense matrix.

This is the format of the calibrated block search
(:func:`jax_signedcut._calibration.blocks.blocked_signed_cut`): as in GPTQ, the
input channels are taken in blocks (in order of falling input energy), each
block is compressed under the metric the rows after it leave, and the error it
makes is pushed onto the rows not yet compressed. ``perm`` is stored (int32,
4 bytes per row, counted in :meth:`stored_bytes`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core.protocol import Compressed, is_concrete
from jax_signedcut._parts.sum import check_parts, compressed_parts


def is_permutation(perm, m: int) -> bool:
  """Whether every row of the concrete int array ``perm`` (..., m) is a permutation of 0..m−1."""
  rows = np.sort(np.asarray(perm).reshape(-1, m), axis=-1)
  return bool(np.array_equal(rows, np.broadcast_to(np.arange(m), rows.shape)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowBlocks(Compressed):
  """``A[perm] = concat(parts)``: int32 ``perm`` (..., m), a permutation of 0..m−1.

  Attributes:
    perm: int32 (..., m): row ``perm[i]`` of ``A`` is row i of the stacked parts.
    parts: a non-empty tuple of compressed (m_b, n) values, ``Σ m_b = m``, one
      batch shape.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(0), (6, 4))
    >>> perm = jnp.asarray([5, 0, 3, 1, 2, 4], jnp.int32)
    >>> f = sc.RowBlocks(perm, (sc.rtn(a[perm[:2]], bits=8), sc.rtn(a[perm[2:]], bits=8)))
    >>> bool(jnp.allclose(f.reconstruct(), a, atol=0.05)), f.shape
    (True, (6, 4))
  """

  perm: jax.Array
  parts: tuple

  def __post_init__(self):
    parts = self.parts
    if compressed_parts(parts):
      n = tuple(parts[0].shape)[1:]
      for i, p in enumerate(parts[1:], 1):
        if len(p.shape) != 2 or tuple(p.shape)[1:] != n:
          raise ValueError(f"every part must have {n[0] if n else '?'} columns, got "
                           f"parts[{i}].shape = {tuple(p.shape)}")

  @property
  def sizes(self) -> tuple[int, ...]:
    """Rows of each part."""
    return tuple(int(p.shape[0]) for p in self.parts)

  @property
  def shape(self) -> tuple[int, int]:
    return (sum(self.sizes), int(self.parts[0].shape[1]))

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.perm.shape[:-1])

  def check(self, name: str = "f") -> RowBlocks:
    """The parts' own checks, one batch shape, and ``perm`` a permutation of the rows."""
    m, _ = self.shape
    check_parts(self.parts, name)
    perm = self.perm
    want = (*self.parts[0].batch_shape, m)
    if not hasattr(perm, "shape") or tuple(perm.shape) != want or perm.dtype != jnp.int32:
      raise ValueError(f"{name}.perm must be int32 of shape {want} (the parts hold {m} rows), "
                       f"got {getattr(perm, 'dtype', type(perm).__name__)} of shape "
                       f"{tuple(getattr(perm, 'shape', ()))}")
    if is_concrete(perm) and not is_permutation(perm, m):
      raise ValueError(f"{name}.perm must be a permutation of 0..{m - 1}")
    return self

  def _dense(self):
    stacked = jnp.concatenate([p._dense() for p in self.parts], axis=-2)  # noqa: SLF001
    inv = jnp.argsort(self.perm, axis=-1)
    return jnp.take_along_axis(stacked, inv[..., :, None], axis=-2)

  def stored_bytes(self):
    total = 4 * self.perm.shape[-1]
    for p in self.parts:
      total = total + p.stored_bytes()
    return total

  def _matmul(self, x2, precision=None):
    xp = jnp.take(x2, self.perm, axis=1)
    y, o = None, 0
    for p, mb in zip(self.parts, self.sizes):
      yp = p._matmul(xp[:, o:o + mb], precision)  # noqa: SLF001
      y = yp if y is None else y + yp
      o += mb
    return y
