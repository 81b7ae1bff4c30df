"""The readable pure-jnp greedy signed cut decomposition: the reference oracle.

Every faster backend is tested against this file. It follows the algorithm
contract exactly and does nothing clever: each half-step is a dense matvec with
the remainder R, which is updated in place after every cut.

For one cut, starting from the key-derived signs t (see ``start.py``):

    u ← R t ; γ ← −∞
    repeat (at most MAX_ROUNDS rounds):
        if ‖u‖₁ ≤ γ: stop ;  γ ← ‖u‖₁ ; s ← sgn(u) ; v ← Rᵀ s
        if ‖v‖₁ ≤ γ: stop ;  γ ← ‖v‖₁ ; t ← sgn(v) ; u ← R t
    c ← γ / (m n) ;  R ← R − c s tᵀ

with sgn(0) = +1 and c a correctly rounded float32 division (as in the kernel).
γ rises strictly, so the loop always ends; the round cap is a
safety bound on time only. Wherever the loop stops, γ = sᵀ R t for the returned
pair, so the cut is the exact projection of R on s tᵀ.

With ``max_error`` the remainder's squared norm ‖R‖²_F is recomputed after
every cut and cut j is only made while ‖R‖²_F > max_error² ‖A‖²_F.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_signedcut._signedcut import packing as _packing

# Safety cap on alternation rounds (two matvecs each) per cut. Typical cuts
# converge in 5–30 rounds; the cap only bounds pathological inputs.
MAX_ROUNDS = 1000

_HI = jax.lax.Precision.HIGHEST


def _varying_axes(*xs) -> tuple:
  """The manual mesh axes (inside ``jax.shard_map``) that any of ``xs`` varies over."""
  axes = set()
  for x in xs:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)     # jax >= 0.9
    axes |= set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))
  return tuple(sorted(axes))


def vary_like(tree, *refs):
  """``tree`` with every leaf marked as varying over the manual axes ``refs`` vary over.

  A ``while_loop`` inside ``jax.shard_map`` needs its initial carry typed like the
  body's output; constants (zeros, -inf) are invariant while the body's values
  vary with the input shard. Outside ``shard_map`` this is the identity.
  """
  axes = _varying_axes(*refs)
  if not axes:
    return tree

  def one(x):
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(one, tree)


def _sgn(x):
  return jnp.where(x < 0, -1.0, 1.0).astype(jnp.float32)


def one_cut(r: jax.Array, t0: jax.Array):
  """The greedy cut of remainder ``r`` (m, n) from start signs ``t0`` (n,) ±1.

  Returns:
    (s, t, gamma): ±1 f32 (m,), ±1 f32 (n,), and γ = sᵀ r t (f32 scalar).
  """
  m, _ = r.shape

  def cond(st):
    rounds, _, _, _, _, done = st
    return jnp.logical_and(~done, rounds < MAX_ROUNDS)

  def body(st):
    rounds, gamma, s, t, u, _ = st
    nu = jnp.sum(jnp.abs(u))
    take_s = nu > gamma
    gamma = jnp.where(take_s, nu, gamma)
    s = jnp.where(take_s, _sgn(u), s)
    v = jnp.matmul(s, r, precision=_HI)            # Rᵀ s
    nv = jnp.sum(jnp.abs(v))
    take_t = take_s & (nv > gamma)
    gamma = jnp.where(take_t, nv, gamma)
    t = jnp.where(take_t, _sgn(v), t)
    u = jnp.matmul(r, t, precision=_HI)            # R t
    return rounds + 1, gamma, s, t, u, ~take_t

  u0 = jnp.matmul(r, t0, precision=_HI)
  init = vary_like((jnp.int32(0), jnp.float32(-jnp.inf), jnp.ones((m,), jnp.float32), t0, u0,
                    jnp.bool_(False)), r, t0)
  _, gamma, s, t, _, _ = jax.lax.while_loop(cond, body, init)
  return s, t, gamma


def greedy(a: jax.Array, words: jax.Array, max_error: float | None = None):
  """Greedy decomposition of one matrix.

  Args:
    a: f32 (m, n).
    words: uint32 (w, ceil(n/32)), the packed start signs of each cut.
    max_error: optional relative Frobenius target for an early stop.

  Returns:
    (s_bits (w, ceil(m/32)), t_bits (w, ceil(n/32)), c (w,), num_cuts ()).
  """
  m, n = a.shape
  w = words.shape[0]
  # A true division, as the C++ kernel does: XLA would turn γ / constant into
  # γ · (1/constant), which differs in the last bit unless m·n is a power of two.
  mn = jax.lax.optimization_barrier(jnp.float32(m * n))
  a2 = jnp.sum(jnp.square(a))
  target = 0.0 if max_error is None else jnp.float32(max_error) ** 2 * a2

  def cond(st):
    j, _, r2, *_ = st
    keep = j < w
    if max_error is not None:
      keep = keep & (r2 > target)
    return keep

  def body(st):
    j, r, r2, s_bits, t_bits, c = st
    t0 = _packing.unpack_signs(words[j], n)
    s, t, gamma = one_cut(r, t0)
    cj = gamma / mn
    r = r - cj * jnp.outer(s, t)
    if max_error is not None:
      r2 = jnp.sum(jnp.square(r))
    s_bits = s_bits.at[j].set(_packing.pack_signs(s))
    t_bits = t_bits.at[j].set(_packing.pack_signs(t))
    c = c.at[j].set(cj)
    return j + 1, r, r2, s_bits, t_bits, c

  init = vary_like((jnp.int32(0), a, a2,
                    jnp.zeros((w, _packing.num_words(m)), jnp.uint32),
                    jnp.zeros((w, _packing.num_words(n)), jnp.uint32),
                    jnp.zeros((w,), jnp.float32)), a, words)
  j, _, _, s_bits, t_bits, c = jax.lax.while_loop(cond, body, init)
  return s_bits, t_bits, c, j
