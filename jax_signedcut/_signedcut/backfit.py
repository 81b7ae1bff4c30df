"""Backfitting: re-optimise every cut against all the others (opt-in post-processing).

The greedy makes cut j against the remainder of cuts 0..j-1 only and never
revisits it. A backfitting pass visits the cuts in order and, for cut k,

    R_k ← A − sparse − Σ_{j≠k} c_j s_j t_jᵀ          # every other cut, current values
    (s_k, t_k, γ) ← the greedy's alternating sign search on R_k, started from t_k
    c_k ← γ / (m n)                                  # the exact projection, still ≥ 0

The search starts from the cut's own column signs and γ = ‖R_k t_k‖₁ ≥
|s_kᵀ R_k t_k|, so the new cut removes at least as much of R_k as the old one:
the error never increases (up to float32 rounding). The format does not change
(same sign words, scales, sparse part and ``num_cuts``), so everything that
reads a :class:`SignedCut` reads the result. A pass costs about one greedy run
with the dense jnp search (a few matvecs with the m×n remainder per cut).

What it breaks: greedy cuts are prefix-consistent (the first k cuts are the
width-k decomposition); backfitted ones are not. Truncate first, then backfit
the factors you will keep: ``backfit(truncate(f, bits_per_weight=2), a)``.

Measured (all-MiniLM-L6-v2 layer 0 and the embedding tables, 2 bits per
weight, outliers "auto", ``examples/compare_minilm.py --layers 1 --bits 2
--backfit 1 2 3``): one pass lowers the relative error by 1.6 % (attention
kernels) to 4.5 % (FFN) and 10 % (word embeddings), three passes by 2.7–17 %:
query 0.370 → 0.364 → 0.361 → 0.360, word embeddings 0.429 → 0.385 → 0.370 →
0.362, position embeddings 0.150 → 0.147 → 0.145 → 0.144 (truncated SVD with
bf16 factors: 0.122 there; the cut format itself is the limit on that smooth,
nearly rank-20 table). Refitting only the scales c by least squares with S, T
fixed gains < 0.3 %, so this module does not offer it.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._signedcut import factors as _factors
from jax_signedcut._parts.sparse import Sparse
from jax_signedcut._signedcut import oracle as _oracle
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut


def backfit(f: SignedCut, a, *, passes: int = 1) -> SignedCut:
  """Backfitting passes over the cuts of ``f``: each re-optimised against all the others.

  Opt-in post-processing after :func:`decompose` (see
  :mod:`jax_signedcut._signedcut.backfit`): for each used cut k in order, the cut is put
  back into the remainder, the greedy's alternating sign search is rerun from
  its own column signs, and the result (with its exact scale) is taken out
  again. The error never increases; ``num_cuts``, the sparse part and the
  low-rank part are kept.

  The result is **not prefix-consistent**: ``truncate(backfit(f, a), k)`` is
  not a width-k decomposition of anything in particular. Truncate to the
  budget you keep first, then backfit.

  Args:
    f: a :class:`SignedCut` of ``a`` (possibly batched), or a :class:`Sum`
      holding one (its other parts are kept).
    a: the decomposed array, shape ``f.batch_shape + f.shape``; float32,
      bfloat16, float16 or float64 (computed in float32).
    passes: number of passes over all cuts (static), an int >= 1.

  Returns:
    The same type as ``f``, with the same shapes, widths and ``num_cuts``.

  Raises:
    TypeError: ``f`` holds no ``SignedCut`` or ``a`` is not a float array.
    ValueError: ``a`` has the wrong shape or non-finite entries (checked
      eagerly only), or ``passes`` is not an int >= 1.

  Example:
    >>> import jax
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(1), (64, 48))
    >>> f = sc.decompose(a, key=jax.random.key(0), width=40)
    >>> g = sc.backfit(f, a, passes=2)
    >>> bool(sc.relative_error(a, g) <= sc.relative_error(a, f))
    True
  """
  from jax_signedcut._signedcut.decompose import _check_matrix  # noqa: PLC0415  (avoids an import cycle)

  _factors.split_cuts(f)
  a = _check_matrix(a)
  want = f.batch_shape + tuple(f.shape)
  if tuple(a.shape) != want:
    raise ValueError(f"a has shape {tuple(a.shape)} but f decomposes matrices of shape {want}")
  if isinstance(passes, bool) or not isinstance(passes, numbers.Integral) or passes < 1:
    raise ValueError(f"passes must be an int >= 1, got {passes!r}")
  return _backfit(f, jnp.asarray(a), passes=int(passes))


@functools.partial(jax.jit, static_argnames=("passes",))
def _backfit(f, a, *, passes):
  batch = f.batch_shape
  m, n = f.shape
  count = int(np.prod(batch, dtype=np.int64))
  flat = jax.tree.map(lambda x: x.reshape(count, *x.shape[len(batch):]), f)
  a = a.astype(jnp.float32).reshape(count, m, n)
  out = jax.vmap(functools.partial(_backfit_one, passes=passes))(flat, a)
  return jax.tree.map(lambda x: x.reshape(*batch, *x.shape[1:]), out)


def _backfit_one(f, a, *, passes):
  """One matrix: ``passes`` backfitting passes (f unbatched, a (m, n) f32)."""
  m, n = f.shape
  mn = jnp.float32(m * n)
  cuts, others = _factors.split_cuts(f)
  # The other parts stay as they are; the sparse entries are taken out first
  # (the order the remainder was formed in, so it matches bit for bit).
  for p in sorted(others, key=lambda p: not isinstance(p, Sparse)):
    a = a - p._dense()  # noqa: SLF001

  def one(k, st):
    r, s_bits, t_bits, c = st
    s = _packing.unpack_signs(s_bits[k], m)
    t = _packing.unpack_signs(t_bits[k], n)
    r = r + c[k] * jnp.outer(s, t)                       # R_k: every cut but k
    s, t, gamma = _oracle.one_cut(r, t)
    ck = gamma / mn
    r = r - ck * jnp.outer(s, t)
    return (r, s_bits.at[k].set(_packing.pack_signs(s)),
            t_bits.at[k].set(_packing.pack_signs(t)), c.at[k].set(ck))

  def one_pass(_, cuts):
    # The remainder is rebuilt from the factors every pass so that f32
    # rounding of the in-place updates does not build up.
    r = a - cuts._dense()  # noqa: SLF001
    _, s_bits, t_bits, c = jax.lax.fori_loop(
        0, cuts.num_cuts, one, (r, cuts.s_bits, cuts.t_bits, cuts.c))
    return dataclasses.replace(cuts, s_bits=s_bits, t_bits=t_bits, c=c)

  cuts = jax.lax.fori_loop(0, passes, one_pass, cuts)
  return _factors.with_cuts(f, cuts)
