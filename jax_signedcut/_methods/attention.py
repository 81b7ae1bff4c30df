"""One-layer attention regression (Gao, Song, Wang, Yin, arXiv 2309.07418).

Given a layer's inputs A₁ (n×d₁), A₂ (l×d₂), A₃ (l×d₃) and target outputs
B (n×e), fit X (d₁×d₂, the role of W_Q W_Kᵀ) and Y (d₃×e, the role of W_V) in

    L(X, Y) = ‖D⁻¹ exp(A₁ X A₂ᵀ) A₃ Y − B‖²_F,   D = diag(exp(A₁ X A₂ᵀ) 1)

i.e. ‖P A₃ Y − B‖² with P = softmax(A₁ X A₂ᵀ) row-wise (computed with the row
maximum subtracted, which leaves P unchanged and keeps exp finite). The paper
has A₁, A₂, A₃, B all n×d and X, Y d×d; the shapes here are the general ones.

Closed-form gradient (derived for the tests): with R = P A₃ Y − B,

    ∂L/∂Y = 2 (P A₃)ᵀ R
    G = 2 R (A₃ Y)ᵀ                        (n×l, ∂L/∂P)
    ∂L/∂S = P ∘ (G − ((P ∘ G) 1) 1ᵀ)         (softmax backward, S = A₁ X A₂ᵀ)
    ∂L/∂X = A₁ᵀ (∂L/∂S) A₂

Use in the library: after compressing an attention layer's weights, refit
X = W_Q W_Kᵀ and Y = W_V to the original layer's outputs on sample inputs.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST
SOLVERS = ("auto", "dense", "cg")
# "auto" builds the d₁d₂×d₁d₂ Gauss–Newton matrix up to this many unknowns and
# goes matrix-free (jvp/vjp products inside conjugate gradients) beyond.
DENSE_MAX_UNKNOWNS = 1024
_MAX_TRIES = 30   # Levenberg–Marquardt damping increases per iteration before giving up


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HI)


def _check_shapes(a1, a2, a3, b, x=None, y=None, names=("x", "y")):
  """Shape checks with messages naming the arguments; returns (n, l, d1, d2, d3, e)."""
  arrs = {"a1": a1, "a2": a2, "a3": a3, "b": b, names[0]: x, names[1]: y}
  for name, v in arrs.items():
    if v is None:
      continue
    if not hasattr(v, "dtype") or not hasattr(v, "shape"):
      raise TypeError(f"{name} must be an array, got {type(v).__name__}")
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise TypeError(f"{name} must be a float array, got dtype {v.dtype}")
    if v.ndim != 2:
      raise ValueError(f"{name} must be a matrix (ndim 2), got shape {v.shape}")
  (n, d1), (nk, d2), (nk3, d3), (nb, e) = a1.shape, a2.shape, a3.shape, b.shape
  if nk3 != nk:
    raise ValueError(f"a3 must have as many rows as a2 ({nk}), got a2 shape {a2.shape} and a3 "
                     f"shape {a3.shape}")
  if nb != n:
    raise ValueError(f"b must have as many rows as a1 ({n}), got a1 shape {a1.shape} and b "
                     f"shape {b.shape}")
  if x is not None and x.shape != (d1, d2):
    raise ValueError(f"{names[0]} must have shape (a1.shape[1], a2.shape[1]) = {(d1, d2)}, "
                     f"got {x.shape}")
  if y is not None and y.shape != (d3, e):
    raise ValueError(f"{names[1]} must have shape (a3.shape[1], b.shape[1]) = {(d3, e)}, "
                     f"got {y.shape}")
  return n, nk, d1, d2, d3, e


def _check_finite(**arrs):
  for name, v in arrs.items():
    if not isinstance(v, jax.core.Tracer) and not np.isfinite(np.asarray(v)).all():
      raise ValueError(f"{name} has non-finite entries (NaN/Inf)")


def attention_probs(a1: jax.Array, a2: jax.Array, x: jax.Array) -> jax.Array:
  """P = D⁻¹ exp(A₁ X A₂ᵀ) (n×l), row-stochastic, computed stably."""
  s = _mm(_mm(a1, x), a2.T)
  s = s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.exp(s)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def attention_loss(a1, a2, a3, b, x, y) -> jax.Array:
  """L(X, Y) = ‖D⁻¹ exp(A₁ X A₂ᵀ) A₃ Y − B‖²_F (a scalar).

  Args:
    a1: (n, d1). a2: (l, d2). a3: (l, d3). b: (n, e). x: (d1, d2). y: (d3, e).

  Raises:
    TypeError: non-float arrays. ValueError: mismatched shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.eye(3)
    >>> float(attention_loss(a, a, a, jnp.full((3, 3), 1 / 3), jnp.zeros((3, 3)), jnp.eye(3)))
    0.0
  """
  _check_shapes(a1, a2, a3, b, x, y)
  return _loss(a1, a2, a3, b, x, y)


def _loss(a1, a2, a3, b, x, y):
  r = _mm(attention_probs(a1, a2, x), _mm(a3, y)) - b
  return jnp.sum(jnp.square(r))


def attention_loss_kron(a1, a2, a3, b, x, y) -> jax.Array:
  """The paper's vectorised form of the loss (for checks on tiny sizes; O(n l d1 d2) memory).

  With 𝖠 = A₁ ⊗ A₂ (nl × d₁d₂) and x = vec(X) (row-major, so that
  vec(A₁ X A₂ᵀ) = 𝖠 x): for each row j₀ ∈ [n], 𝖠_{j₀} = rows j₀l … j₀l + l − 1,
  u(x)_{j₀} = exp(𝖠_{j₀} x), α(x)_{j₀} = ⟨u(x)_{j₀}, 1⟩, f(x)_{j₀} = u/α, and
  for each output column i₀, h(y)_{i₀} = A₃ Y_{:, i₀}; then
  L = Σ_{j₀, i₀} (⟨f(x)_{j₀}, h(y)_{i₀}⟩ − B_{j₀ i₀})².
  """
  n, nk, _, _, _, _ = _check_shapes(a1, a2, a3, b, x, y)
  big_a = jnp.kron(a1, a2)                                   # (n l, d1 d2)
  u = jnp.exp(_mm(big_a, x.reshape(-1))).reshape(n, nk)       # rows u(x)_{j0}
  f = u / jnp.sum(u, axis=1, keepdims=True)
  h = _mm(a3, y)                                             # columns h(y)_{i0}
  c = _mm(f, h) - b
  return jnp.sum(jnp.square(c))


def attention_grad(a1, a2, a3, b, x, y) -> tuple[jax.Array, jax.Array]:
  """(∂L/∂X, ∂L/∂Y) in closed form (see the module docstring)."""
  _check_shapes(a1, a2, a3, b, x, y)
  p = attention_probs(a1, a2, x)
  h = _mm(a3, y)
  r = _mm(p, h) - b
  g_y = 2 * _mm(_mm(p, a3).T, r)
  g_p = 2 * _mm(r, h.T)
  g_s = p * (g_p - jnp.sum(p * g_p, axis=-1, keepdims=True))
  g_x = _mm(_mm(a1.T, g_s), a2)
  return g_x, g_y


class AttentionFit(NamedTuple):
  """Result of :func:`fit_attention`.

  Attributes:
    x: (d1, d2) fitted X.
    y: (d3, e) fitted Y.
    loss: (iters + 1,) objective L(X, Y) + reg·‖Y‖²_F at the start and after
      each iteration (non-increasing).
  """

  x: jax.Array
  y: jax.Array
  loss: jax.Array


def _ridge(m, b, reg):
  """argmin_Y ‖M Y − B‖² + reg ‖Y‖² (the min-norm solution at reg 0), differentiable in M."""
  k = m.shape[1]
  if reg > 0:
    m = jnp.concatenate([m, math.sqrt(reg) * jnp.eye(k, dtype=m.dtype)])
    b = jnp.concatenate([b, jnp.zeros((k, b.shape[1]), b.dtype)])
  return _mm(jnp.linalg.pinv(m), b)


@functools.partial(jax.jit, static_argnames=("iters", "reg", "solver", "cg_iters", "projected"))
def _fit(a1, a2, a3, b, x0, y0, *, iters, reg, solver, cg_iters, projected):
  dtype = x0.dtype
  shape_x = x0.shape

  def objective(x, y):
    return _loss(a1, a2, a3, b, x, y) + reg * jnp.sum(jnp.square(y))

  def ridge(x):
    return _ridge(_mm(attention_probs(a1, a2, x), a3), b, reg)

  def gn_step(x, y, lam):
    """One Levenberg–Marquardt iteration on X; returns (x, lam)."""
    def resid(xv):
      xm = xv.reshape(shape_x)
      yy = ridge(xm) if projected else y
      r = (_mm(attention_probs(a1, a2, xm), _mm(a3, yy)) - b).reshape(-1)
      return jnp.concatenate([r, math.sqrt(reg) * yy.reshape(-1)]) if reg > 0 else r

    xv = x.reshape(-1)
    r0 = resid(xv)
    f0 = jnp.sum(jnp.square(r0))
    _, vjp = jax.vjp(resid, xv)
    g = vjp(r0)[0]                                              # Jᵀ r
    if solver == "dense":
      jac = jax.jacfwd(resid)(xv)                               # (N, d1 d2)
      evals, evecs = jnp.linalg.eigh(_mm(jac.T, jac))
      evals = jnp.maximum(evals, 0)
      gq = _mm(evecs.T, g)
      size = jnp.mean(evals)
      solve = lambda mu: -_mm(evecs, gq / (evals + mu))  # noqa: E731
    else:
      jtj = lambda v: vjp(jax.jvp(resid, (xv,), (v,))[1])[0]  # noqa: E731
      # Damping is relative to JᵀJ's size along the gradient (a Rayleigh quotient).
      size = jnp.sum(jnp.square(jtj(g))) ** 0.5 / jnp.maximum(jnp.sum(jnp.square(g)) ** 0.5,
                                                               jnp.finfo(dtype).tiny)
      solve = lambda mu: -jax.scipy.sparse.linalg.cg(  # noqa: E731
          lambda v: jtj(v) + mu * v, g, maxiter=cg_iters)[0]
    size = jnp.maximum(size, jnp.finfo(dtype).tiny)

    def cond(st):
      tries, _, _, done = st
      return (~done) & (tries < _MAX_TRIES)

    def body(st):
      tries, lam, best, _ = st
      cand = xv + solve(lam * size)
      ok = jnp.sum(jnp.square(resid(cand))) < f0
      ok = ok & jnp.all(jnp.isfinite(cand))
      best = jnp.where(ok, cand, best)
      lam = jnp.where(ok, lam / 3, lam * 8)
      return tries + 1, lam, best, ok

    _, lam, xv, _ = jax.lax.while_loop(cond, body, (0, lam, xv, jnp.bool_(False)))
    return xv.reshape(shape_x), jnp.clip(lam, 1e-12, 1e12)

  def step(carry, _):
    x, y, lam = carry
    y = ridge(x)
    x, lam = gn_step(x, y, lam)
    if projected:
      y = ridge(x)
    return (x, y, lam), objective(x, y)

  lam0 = jnp.asarray(1e-3, dtype)
  (x, y, _), hist = jax.lax.scan(step, (x0, y0, lam0), None, length=iters)
  return AttentionFit(x=x, y=y, loss=jnp.concatenate([objective(x0, y0)[None], hist]))


def fit_attention(a1, a2, a3, b, *, x0, y0, iters: int = 20, reg: float = 0.0,
                  solver: str = "auto", cg_iters: int = 50, projected: bool = True
                  ) -> AttentionFit:
  """Fits X and Y of a one-layer attention to targets B by alternating minimisation.

  Each iteration (i) sets Y to the exact ridge solution for the current X,
  ``Y(X) = argmin_Y ‖P A₃ Y − B‖² + reg‖Y‖²``, then (ii) takes one damped
  Gauss–Newton (Levenberg–Marquardt) step on X, accepted only if the loss
  drops (the damping grows ×8 until it does, at most 30 times, and shrinks
  ÷3 after a success), and (iii) re-solves Y. With ``projected=True`` (the
  default) the Gauss–Newton step differentiates through Y(X) — variable
  projection (Golub–Pereyra) — so X and Y do not zig-zag: plain alternation
  (``projected=False``, Y frozen during the X step) converges only linearly
  (rate ≈ 0.7 per iteration on the planted test problem, against below 1e-8
  in a few iterations with projection). Every half never increases
  ``L(X, Y) + reg‖Y‖²``, so the recorded history is non-increasing.

  Args:
    a1: (n, d1), a2: (l, d2), a3: (l, d3), b: (n, e) float arrays (computed
      in their common float dtype; enable x64 for float64).
    x0: (d1, d2) start for X. y0: (d3, e) start for Y (only the first history
      entry uses it: step (i) replaces it).
    iters: number of iterations (static).
    reg: ridge weight ≥ 0 on Y (static).
    solver: ``"dense"`` (Gauss–Newton matrix from ``jacfwd``, one eigh per
      iteration), ``"cg"`` (matrix-free JᵀJ products via jvp/vjp, conjugate
      gradients) or ``"auto"`` (dense up to d1·d2 = 1024 unknowns).
    cg_iters: conjugate-gradient iterations per solve for ``"cg"``.
    projected: Gauss–Newton on the reduced loss L(X, Y(X)) (see above).

  Returns:
    :class:`AttentionFit` (x, y, loss history of length iters + 1).

  Raises:
    TypeError: non-float or non-array inputs. ValueError: mismatched shapes,
      NaN/Inf inputs (eager only), iters < 1, reg < 0, unknown solver.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> ks = jax.random.split(jax.random.key(0), 4)
    >>> a1, a2, a3 = (jax.random.normal(k, (16, 4)) for k in ks[:3])
    >>> b = jax.random.normal(ks[3], (16, 4))
    >>> fit = fit_attention(a1, a2, a3, b, x0=jnp.zeros((4, 4)), y0=jnp.zeros((4, 4)), iters=5)
    >>> fit.loss.shape, bool(fit.loss[-1] < fit.loss[0])
    ((6,), True)
  """
  _check_shapes(a1, a2, a3, b, x0, y0, names=("x0", "y0"))
  _check_finite(a1=a1, a2=a2, a3=a3, b=b, x0=x0, y0=y0)
  if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
    raise ValueError(f"iters must be an int >= 1, got {iters!r}")
  if isinstance(reg, bool) or not isinstance(reg, numbers.Real) or not math.isfinite(reg) \
      or reg < 0:
    raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  if isinstance(cg_iters, bool) or not isinstance(cg_iters, numbers.Integral) or cg_iters < 1:
    raise ValueError(f"cg_iters must be an int >= 1, got {cg_iters!r}")
  if not isinstance(projected, bool):
    raise TypeError(f"projected must be a bool, got {projected!r}")
  if solver == "auto":
    solver = "dense" if x0.size <= DENSE_MAX_UNKNOWNS else "cg"
  # float64 if any input is float64 (under x64), else float32; chosen
  # explicitly because strict dtype promotion forbids mixing the two.
  wide = any(jnp.asarray(v).dtype == jnp.float64 for v in (a1, a2, a3, b, x0, y0))
  dtype = jnp.float64 if wide else jnp.float32
  args = [jnp.asarray(v, dtype) for v in (a1, a2, a3, b, x0, y0)]
  return _fit(*args, iters=int(iters), reg=float(reg), solver=solver, cg_iters=int(cg_iters),
              projected=projected)
