"""The :class:`SignedCut` factor pytree and what can be done with one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._signedcut import budget as _budget
from jax_signedcut._parts import lowrank as _lowrank
from jax_signedcut._signedcut import outliers as _outliers
from jax_signedcut._signedcut import packing as _packing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SignedCut:
  """A width-w signed cut decomposition A ≈ S·diag(c)·Tᵀ, possibly batched.

  Attributes:
    s_bits: uint32 (..., w, ceil(m/32)): cut j's row signs s_j, packed
      (bit 1 means -1, see :mod:`jax_signedcut._signedcut.packing`).
    t_bits: uint32 (..., w, ceil(n/32)): cut j's column signs t_j, packed.
    c: float32 (..., w): cut scales, ``c_j = s_jᵀ R_{j-1} t_j / (m n) >= 0``.
      Slots past ``num_cuts`` hold 0 (and all-zero bits).
    num_cuts: int32 (...): cuts actually used (< w after a ``max_error`` stop,
      or when a sparse part took part of a rate/bits budget).
    shape: static (m, n) of each decomposed matrix.
    sparse_idx: int32 (..., k) flat indices (row * n + col) of the entries
      stored apart, ascending; ``None`` when there is no sparse part.
    sparse_val: float32 (..., k) their values. Slots past ``num_sparse`` hold
      index 0 and value 0.
    num_sparse: int32 (...) entries actually stored apart.
    lr_u: bfloat16 (..., m, r): the low-rank part's left factor ``U`` (``A ≈
      U·Vᵀ + cuts + sparse``); ``None`` when there is no low-rank part.
    lr_v: bfloat16 (..., n, r): its right factor ``V``.
  """

  s_bits: jax.Array
  t_bits: jax.Array
  c: jax.Array
  num_cuts: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  sparse_idx: jax.Array | None = None
  sparse_val: jax.Array | None = None
  num_sparse: jax.Array | None = None
  lr_u: jax.Array | None = None
  lr_v: jax.Array | None = None

  @property
  def width(self) -> int:
    """Number of cut slots w (static)."""
    return self.c.shape[-1]

  @property
  def rank(self) -> int:
    """Rank r of the low-rank part (static; 0 when there is none)."""
    return 0 if self.lr_u is None else self.lr_u.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading batch dims (static)."""
    return tuple(self.c.shape[:-1])


def _check_factor(f, name="f"):
  if not isinstance(f, SignedCut):
    raise TypeError(f"{name} must be a SignedCut, got {type(f).__name__}")


def reconstruct(f: SignedCut, dtype=jnp.float32, *, block: int = 512) -> jax.Array:
  """Dense matrices ``S·diag(c)·Tᵀ`` of shape (..., m, n).

  On a pytree (e.g. the result of ``decompose`` on a params dict), every
  ``SignedCut`` leaf is replaced by its dense matrices and every other leaf is
  kept as it is.

  The ±1 factors are expanded ``block`` cuts at a time so that memory stays
  near ``block*(m+n)`` floats besides the output.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import jax_signedcut as sc
    >>> a = jnp.arange(12.0).reshape(3, 4)
    >>> f = sc.decompose(a, key=jax.random.key(0), width=8)
    >>> sc.reconstruct(f).shape
    (3, 4)
  """
  if not isinstance(f, SignedCut) and not hasattr(f, "shape") and \
      not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(f)):
    from jax_signedcut._core import tree as _tree  # noqa: PLC0415  (_tree imports this module)
    return _tree.reconstruct_tree(f, dtype, block=block)
  _check_factor(f)
  m, n = f.shape
  w = f.width
  nb = max(1, -(-w // block))
  pad = nb * block - w if w > block else 0
  blk = min(block, w)

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
  if f.sparse_idx is not None:
    flat = out.reshape(-1, m * n)
    idx = f.sparse_idx.reshape(-1, f.sparse_idx.shape[-1])
    val = f.sparse_val.reshape(idx.shape)
    flat = jax.vmap(lambda o, i, v: o.at[i].add(v))(flat, idx, val)
    out = flat.reshape(out.shape)
  if f.lr_u is not None:
    out = out + _lowrank.product(f.lr_u, f.lr_v)
  return out.astype(dtype)


def truncate(f: SignedCut, k: int | None = None, *, rate: float | None = None,
             bits_per_weight: float | None = None) -> SignedCut:
  """The first cuts of ``f`` (greedy cuts are prefix-consistent).

  Give either ``k`` (keep the first k cut slots) or a smaller budget (``rate``
  or ``bits_per_weight``, as in :func:`decompose`): then the sparse part is
  kept (and the low-rank part) and the cuts are cut to what the rest of the
  budget pays for, so that
  ``truncate(decompose(a, rate=0.5, ...), rate=0.25)`` equals
  ``decompose(a, rate=0.25, ...)`` with the same key.

  Raises:
    ValueError: if ``k`` is not in ``1..f.width``, or not exactly one of k /
      rate / bits_per_weight is given, or the budget does not pay for the
      low-rank part.
  """
  _check_factor(f)
  given = [x is not None for x in (k, rate, bits_per_weight)]
  if sum(given) != 1:
    raise ValueError(
        f"give exactly one of k, rate, bits_per_weight, got k={k!r}, rate={rate!r}, "
        f"bits_per_weight={bits_per_weight!r}")
  limit = None
  if k is None:
    m, n = f.shape
    k = min(f.width, _budget.resolve_width(m, n, rate=rate, bits_per_weight=bits_per_weight))
    budget = (rate * 2 * m * n) if rate is not None else bits_per_weight * m * n / 8
    lr_bytes = _lowrank.nbytes_for(f.rank, m, n)
    if lr_bytes > budget:
      raise ValueError(
          f"the budget ({budget:g} bytes) does not pay for the low-rank part of f "
          f"(lowrank={f.rank}: {lr_bytes} bytes for shape {(m, n)})")
    limit = budget_limit(budget, m, n, f.num_sparse, k, lowrank_bytes=lr_bytes)
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= f.width:
    raise ValueError(f"k must be an int in 1..{f.width} (the width of f), got {k!r}")
  g = dataclasses.replace(
      f,
      s_bits=f.s_bits[..., :k, :],
      t_bits=f.t_bits[..., :k, :],
      c=f.c[..., :k],
      num_cuts=jnp.minimum(f.num_cuts, k).astype(jnp.int32),
  )
  return g if limit is None else limit_cuts(g, limit)


def budget_limit(budget_bytes: float, m: int, n: int, num_sparse, width: int, *,
                 lowrank_bytes: int = 0) -> jax.Array:
  """Cuts that a byte budget pays for after the sparse and low-rank parts (int32, per matrix)."""
  sparse = 0 if num_sparse is None else num_sparse * _outliers.BYTES_PER_OUTLIER
  left = jnp.float32(budget_bytes) - jnp.asarray(sparse, jnp.float32)
  if lowrank_bytes:
    left = left - jnp.float32(lowrank_bytes)
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


def relative_error(a: jax.Array, f: SignedCut) -> jax.Array:
  """‖a − reconstruct(f)‖_F / ‖a‖_F per matrix, shape (...). 0/0 gives 0."""
  _check_factor(f)
  a = jnp.asarray(a)
  if a.shape[-2:] != tuple(f.shape) or a.shape[:-2] != f.batch_shape:
    raise ValueError(
        f"a has shape {a.shape} but f decomposes matrices of shape "
        f"{f.batch_shape + tuple(f.shape)}")
  return _relative_error(a, f)


@jax.jit
def _relative_error(a, f):
  # One compiled program (cached per shape): eagerly, the reconstruction's
  # blocks otherwise dispatch op by op (~0.1 s per call on small matrices).
  a = a.astype(jnp.float32)
  num = jnp.sqrt(jnp.sum(jnp.square(a - reconstruct(f)), axis=(-2, -1)))
  den = jnp.sqrt(jnp.sum(jnp.square(a), axis=(-2, -1)))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), num)


def nbytes(f: SignedCut) -> int:
  """Bytes of packed storage that ``f`` needs: its used cuts, sparse entries and low-rank part.

  Each used cut takes its sign words (uint32) and one f32 scale; each stored
  sparse entry 8 bytes (int32 index + f32 value). Unused slots (after a
  ``max_error`` stop, or when the sparse part took part of the budget) are not
  counted. A low-rank part takes 2 bytes (bf16) per entry of U and V. Needs
  concrete factors (call it outside ``jax.jit``).
  """
  _check_factor(f)
  if isinstance(f.num_cuts, jax.core.Tracer):
    raise TypeError("nbytes needs concrete factors: call it outside jax.jit")
  m, n = f.shape
  per_cut = 4 * (_packing.num_words(m) + _packing.num_words(n)) + 4
  total = int(np.sum(np.asarray(f.num_cuts, np.int64))) * per_cut
  if f.num_sparse is not None:
    total += int(np.sum(np.asarray(f.num_sparse, np.int64))) * _outliers.BYTES_PER_OUTLIER
  if f.lr_u is not None:
    total += (int(f.lr_u.size) + int(f.lr_v.size)) * _lowrank.BYTES_PER_ENTRY
  return total
