"""A sum of compressed parts: ``A ≈ part_1 + part_2 + …`` (e.g. low rank + cuts + sparse).

Every part is itself a :class:`~jax_signedcut._core.protocol.Compressed` of the
same shape and batch shape; the sum's dense matrices, stored bytes and
products are the parts' own, added up. Budget and ``max_error`` accounting for
a decomposition with several parts happens once, where the parts are made
(:mod:`jax_signedcut._signedcut.decompose`), not in each part.
"""

from __future__ import annotations

import dataclasses

import jax

from jax_signedcut._core.protocol import Compressed, check_compressed


def compressed_parts(parts) -> bool:
  """Whether ``parts`` (a non-empty tuple, else TypeError) holds compressed values only.

  jax rebuilds pytrees with placeholder leaves (tree.map, tree.unflatten), so a
  composite checks its parts' shapes only when this is true.
  """
  if not isinstance(parts, tuple) or not parts:
    raise TypeError(f"parts must be a non-empty tuple, got {parts!r}")
  return all(isinstance(p, Compressed) for p in parts)


def check_parts(parts: tuple, name: str) -> None:
  """Every part's own ``check`` (named ``name.parts[i]``) and one batch shape for all."""
  for i, p in enumerate(parts):
    check_compressed(p, f"{name}.parts[{i}]")
    if tuple(p.batch_shape) != tuple(parts[0].batch_shape):
      raise ValueError(f"every part of {name} must have batch shape "
                       f"{tuple(parts[0].batch_shape)}, got {name}.parts[{i}] with "
                       f"{tuple(p.batch_shape)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sum(Compressed):
  """``A ≈ Σ parts``: a tuple of compressed values of one shape and batch shape.

  Attributes:
    parts: the summands, in the order they were taken out of the matrix
      (for a signed cut decomposition: low rank, then cuts, then sparse is
      the order of ``reconstruct``; any order gives the same sum).

  Example:
    >>> import jax
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(0), (64, 48))
    >>> f = sc.decompose(a, key=jax.random.key(1), rate=0.5, outliers=0.01)
    >>> [type(p).__name__ for p in f.parts]
    ['SignedCut', 'Sparse']
    >>> f.part(sc.Sparse).count
    Array(31, dtype=int32)
  """

  parts: tuple

  def __post_init__(self):
    parts = self.parts
    if compressed_parts(parts):
      shape = tuple(parts[0].shape)
      for i, p in enumerate(parts[1:], 1):
        if tuple(p.shape) != shape:
          raise ValueError(f"every part must have shape {shape}, got parts[{i}].shape = "
                           f"{tuple(p.shape)}")

  def check(self, name: str = "f") -> Sum:
    """Every part's own ``check`` (named ``name.parts[i]``) and one batch shape."""
    check_parts(self.parts, name)
    return self

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.parts[0].shape)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self.parts[0].batch_shape

  def part(self, cls):
    """The first part of type ``cls``, or None."""
    return next((p for p in self.parts if isinstance(p, cls)), None)

  def replace_part(self, cls, new) -> Sum:
    """This sum with its first part of type ``cls`` replaced by ``new``."""
    i = next(i for i, p in enumerate(self.parts) if isinstance(p, cls))
    return dataclasses.replace(self, parts=self.parts[:i] + (new,) + self.parts[i + 1:])

  def _dense(self):
    out = self.parts[0]._dense()  # noqa: SLF001
    for p in self.parts[1:]:
      out = out + p._dense()  # noqa: SLF001
    return out

  def stored_bytes(self):
    total = self.parts[0].stored_bytes()
    for p in self.parts[1:]:
      total = total + p.stored_bytes()
    return total

  def _matmul(self, x2, precision=None):
    y = self.parts[0]._matmul(x2, precision)  # noqa: SLF001
    for p in self.parts[1:]:
      y = y + p._matmul(x2, precision)  # noqa: SLF001
    return y
