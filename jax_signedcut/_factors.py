"""The :class:`SignedCut` factor pytree and what can be done with one."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jax_signedcut import _packing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SignedCut:
  """A width-w signed cut decomposition A ≈ S·diag(c)·Tᵀ, possibly batched.

  Attributes:
    s_bits: uint32 (..., w, ceil(m/32)): cut j's row signs s_j, packed
      (bit 1 means -1, see :mod:`jax_signedcut._packing`).
    t_bits: uint32 (..., w, ceil(n/32)): cut j's column signs t_j, packed.
    c: float32 (..., w): cut scales, ``c_j = s_jᵀ R_{j-1} t_j / (m n) >= 0``.
      Slots past ``num_cuts`` hold 0 (and all-zero bits).
    num_cuts: int32 (...): cuts actually used (< w only with ``max_error``).
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
    >>> a = jnp.arange(12.0).reshape(3, 4)
    >>> f = decompose(a, key=jax.random.key(0), width=8)
    >>> reconstruct(f).shape
    (3, 4)
  """
  if not isinstance(f, SignedCut) and not hasattr(f, "shape") and \
      not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(f)):
    from jax_signedcut import _tree  # noqa: PLC0415  (_tree imports this module)
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
  return out.astype(dtype)


def truncate(f: SignedCut, k: int) -> SignedCut:
  """The first ``k`` cuts of ``f`` (greedy cuts are prefix-consistent).

  Raises:
    ValueError: if ``k`` is not in ``1..f.width``.
  """
  _check_factor(f)
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= f.width:
    raise ValueError(f"k must be an int in 1..{f.width} (the width of f), got {k!r}")
  return SignedCut(
      s_bits=f.s_bits[..., :k, :],
      t_bits=f.t_bits[..., :k, :],
      c=f.c[..., :k],
      num_cuts=jnp.minimum(f.num_cuts, k).astype(jnp.int32),
      shape=f.shape,
  )


def relative_error(a: jax.Array, f: SignedCut) -> jax.Array:
  """‖a − reconstruct(f)‖_F / ‖a‖_F per matrix, shape (...). 0/0 gives 0."""
  _check_factor(f)
  a = jnp.asarray(a)
  if a.shape[-2:] != tuple(f.shape) or a.shape[:-2] != f.batch_shape:
    raise ValueError(
        f"a has shape {a.shape} but f decomposes matrices of shape "
        f"{f.batch_shape + tuple(f.shape)}")
  a = a.astype(jnp.float32)
  num = jnp.sqrt(jnp.sum(jnp.square(a - reconstruct(f)), axis=(-2, -1)))
  den = jnp.sqrt(jnp.sum(jnp.square(a), axis=(-2, -1)))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), num)


def nbytes(f: SignedCut) -> int:
  """Bytes of packed storage held by ``f``: sign words and f32 scales of all w slots.

  This counts the arrays as they are (static), so it is exact under jit too.
  After a ``max_error`` early stop, ``truncate(f, int(f.num_cuts.max()))``
  drops the unused slots.
  """
  _check_factor(f)
  count = math.prod(f.batch_shape)
  m, n = f.shape
  per_cut = 4 * (_packing.num_words(m) + _packing.num_words(n)) + 4
  return count * f.width * per_cut
