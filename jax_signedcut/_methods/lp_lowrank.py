"""Robust ℓp rank-k approximation, p ∈ [1, 2], by iteratively reweighted SVD.

The target (Tukan, Maalouf, Weksler, Feldman, arXiv 2009.05647) is the
k-dimensional row subspace V (n×k, orthonormal) minimising

    Σ_i dist(a_i, span V)^p = Σ_i ‖a_i − V Vᵀ a_i‖₂^p,

and the approximation A ≈ (A V) Vᵀ. For p = 2 this is the truncated SVD; for
p < 2 far-away (outlier) rows weigh less, so they pull the subspace less.

Why IRLS and not ℓp Lewis weights: Lewis weights are sampling weights for an
ℓp *subspace embedding* of A's column space (they preserve ‖A x‖_p for all
x); one weighted SVD with them is a heuristic for the distance objective
above, with no guarantee that it lowers it. IRLS minimises that objective
directly, as a majorise–minimise scheme: for p ≤ 2, d ↦ d^p is a concave
function of d², so with w_i = d_i^{p−2} at the current distances d_i,

    d^p ≤ (p/2) w_i d² + const,   with equality at d = d_i,

and the weighted problem min Σ_i w_i dist(a_i, V)² is solved *exactly* by the
top-k right singular vectors of diag(√w) A. Each iteration therefore never
increases the objective, costs one SVD, and is jittable with a fixed count.
Distances below δ = eps·‖A‖_F/√m use the weight δ^{p−2} (a Huber-like
smoothing of d^p near 0, which the same argument covers), so exact inliers do
not get infinite weight. Starting point: the SVD (the p = 2 solution). With
p = 2 all weights are 1 and the result is the truncated-SVD projection.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

from jax_signedcut._methods import registry as _registry
from jax_signedcut._signedcut.decompose import _check_matrix
from jax_signedcut._methods.lplr import LowRank, _batched, check_rank, reconstruct_lowrank

_HI = jax.lax.Precision.HIGHEST


def _top_right(a, rank):
  _, _, vt = jnp.linalg.svd(a, full_matrices=False)
  return vt[:rank]                                              # (k, n)


def _distances(a, vt):
  resid = a - jnp.matmul(jnp.matmul(a, vt.T, precision=_HI), vt, precision=_HI)
  return jnp.sqrt(jnp.sum(jnp.square(resid), axis=-1))


def _lp_one(a, key, *, rank, p, iters, eps):
  del key
  vt = _top_right(a, rank)
  if p != 2.0:
    m = a.shape[0]
    delta = eps * jnp.sqrt(jnp.sum(jnp.square(a)) / m) + jnp.finfo(jnp.float32).tiny

    def step(_, vt):
      d = jnp.maximum(_distances(a, vt), delta)
      w = d ** (p - 2.0)
      w = w / jnp.max(w)                      # scale-free; keeps the SVD well ranged
      return _top_right(jnp.sqrt(w)[:, None] * a, rank)

    vt = jax.lax.fori_loop(0, iters, step, vt)
  u = jnp.matmul(vt, a.T, precision=_HI)                        # (k, m) = (A V)ᵀ
  return u, vt


@functools.partial(jax.jit, static_argnames=("rank", "p", "iters", "eps"))
def _lp_lowrank(a, **config):
  return _batched(_lp_one, a, None, **config)


def lp_cost(a: jax.Array, f: LowRank, p: float) -> jax.Array:
  """Σ_i ‖a_i − (uᵀ v)_i‖₂^p per matrix, shape (...): the ℓp objective of a fit."""
  d = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(a, jnp.float32) - reconstruct_lowrank(f)), -1))
  return jnp.sum(d ** p, axis=-1)


def lp_lowrank(a: jax.Array, *, rank: int, p: float, iters: int = 30,
               eps: float = 1e-6) -> LowRank:
  """Robust rank-k approximation ``A ≈ (A V_k) V_kᵀ`` minimising Σ_i dist(a_i, span V_k)^p.

  Args:
    a: float array (..., m, n) (computed in float32); leading dims are a batch.
    rank: k, 1..min(m, n).
    p: exponent in [1, 2]; 2 gives the truncated-SVD projection, 1 the most
      robust to outlier rows.
    iters: IRLS iterations (each one SVD of an m×n matrix); ignored for p = 2.
    eps: relative distance below which rows stop gaining weight (see module doc).

  Returns:
    A :class:`LowRank` with ``u = (A V_k)ᵀ`` (k, m) and ``v = V_kᵀ`` (k, n),
    both float32, so ``reconstruct_lowrank`` gives (A V_k) V_kᵀ.

  Raises:
    TypeError: non-float ``a``, non-int rank/iters.
    ValueError: bad shape, NaN/Inf (eager only), p outside [1, 2], rank
      outside 1..min(m, n), iters < 0, eps ≤ 0.

  Example:
    >>> import jax
    >>> a = jax.random.normal(jax.random.key(0), (50, 8))
    >>> f = lp_lowrank(a, rank=3, p=1.0, iters=10)
    >>> f.u.shape, f.v.shape
    ((3, 50), (3, 8))
  """
  a = _check_matrix(a)
  m, n = a.shape[-2:]
  rank = check_rank(rank, m, n)
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 1 <= p <= 2:
    raise ValueError(f"p must be a number in [1, 2], got {p!r}")
  if isinstance(iters, bool) or not isinstance(iters, numbers.Integral):
    raise TypeError(f"iters must be an int, got {iters!r}")
  if iters < 0:
    raise ValueError(f"iters must be >= 0, got {iters}")
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) \
      or eps <= 0:
    raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
  return _lp_lowrank(jnp.asarray(a), rank=rank, p=float(p), iters=int(iters), eps=float(eps))


def rank_for_budget(m: int, n: int, bits_per_weight: float) -> int:
  """The rank whose float32 factors (k·(m+n) entries) fit ``bits_per_weight`` (0 if none)."""
  return min(min(m, n), int(bits_per_weight * m * n // (32 * (m + n))))


def _compress(a, *, key, bits_per_weight, p=1.0, iters=30):
  del key   # deterministic
  m, n = a.shape[-2:]
  k = rank_for_budget(m, n, bits_per_weight)
  if k < 1:
    raise ValueError(f"bits_per_weight={bits_per_weight:g} pays for no rank-1 float32 factors "
                     f"on shape {(m, n)} (one takes {32 * (m + n) / (m * n):.4g} bits per weight)")
  return lp_lowrank(a, rank=k, p=p, iters=iters)


_registry.register(_registry.Method(
    "lp_lowrank", _compress, {"p": 1.0, "iters": 30},
    "robust lp rank-k approximation (IRLS), float32 factors, rank from the budget"))
