"""The :class:`SignedCut` type (the cuts alone) and what can be done with cuts.

A decomposition with more parts than the cuts (the sparse entries stored
apart, a low-rank part) is a :class:`~jax_signedcut._parts.sum.Sum` that holds
a ``SignedCut`` among its parts; :func:`split_cuts` and :func:`with_cuts` let
code that works on the cuts take either.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core import checks as _checks
from jax_signedcut._core import protocol as _protocol
from jax_signedcut._core.protocol import Compressed
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut import budget as _budget
from jax_signedcut._signedcut import packing as _packing

#: Cuts expanded at a time by ``reconstruct``: memory stays near BLOCK·(m+n) floats.
RECONSTRUCT_BLOCK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SignedCut(Compressed):
  """A width-w signed cut decomposition A ≈ S·diag(c)·Tᵀ, possibly batched.

  Attributes:
    s_bits: uint32 (..., w, ceil(m/32)): cut j's row signs s_j, packed
      (bit 1 means -1, see :mod:`jax_signedcut._signedcut.packing`).
    t_bits: uint32 (..., w, ceil(n/32)): cut j's column signs t_j, packed.
    c: float32 (..., w): cut scales, ``c_j = s_jᵀ R_{j-1} t_j / (m n) >= 0``.
      Slots past ``num_cuts`` hold 0 (and all-zero bits).
    num_cuts: int32 (...): cuts actually used (< w after a ``max_error`` stop,
      or when other parts took part of a rate/bits budget).
    shape: static (m, n) of each decomposed matrix.
  """

  s_bits: jax.Array
  t_bits: jax.Array
  c: jax.Array
  num_cuts: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def width(self) -> int:
    """Number of cut slots w (static)."""
    return self.c.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading batch dims (static)."""
    return tuple(self.c.shape[:-1])

  def check(self, name: str = "f") -> SignedCut:
    """That the sign words, scales and counts fit ``shape`` and each other.

    Raises:
      TypeError / ValueError: naming ``name`` and the field.
    """
    m, n = _protocol.check_shape(name, self.shape)
    if len(self.shape) != 2:
      raise ValueError(f"{name}.shape must be (m, n), got {self.shape!r}")
    c = self.c
    if not hasattr(c, "shape") or c.ndim < 1:
      raise ValueError(f"{name}.c must have shape (..., w), got {getattr(c, 'shape', c)!r}")
    batch, w = tuple(c.shape[:-1]), c.shape[-1]
    _protocol.check_field(name, "c", c, batch + (w,), "float")
    _protocol.check_field(name, "s_bits", self.s_bits, batch + (w, _packing.num_words(m)),
                          "uint32")
    _protocol.check_field(name, "t_bits", self.t_bits, batch + (w, _packing.num_words(n)),
                          "uint32")
    _protocol.check_field(name, "num_cuts", self.num_cuts, batch, "int")
    _protocol.check_range(name, "num_cuts", self.num_cuts, 0, w)
    return self

  def stored_bytes(self):
    """Bytes of the used cuts per matrix: sign words (uint32) and one f32 scale each."""
    m, n = self.shape
    return self.num_cuts.astype(jnp.int32) * _budget.bytes_per_stored_cut(m, n)

  def _dense(self):
    return _expand(self, RECONSTRUCT_BLOCK)

  def _matmul(self, x2, precision=None):
    from jax_signedcut._kernels import apply as _apply  # noqa: PLC0415  (apply imports this)
    return _apply.cuts_matmul(x2, self, precision=precision)


def _expand(f: SignedCut, block: int) -> jax.Array:
  """``S·diag(c)·Tᵀ`` in f32 (..., m, n), ``block`` cuts at a time.

  Every block is ``block`` cuts long (the last padded with empty slots), so a
  value gives the same bits whatever its count of trailing empty slots (one
  loaded at its stored width, or truncated to its used cuts): XLA may pick a
  contraction's summation order by its length (it did on an AMD CPU without
  AVX-512, for a width of 25 against 50), and the empty slots add exact zeros.
  """
  m, n = f.shape
  w = f.width
  nb = max(1, -(-w // block))
  pad = nb * block - w
  blk = block

  def padw(x):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)]) if pad else x

  s_bits = padw(f.s_bits)
  t_bits = padw(f.t_bits)
  c = jnp.pad(f.c, [(0, 0)] * (f.c.ndim - 1) + [(0, pad)]) if pad else f.c
  batch = f.batch_shape
  s_bits = s_bits.reshape(*batch, nb, blk, s_bits.shape[-1])
  t_bits = t_bits.reshape(*batch, nb, blk, t_bits.shape[-1])
  c = c.reshape(*batch, nb, blk)

  def step(acc, xs):
    sb, tb, cb = xs
    s = _packing.unpack_signs(sb, m)          # (..., blk, m)
    t = _packing.unpack_signs(tb, n)          # (..., blk, n)
    acc = acc + jnp.einsum("...km,...k,...kn->...mn", s, cb, t,
                           precision=jax.lax.Precision.HIGHEST)
    return acc, None

  xs = tuple(jnp.moveaxis(x, len(batch), 0) for x in (s_bits, t_bits, c))
  acc0 = jnp.zeros((*batch, m, n), jnp.float32)
  out, _ = jax.lax.scan(step, acc0, xs)
  return out


def split_cuts(f, name: str = "f") -> tuple[SignedCut, tuple]:
  """``(the SignedCut, the other parts)`` of a SignedCut or of a Sum holding one.

  Raises:
    TypeError: ``f`` is neither, naming ``name``.
  """
  if isinstance(f, SignedCut):
    return f.check(name), ()
  if isinstance(f, Sum):
    cuts = f.part(SignedCut)
    if cuts is not None:
      f.check(name)
      return cuts, tuple(p for p in f.parts if p is not cuts)
  raise TypeError(f"{name} must be a SignedCut or a Sum holding one, got {type(f).__name__}")


def with_cuts(f, cuts: SignedCut):
  """``f`` (a SignedCut or a Sum holding one) with its cuts replaced by ``cuts``."""
  return cuts if isinstance(f, SignedCut) else f.replace_part(SignedCut, cuts)


def truncate(f, k: int | None = None, *, rate: float | None = None,
             bits_per_weight: float | None = None):
  """The first cuts of ``f`` (greedy cuts are prefix-consistent).

  Give either ``k`` (keep the first k cut slots) or a smaller budget (``rate``
  or ``bits_per_weight``, as in :func:`decompose`): then the other parts of a
  :class:`Sum` (sparse entries, a low-rank part) are kept and the cuts are cut
  to what the rest of the budget pays for, so that
  ``truncate(decompose(a, rate=0.5, ...), rate=0.25)`` equals
  ``decompose(a, rate=0.25, ...)`` with the same key.

  Args:
    f: a :class:`SignedCut`, or a :class:`Sum` holding one.
    k: cut slots to keep, 1..width.
    rate, bits_per_weight: a budget, as for ``decompose``.

  Returns:
    The same type as ``f``.

  Raises:
    ValueError: if ``k`` is not in ``1..width``, or not exactly one of k /
      rate / bits_per_weight is given, or the budget does not pay for the
      other parts.
  """
  cuts, others = split_cuts(f)
  given = [x is not None for x in (k, rate, bits_per_weight)]
  if sum(given) != 1:
    raise ValueError(
        f"give exactly one of k, rate, bits_per_weight, got k={k!r}, rate={rate!r}, "
        f"bits_per_weight={bits_per_weight!r}")
  limit = None
  if k is None:
    m, n = cuts.shape
    k = min(cuts.width, _budget.resolve_width(m, n, rate=rate, bits_per_weight=bits_per_weight))
    budget = (rate * 2 * m * n) if rate is not None else bits_per_weight * m * n / 8
    fixed = [p for p in others if not _varies(p)]
    fixed_bytes = sum(_fixed_bytes(p) for p in fixed)
    if fixed_bytes > budget:
      raise ValueError(
          f"the budget ({budget:g} bytes) does not pay for the other parts of f "
          f"({fixed_bytes} bytes: {', '.join(type(p).__name__ for p in fixed)}, shape {(m, n)})")
    limit = budget_limit(budget, m, n, width=k, others=others)
  k = _checks.integer("k", k, minimum=1, maximum=cuts.width, error=ValueError)
  g = dataclasses.replace(
      cuts,
      s_bits=cuts.s_bits[..., :k, :],
      t_bits=cuts.t_bits[..., :k, :],
      c=cuts.c[..., :k],
      num_cuts=jnp.minimum(cuts.num_cuts, k).astype(jnp.int32),
  )
  return with_cuts(f, g if limit is None else limit_cuts(g, limit))


def _varies(part) -> bool:
  """Whether a part's stored bytes vary per matrix (a count), or are fixed by its shape."""
  from jax_signedcut._parts.sparse import Sparse  # noqa: PLC0415
  return isinstance(part, Sparse)


def _fixed_bytes(part) -> int:
  """One matrix's bytes of a part whose size its shape fixes (stored_bytes is a constant)."""
  return int(np.max(np.asarray(part.stored_bytes())))


def budget_limit(budget_bytes: float, m: int, n: int, *, width: int, others=()) -> jax.Array:
  """Cuts that a byte budget pays for after the other parts (int32, per matrix).

  The other parts' bytes are taken from the budget in float32, counted parts
  (the sparse entries) first, then the parts whose size the shape fixes (a
  low-rank part), in that order, so that every path accounts the same way.
  """
  left = jnp.float32(budget_bytes)
  for p in sorted(others, key=lambda p: not _varies(p)):
    left = left - (jnp.asarray(p.stored_bytes(), jnp.float32) if _varies(p)
                   else jnp.float32(_fixed_bytes(p)))
  cuts = jnp.floor(left / _budget.bytes_per_cut(m, n)).astype(jnp.int32)
  return jnp.clip(cuts, 0, width)


def limit_cuts(f: SignedCut, limit) -> SignedCut:
  """``f`` with at most ``limit`` (per matrix) cuts; later slots zeroed."""
  num = jnp.minimum(f.num_cuts, limit).astype(jnp.int32)
  keep = jax.lax.broadcasted_iota(jnp.int32, f.c.shape, f.c.ndim - 1) < num[..., None]
  return dataclasses.replace(
      f,
      s_bits=jnp.where(keep[..., None], f.s_bits, jnp.uint32(0)),
      t_bits=jnp.where(keep[..., None], f.t_bits, jnp.uint32(0)),
      c=jnp.where(keep, f.c, jnp.float32(0)),
      num_cuts=num)
