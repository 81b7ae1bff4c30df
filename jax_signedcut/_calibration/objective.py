"""The output-error objective of one linear layer, and signed cuts that minimise it.

For ``y = x W`` (Flax layout, ``W`` (in, out) = (m, n)) and the input second
moment ``H`` (m, m), an approximation ``Ŵ`` loses

    L(Ŵ) = tr(Eᵀ H E),   E = W − Ŵ,

the mean squared error of the layer's outputs on the calibration inputs.

A cut ``c s tᵀ`` (s over the m inputs, t over the n outputs) on a remainder R
lowers ``tr(Rᵀ H R)`` by ``2c sᵀHRt − c² n sᵀHs``; the best c is
``sᵀHRt / (n sᵀHs)`` and the gain ``(sᵀHRt)² / (n sᵀHs)``. So, with
``P = H R`` kept up to date instead of R (``P ← P − c (Hs) tᵀ``):

* for fixed s the best t is ``sgn(Pᵀ s)`` (exact: the denominator does not
  depend on t);
* for fixed t the best s maximises ``(sᵀa)² / (sᵀHs)`` with ``a = P t``, a
  binary fractional quadratic problem. ``sgn(a)`` is exact for diagonal H;
  :func:`hcut_decompose` starts there and then flips single signs while the
  ratio rises (each flip is O(m): ``sᵀa`` and ``sᵀHs`` change by known amounts
  and ``Hs`` by one column of H).

The cuts stay greedy on the remainder, so they are prefix-consistent (the
first k cuts of a width-w run are the width-k run). ``gains`` records the drop
of L per cut, so the whole error curve comes from one run.

:func:`hcut_backfit` revisits cuts already made (by this search or any other):
each is put back into the remainder and searched again from its own signs
against all the others, which never raises L and gives up prefix consistency.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._kernels import extension

_HI = jax.lax.Precision.HIGHEST


def output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """``tr((W − Ŵ)ᵀ H (W − Ŵ))`` for (m, n) matrices and H (m, m)."""
  e = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
  return jnp.sum(e * jnp.matmul(jnp.asarray(h, jnp.float32), e, precision=_HI))


def relative_output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """``sqrt(tr(EᵀHE) / tr(WᵀHW))``: ‖X(W − Ŵ)‖_F / ‖XW‖_F on the calibration inputs."""
  return jnp.sqrt(output_error(w, w_hat, h) / output_error(w, jnp.zeros_like(w), h))


def _ratio(num, den):
  """``num² / den``, the gain of a cut (up to 1/n) for ``num = sᵀa``, ``den = sᵀHs``."""
  return num * num / jnp.maximum(den, 1e-30)


def _flip_search(s, hs, a, h, diag_h, max_flips):
  """Single sign flips of s while (sᵀa)² / (sᵀHs) rises (at most max_flips).

  ``h`` is exactly symmetric, so flipping s_i changes Hs by row i (contiguous).
  Returns ``(s, hs, flips)``.
  """

  def cond(st):
    return st[3] & (st[2] < max_flips)

  def body(st):
    s, hs, k, _, flips = st
    p = jnp.dot(s, a)
    q = jnp.dot(s, hs)
    new = _ratio(p - 2 * s * a, q - 4 * s * hs + 4 * diag_h)
    i = jnp.argmax(new)
    better = new[i] > _ratio(p, q) * (1 + 1e-6)
    si = jnp.where(better, s[i], 0.0)     # 0: no flip (s and hs unchanged)
    return (s.at[i].add(-2 * si), hs - 2 * si * h[i], k + 1, better,
            flips + better.astype(jnp.int32))

  st = (s, hs, jnp.int32(0), jnp.bool_(True), jnp.int32(0))
  s, hs, _, _, flips = jax.lax.while_loop(cond, body, st)
  return s, hs, flips


def _sgn(x):
  return jnp.where(x >= 0, 1.0, -1.0).astype(jnp.float32)


SEARCH_IMPLS = ("auto", "jnp", "ffi")
# The C++ search's instruction set (the handlers' isa attribute): "auto" is the
# JAX_SIGNEDCUT_HCUT_KERNEL environment variable if set, else AVX-512 where the CPU has
# it; both builds round the same (xla_ffi/hcut_search_core.inc), the tests check it.
KERNELS = {"auto": 0, "scalar": 1, "avx512": 2}


def _isa(kernel):
  """The handlers' ``isa`` attribute for a :data:`KERNELS` name."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {kernel!r}")
  return np.int32(KERNELS[kernel])


_SEARCH_TARGET = "signedcut_hcut_search"


def _cut_search(p, q_mat, h, h_inv, diag_h, s, hs, t, *, keep_q, max_flips, max_rounds,
                impl="auto", kernel="auto"):
  """One cut's H-aware sign search: ``(s, hs, t, stats)``, stats = int32 (rounds, flips, ·).

  ``impl``: ``"jnp"`` the readable reference (:func:`_cut_search_jnp`), ``"ffi"``
  the C++ handler (``xla_ffi/hcut_search.cc``: the same search in one custom
  call, with incrementally kept images), ``"auto"`` the value of the
  environment variable ``JAX_SIGNEDCUT_HCUT_IMPL`` if set (``jnp`` or ``ffi``;
  read at trace time, like the other kernels' variables), else the handler
  where the computation lowers for CPU and the extension has it, else the
  reference.
  """
  impl = _resolve_impl(impl)
  args = (p, q_mat if keep_q else jnp.zeros((0, p.shape[1]), jnp.float32), h, h_inv, diag_h,
          s, hs, t)
  ref = functools.partial(_cut_search_jnp, keep_q=keep_q, max_flips=max_flips,
                          max_rounds=max_rounds)
  if impl == "jnp" or max_rounds < 1:
    return ref(*args)
  ffi = functools.partial(_cut_search_ffi, max_flips=max_flips, max_rounds=max_rounds,
                          kernel=kernel)
  if impl == "ffi":
    if not extension.has_target(_SEARCH_TARGET):
      raise RuntimeError("impl='ffi' needs the compiled extension with the hcut search: "
                         + extension.MISSING_HINT)
    return ffi(*args)
  return extension.on_platform(*args, cpu=ffi, default=ref)


def _cut_search_ffi(p, q_mat, h, h_inv, diag_h, s, hs, t, *, max_flips, max_rounds,
                    kernel="auto"):
  m, n = p.shape
  out = (jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.float32),
         jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.int32))
  # One search per call: under vmap the handler runs once per matrix.
  call = jax.ffi.ffi_call(_SEARCH_TARGET, out, vmap_method="sequential")
  return call(p, q_mat, h, h_inv, diag_h, s, hs, t, max_flips=np.int32(max(0, max_flips)),
              max_rounds=np.int32(max_rounds), isa=_isa(kernel))


def _cut_search_jnp(p, q_mat, h, h_inv, diag_h, s, hs, t, *, keep_q, max_flips, max_rounds):
  """The alternating sign search of one cut on ``P = H R``, from the start ``(s, t)``.

  Each round takes the best s of ``sgn(P t)``, ``sgn(H⁻¹ P t)`` and the current s,
  refines it by single flips, then ``t = sgn(Pᵀ s)`` (exact). The ratio
  ``(sᵀ P t)² / (sᵀ H s)`` never falls from the start's: a search started at a
  cut already made cannot end worse. ``hs`` is ``H s`` of the start.
  """

  def s_step(t, s_prev, hs_prev):
    a = jnp.matmul(p, t, precision=_HI)
    s0 = _sgn(a)
    s1 = _sgn(jnp.matmul(q_mat, t, precision=_HI) if keep_q
              else jnp.matmul(h_inv, a, precision=_HI))
    hs01 = jnp.matmul(h, jnp.stack([s0, s1], axis=1), precision=_HI)   # one read of H
    hs0, hs1 = hs01[:, 0], hs01[:, 1]
    r0 = _ratio(jnp.dot(s0, a), jnp.dot(s0, hs0))
    r1 = _ratio(jnp.dot(s1, a), jnp.dot(s1, hs1))
    use1 = r1 > r0
    s0, hs0, r0 = jnp.where(use1, s1, s0), jnp.where(use1, hs1, hs0), jnp.maximum(r0, r1)
    use_prev = _ratio(jnp.dot(s_prev, a), jnp.dot(s_prev, hs_prev)) > r0
    s = jnp.where(use_prev, s_prev, s0)
    hs = jnp.where(use_prev, hs_prev, hs0)
    return _flip_search(s, hs, a, h, diag_h, max_flips)

  def round_(st):
    s, hs, t, val, k, _, flips = st
    s, hs, f = s_step(t, s, hs)
    u = jnp.matmul(p.T, s, precision=_HI)
    t = _sgn(u)
    new = _ratio(jnp.sum(jnp.abs(u)), jnp.dot(s, hs))    # sᵀ P sgn(Pᵀs) = ‖Pᵀs‖₁
    return s, hs, t, jnp.maximum(new, val), k + 1, new > val * (1 + 1e-7), flips + f

  def cond(st):
    return st[5] & (st[4] < max_rounds)

  st = (s, hs, t, jnp.float32(-1), jnp.int32(0), jnp.bool_(True), jnp.int32(0))
  s, hs, t, _, rounds, _, flips = jax.lax.while_loop(cond, round_, st)
  return s, hs, t, jnp.stack([rounds, flips, jnp.int32(0)])


def _prepare(w, h, keep_q):
  m, n = w.shape
  h = h.astype(jnp.float32)
  h = (h + h.T) / 2                       # rows = columns exactly (the flips read rows)
  diag_h = jnp.diagonal(h)
  # The continuous maximiser of (sᵀa)²/(sᵀHs) is s ∝ H⁻¹a: its signs are a second start.
  h_inv = jnp.linalg.inv(h + 1e-6 * jnp.mean(diag_h) * jnp.eye(m, dtype=h.dtype))
  keep_q = n < m if keep_q is None else keep_q
  return h, diag_h, h_inv, keep_q


def _take_cut(p, q_mat, h_inv, s, hs, t, keep_q):
  """The exact scale of cut (s, t) on P, and P (and Q = H⁻¹P) with the cut taken out."""
  n = p.shape[1]
  q = jnp.dot(s, hs)
  num = jnp.dot(s, jnp.matmul(p, t, precision=_HI))
  c = jnp.where(q > 0, num / (n * jnp.where(q > 0, q, 1)), 0.0)
  p = p - c * jnp.outer(hs, t)
  if keep_q:
    q_mat = q_mat - c * jnp.outer(jnp.matmul(h_inv, hs, precision=_HI), t)
  return c, c * num, p, q_mat


@functools.partial(jax.jit, static_argnames=("width", "max_flips", "max_rounds", "keep_q", "impl",
                                             "stats", "kernel"))
def _hcut(w, h, key, *, width, max_flips, max_rounds, keep_q=None, impl="auto", stats=False,
          kernel="auto"):
  # Memory traffic is the cost (one matrix-vector product reads a whole matrix):
  # per round this reads H once (Hs for both sign starts in one product), P twice
  # and H⁻¹P once. With fewer outputs than inputs (n < m) Q = H⁻¹P (m, n) is kept
  # up to date per cut (Q ← Q − c (H⁻¹Hs) tᵀ), so a round reads Q t instead of H⁻¹ (P t).
  m, n = w.shape
  h, diag_h, h_inv, keep_q = _prepare(w, h, keep_q)
  p0 = jnp.matmul(h, w.astype(jnp.float32), precision=_HI)
  q0 = jnp.matmul(h_inv, p0, precision=_HI) if keep_q else jnp.zeros((0, n), jnp.float32)
  ones = jnp.ones((m,), jnp.float32)
  h_ones = jnp.matmul(h, ones, precision=_HI)

  def one_cut(j, carry):
    p, q_mat, s_all, t_all, c_all, g_all, counts = carry
    t = jax.random.rademacher(jax.random.fold_in(key, j), (n,), jnp.float32)
    s, hs, t, st = _cut_search(p, q_mat, h, h_inv, diag_h, ones, h_ones, t, keep_q=keep_q,
                               max_flips=max_flips, max_rounds=max_rounds, impl=impl,
                               kernel=kernel)
    c, gain, p, q_mat = _take_cut(p, q_mat, h_inv, s, hs, t, keep_q)
    return (p, q_mat, s_all.at[j].set(s), t_all.at[j].set(t), c_all.at[j].set(c),
            g_all.at[j].set(gain), counts + st)

  init = (p0, q0, jnp.zeros((width, m), jnp.float32), jnp.zeros((width, n), jnp.float32),
          jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.float32),
          jnp.zeros((3,), jnp.int32))
  _, _, s_all, t_all, c_all, g_all, counts = jax.lax.fori_loop(0, width, one_cut, init)
  # counts: rounds, flips and full passes of H for the starts' H s, summed over the cuts.
  return (s_all, t_all, c_all, g_all, counts) if stats else (s_all, t_all, c_all, g_all)


_BACKFIT_TARGET = "signedcut_hcut_backfit"


def _resolve_impl(impl):
  """``impl`` with ``"auto"`` replaced by ``JAX_SIGNEDCUT_HCUT_IMPL`` when that is set."""
  if impl == "auto":
    impl = os.environ.get("JAX_SIGNEDCUT_HCUT_IMPL", "auto") or "auto"
    if impl not in SEARCH_IMPLS:
      raise ValueError(f"JAX_SIGNEDCUT_HCUT_IMPL must be one of {SEARCH_IMPLS}, got {impl!r}")
  return impl


@functools.partial(jax.jit, static_argnames=("passes", "max_flips", "max_rounds", "keep_q", "impl",
                                             "stats", "loop", "kernel"))
def _hcut_backfit(w, h, s_all, t_all, c_all, *, passes, max_flips, max_rounds, keep_q=None,
                  impl="auto", stats=False, num=None, loop=True, kernel="auto"):
  # num (traced int32, optional): only the first num cuts are visited; the slots after
  # them must have c = 0 (padding, so that nearby widths share one compilation).
  # loop: with the C++ search, all passes in one custom call (xla_ffi/hcut_search.cc,
  # BackfitLoop: the cut put back as the search's rank-one term, one write of P per
  # visit); False keeps the XLA loop around one search call per visit (the reference
  # for the loop handler; impl="jnp" always runs it).
  m, n = w.shape
  h, diag_h, h_inv, keep_q = _prepare(w, h, keep_q)
  hs_all = jnp.matmul(s_all, h, precision=_HI)                      # rows s_jᵀH = (H s_j)ᵀ
  r = w.astype(jnp.float32) - jnp.matmul(s_all.T * c_all[None, :], t_all, precision=_HI)
  p0 = jnp.matmul(h, r, precision=_HI)
  q0 = jnp.matmul(h_inv, p0, precision=_HI) if keep_q else jnp.zeros((0, n), jnp.float32)
  width = s_all.shape[0] if num is None else num

  impl = _resolve_impl(impl)
  if loop and impl != "jnp" and max_rounds >= 1:
    args = (p0, q0, h, h_inv, diag_h, s_all, t_all, c_all, hs_all,
            jnp.asarray(width, jnp.int32).reshape(()))
    ffi = functools.partial(_backfit_ffi, passes=passes, max_flips=max_flips,
                            max_rounds=max_rounds, kernel=kernel)
    xla = functools.partial(_backfit_xla, passes=passes, max_flips=max_flips,
                            max_rounds=max_rounds, keep_q=keep_q, impl="jnp")
    if impl == "ffi":
      if not extension.has_target(_BACKFIT_TARGET):
        raise RuntimeError("impl='ffi' needs the compiled extension with the hcut backfit: "
                           + extension.MISSING_HINT)
      out = ffi(*args)
    else:
      out = extension.on_platform(*args, cpu=ffi, default=xla)
  else:
    out = _backfit_xla(p0, q0, h, h_inv, diag_h, s_all, t_all, c_all, hs_all, width,
                       passes=passes, max_flips=max_flips, max_rounds=max_rounds,
                       keep_q=keep_q, impl=impl, kernel=kernel)
  s_all, t_all, c_all, counts = out
  return (s_all, t_all, c_all, counts) if stats else (s_all, t_all, c_all)


def _backfit_ffi(p0, q0, h, h_inv, diag_h, s_all, t_all, c_all, hs_all, num, *, passes,
                 max_flips, max_rounds, kernel="auto"):
  out = (jax.ShapeDtypeStruct(s_all.shape, jnp.float32),
         jax.ShapeDtypeStruct(t_all.shape, jnp.float32),
         jax.ShapeDtypeStruct(c_all.shape, jnp.float32), jax.ShapeDtypeStruct((3,), jnp.int32))
  call = jax.ffi.ffi_call(_BACKFIT_TARGET, out, vmap_method="sequential")
  return call(p0, q0, h, h_inv, diag_h, s_all, t_all, c_all, hs_all, num,
              passes=np.int32(passes), max_flips=np.int32(max(0, max_flips)),
              max_rounds=np.int32(max_rounds), isa=_isa(kernel))


def _backfit_xla(p0, q0, h, h_inv, diag_h, s_all, t_all, c_all, hs_all, width, *, passes,
                 max_flips, max_rounds, keep_q, impl, kernel="auto"):
  """The readable backfitting loop: per visit, put the cut back, search, take it out."""

  def one_cut(i, carry):
    p, q_mat, s_all, t_all, c_all, hs_all, counts = carry
    k = i % width
    s, t, c, hs = s_all[k], t_all[k], c_all[k], hs_all[k]
    p = p + c * jnp.outer(hs, t)                                     # the cut put back
    if keep_q:
      q_mat = q_mat + c * jnp.outer(jnp.matmul(h_inv, hs, precision=_HI), t)
    s, hs, t, st = _cut_search(p, q_mat, h, h_inv, diag_h, s, hs, t, keep_q=keep_q,
                               max_flips=max_flips, max_rounds=max_rounds, impl=impl,
                               kernel=kernel)
    c, _, p, q_mat = _take_cut(p, q_mat, h_inv, s, hs, t, keep_q)
    return (p, q_mat, s_all.at[k].set(s), t_all.at[k].set(t), c_all.at[k].set(c),
            hs_all.at[k].set(hs), counts + st)

  init = (p0, q0, s_all, t_all, c_all, hs_all, jnp.zeros((3,), jnp.int32))
  _, _, s_all, t_all, c_all, _, counts = jax.lax.fori_loop(0, passes * width, one_cut, init)
  return s_all, t_all, c_all, counts


def hcut_backfit(w: jax.Array, h: jax.Array, s: jax.Array, t: jax.Array, c: jax.Array, *,
                 passes: int = 1, max_flips: int = 64, max_rounds: int = 50,
                 impl: str = "auto"):
  """Backfitting passes of cuts ``(s, t, c)`` under the output error ``tr(Eᵀ H E)``.

  Each pass visits the cuts in order; cut k is put back into the remainder
  ``R = W − Σ_j c_j s_j t_jᵀ``, the H-aware alternating search of
  :func:`hcut_decompose` is rerun **from its own signs**, and the cut is taken
  out again with its exact scale ``sᵀHRt / (n sᵀHs)``. The search never ends
  below its start's ratio and the old c is at best that optimum, so each step
  lowers ``tr(RᵀHR)`` or leaves it (up to float32 rounding). The result is not
  prefix-consistent (cut k was refitted against the later cuts).

  Args:
    w: float (m, n) kernel (the target the cuts approximate).
    h: (m, m) symmetric PSD metric.
    s, t: ±1 float32 (width, m) and (width, n); c: (width,) scales.
    passes: number of passes (>= 0; 0 returns the input).
    max_flips, max_rounds, impl: as for :func:`hcut_decompose`.

  Returns:
    ``(s, t, c)`` of the same shapes.

  Raises:
    ValueError: mismatched shapes, passes < 0 or an unknown impl.
  """
  _check_impl(impl)
  w, h = _check_w_h(w, h)
  m, n = w.shape
  s, t, c = (jnp.asarray(v, jnp.float32) for v in (s, t, c))
  if s.ndim != 2 or s.shape[1] != m or t.shape != (s.shape[0], n) or c.shape != (s.shape[0],):
    raise ValueError(f"s, t, c must have shapes (width, {m}), (width, {n}), (width,); got "
                     f"{s.shape}, {t.shape}, {c.shape}")
  if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
    raise ValueError(f"passes must be an int >= 0, got {passes!r}")
  if passes == 0 or s.shape[0] == 0:
    return s, t, c
  return _hcut_backfit(w.astype(jnp.float32), h, s, t, c, passes=passes,
                       max_flips=int(max_flips), max_rounds=int(max_rounds), impl=impl)


def _check_impl(impl):
  if impl not in SEARCH_IMPLS:
    raise ValueError(f"impl must be one of {SEARCH_IMPLS}, got {impl!r}")


def _check_w_h(w, h):
  """``(w, h)`` as arrays, after the shape checks shared by the two public searches."""
  w = jnp.asarray(w)
  h = jnp.asarray(h)
  if w.ndim != 2:
    raise ValueError(f"w must be a matrix (m, n), got shape {w.shape}")
  m = w.shape[0]
  if h.shape != (m, m):
    raise ValueError(f"h must have shape ({m}, {m}) to match w {w.shape}, got {h.shape}")
  return w, h


def hcut_decompose(w: jax.Array, h: jax.Array, *, key: jax.Array, width: int,
                   max_flips: int = 64, max_rounds: int = 50, impl: str = "auto"):
  """Greedy signed cuts of ``w`` (m, n) that minimise the output error ``tr(Eᵀ H E)``.

  Args:
    w: float (m, n), the kernel in the Flax layout (in, out).
    h: float (m, m) symmetric PSD: the input second moment (damp it first when
      it may be singular).
    key: ``jax.random.key``; cut j's start signs come from ``fold_in(key, j)``.
    width: number of cuts.
    max_flips: most single sign flips of s per half-step (0: ``s = sgn(P t)``,
      which is exact for diagonal H).
    max_rounds: most alternations per cut.
    impl: the search's implementation: ``"auto"`` (the C++ handler on CPU when
      the extension is built, else the jnp reference), ``"jnp"`` or ``"ffi"``.
      The two run the same search in a different summation order, so a
      decision on a near-tie can go the other way.

  Returns:
    ``(s, t, c, gains)``: ±1 float32 (width, m) and (width, n), scales (width,)
    and the drop of ``tr(RᵀHR)`` per cut (width,). Prefix-consistent.

  Raises:
    ValueError: shapes that do not match, width < 1 or an unknown impl.
  """
  _check_impl(impl)
  w, h = _check_w_h(w, h)
  if isinstance(width, bool) or not isinstance(width, int) or width < 1:
    raise ValueError(f"width must be an int >= 1, got {width!r}")
  return _hcut(w.astype(jnp.float32), h, key, width=width, max_flips=int(max_flips),
               max_rounds=int(max_rounds), impl=impl)


def _scale_system(s, t, target, h):
  """``(G, b)`` of the scales' least squares: ``G_jk = (s_jᵀHs_k)(t_jᵀt_k)``, ``b_j = s_jᵀHYt_j``."""
  hs = jnp.matmul(s, h, precision=_HI)                         # (w, m)
  g = jnp.matmul(hs, s.T, precision=_HI) * jnp.matmul(t, t.T, precision=_HI)
  b = jnp.sum(jnp.matmul(hs, target, precision=_HI) * t, axis=1)
  return g, b


def refit_scales(s: jax.Array, t: jax.Array, target: jax.Array, h: jax.Array, *,
                 ridge: float = 1e-6) -> jax.Array:
  """Least-squares scales c minimising ``tr((Y − Sᵀdiag(c)T)ᵀ H (Y − Sᵀdiag(c)T))``.

  Solves ``G c = b`` with ``G_jk = (s_jᵀ H s_k)(t_jᵀ t_k)`` and
  ``b_j = s_jᵀ H Y t_j`` (the Gram of the cuts under H), regularised by
  ``ridge · mean(diag G)`` on the diagonal (cuts that are nearly collinear under
  a low-rank H would otherwise get huge opposite scales).

  Args:
    s: (w, m) ±1 (or any real) row factors; t: (w, n).
    target: (m, n) the matrix the cuts approximate.
    h: (m, m) PSD.
    ridge: relative Tikhonov term, >= 0.

  Returns:
    c: float32 (w,).
  """
  s = jnp.asarray(s, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  h = jnp.asarray(h, jnp.float32)
  g, b = _scale_system(s, t, jnp.asarray(target, jnp.float32), h)
  lam = ridge * jnp.mean(jnp.diagonal(g)) + 1e-30
  g = g + lam * jnp.eye(g.shape[0], dtype=g.dtype)
  return jax.scipy.linalg.solve(g, b, assume_a="pos")


def hcut_backfit_padded(w, h, s, t, c, num: int, *, passes: int, max_flips: int,
                        max_rounds: int):
  """:func:`hcut_backfit` of the first ``num`` cuts of bucket-padded ``(s, t, c)``.

  ``s``, ``t``, ``c`` have a bucketed width W >= num (slots from ``num`` on are
  padding and must have ``c = 0``); one compilation serves every ``num`` of a
  bucket. Returns the padded ``(s, t, c)``, the padding unchanged.
  """
  if passes == 0 or num == 0:
    return s, t, c
  return _hcut_backfit(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), s, t, c,
                       passes=passes, max_flips=int(max_flips), max_rounds=int(max_rounds),
                       num=jnp.int32(num))


@jax.jit
def refit_scales_padded(s, t, target, h, num, ridge=1e-6):
  """:func:`refit_scales` of the first ``num`` (traced) rows of padded ``s``, ``t``; c = 0 after."""
  keep = jnp.arange(s.shape[0]) < num
  g, b = _scale_system(s, t, target, h)
  both = keep[:, None] & keep[None, :]
  dg = jnp.where(keep, jnp.diagonal(g), 0.0)
  lam = ridge * jnp.sum(dg) / jnp.maximum(num, 1).astype(jnp.float32) + 1e-30
  g = jnp.where(both, g, 0.0) + jnp.diag(jnp.where(keep, lam, 1.0))
  c = jax.scipy.linalg.solve(g, jnp.where(keep, b, 0.0), assume_a="pos")
  return jnp.where(keep, c, 0.0)


def sparse_by_impact(residual: jax.Array, h: jax.Array, k: int):
  """The k entries whose exact correction lowers ``tr(EᵀHE)`` most, and their values.

  For a residual E (m, n), correcting entry (i, o) alone by δ lowers the
  output error by ``(HE)_io² / H_ii`` at ``δ = (HE)_io / H_ii`` (the
  optimal-brain-surgeon step for one weight). The k best entries are picked by
  that score; their values are then solved jointly per output column
  (``δ_I = H_II⁻¹ (HE)_I``) so that entries of one column do not double-count.
  Runs eagerly (numpy), the per-column systems being of varying size.

  Returns:
    ``(flat_idx int32 (k,) ascending, values float32 (k,))`` with flat index
    ``i·n + o``.
  """
  e = np.asarray(residual, np.float64)
  hh = np.asarray(h, np.float64)
  m, n = e.shape
  if k <= 0:
    return np.zeros((0,), np.int32), np.zeros((0,), np.float32)
  he = hh @ e
  d = np.maximum(np.diag(hh), 1e-30)
  score = he**2 / d[:, None]
  flat = np.argpartition(score.ravel(), -k)[-k:]
  flat = np.sort(flat)
  rows, cols = flat // n, flat % n
  vals = np.zeros(k, np.float64)
  for o in np.unique(cols):
    sel = np.nonzero(cols == o)[0]
    i = rows[sel]
    sub = hh[np.ix_(i, i)] + 1e-9 * np.mean(d) * np.eye(len(i))
    vals[sel] = np.linalg.solve(sub, he[i, o])
  return flat.astype(np.int32), vals.astype(np.float32)


def refit_sparse(flat_idx, residual: jax.Array, h: jax.Array):
  """Values of fixed sparse positions that minimise ``tr((E − P)ᵀ H (E − P))`` (per-column solves)."""
  e = np.asarray(residual, np.float64)
  hh = np.asarray(h, np.float64)
  _, n = e.shape
  flat = np.asarray(flat_idx, np.int64)
  rows, cols = flat // n, flat % n
  he = hh @ e
  d = np.maximum(np.diag(hh), 1e-30)
  vals = np.zeros(len(flat), np.float64)
  for o in np.unique(cols):
    sel = np.nonzero(cols == o)[0]
    i = rows[sel]
    sub = hh[np.ix_(i, i)] + 1e-9 * np.mean(d) * np.eye(len(i))
    vals[sel] = np.linalg.solve(sub, he[i, o])
  return vals.astype(np.float32)
