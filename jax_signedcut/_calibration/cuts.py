"""Calibrated signed cuts of one kernel: input scales, H-aware cuts, refit scales, sparse part.

The pipeline for a Flax kernel ``W`` (in, out) = (m, n) and its input second
moment ``H`` (m, m), all steps minimising the output error ``tr(EᵀHE)``:

1. Input-channel scales ``d = diag(H)^(α/2)`` (geometric mean 1). The cuts
   approximate ``W' = D W`` under ``H' = D⁻¹ H D⁻¹`` (the same error:
   ``tr(EᵀHE) = tr(E'ᵀH'E')``), so ``s`` signs live where each input row
   has the magnitude its input's energy asks for; the layer computes
   ``(x / d) · Ŵ'`` (:class:`~jax_signedcut._calibration.parts.InputScaled`).
2. Greedy cuts: by default (``search="diag"``) the C++ cuts of ``D·W``; or
   H-aware ones (``"hcut"``, :func:`objective.hcut_decompose`) under a shrunk
   metric ``H_s = (1 − λ) H' + λ diag(H') + δ mean(diag H') I``. Shrinking the
   correlations toward the diagonal helps the greedy sign search and
   generalises better from a few thousand calibration tokens. Prefix-consistent.
3. (optional, per budget) a sparse part: the entries of the residual whose
   exact correction lowers the output error most (``(H'E')²_io / H'_ii``),
   paid from the same budget (fewer cuts).
4. (per budget) the scales c and the sparse values refit by least squares
   under ``H_s`` (alternating, each an exact solve). Refitting gives up
   prefix consistency of c (S and T stay prefix-consistent: refit the
   truncated cuts again for another budget).

Between 2 and 3, ``backfit`` (default 3) H-aware backfitting passes over the
kept cuts: each re-searched against all the others under ``H_s``. They lower
the output error further and give up the prefix consistency of S and T
(``backfit=0`` keeps it: then the cuts of one run serve every budget).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jax_signedcut as sc
from jax_signedcut._calibration import objective
from jax_signedcut._calibration.parts import InputScaled
from jax_signedcut._signedcut import decompose as _decompose
from jax_signedcut._signedcut import packing as _packing

_HI = jax.lax.Precision.HIGHEST


#: The sign searches of :class:`CutOptions`.
SEARCHES = ("hcut", "diag", "plain")


@dataclasses.dataclass(frozen=True)
class CutOptions:
  """Options of :func:`calibrated_cuts` (static, hashable).

  Attributes:
    alpha: input-scale exponent, ``d = diag(H)^(alpha/2)``; 0 disables it.
    shrink: λ in [0, 1], weight of ``diag(H)`` in the search metric.
    damp: δ >= 0, ridge on the search metric relative to mean(diag H).
    max_flips: single sign flips per s-step of the search. Flips are cheap
      (O(in) each) next to a round (a product with H and two with the remainder):
      on MiniLM's 1536×384 FFN output kernel 16 flips left 60 % of the cuts
      stopping at ``max_rounds`` (17 rounds per cut on average), 256 flips took 4
      rounds per cut, a third of the CPU time, and lowered the output error more.
    max_rounds: alternations per cut.
    search: how the signs are found. ``"hcut"``: the H-aware greedy search of
      :func:`objective.hcut_decompose` under the search metric (a jnp loop).
      ``"diag"``: the plain greedy cuts of ``D·W`` by the C++ kernel (the
      diagonal metric ``D²``: with α = 1 that is ``diag(H)``), with the
      greedy scales; the refit of :func:`fit_budget` then brings in the full
      metric. ``max_flips`` and ``max_rounds`` are not used by it (only by
      ``backfit``). The default, with ``backfit=3``: on MiniLM at 4 bits its
      held-out output error is 4-19 % below ``"hcut"``'s, in about half the time.
      ``"plain"``: the plain signed cuts of ``D·W`` at the budget, with the
      weight outliers of ``decompose(..., outliers=...)`` (the budget pays for
      them and the cuts; no output-impact sparse part), then the backfitting
      and refit of :func:`fit_plain_start`. With ``alpha=0`` the start is the
      plain decomposition itself (no input scales are stored), so the plain
      fallback costs nothing more. For the error curves of the allocation it
      gives the greedy cuts of ``D·W`` as ``"diag"`` does.
    backfit: H-aware backfitting passes over the kept cuts in :func:`fit_budget`
      (:func:`objective.hcut_backfit`: each cut re-searched under the metric
      against all the others, from its own signs), before the sparse part and
      the refit; 0: none. Each pass costs about one ``"hcut"`` run of the kept
      width; the result is not prefix-consistent (every budget is its own fit).
  """

  alpha: float = 0.5
  shrink: float = 0.6
  damp: float = 0.01
  max_flips: int = 256
  max_rounds: int = 20
  search: str = "diag"
  backfit: int = 3

  def __post_init__(self):
    if self.search not in SEARCHES:
      raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
    for name in ("alpha", "shrink", "damp"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if self.shrink > 1:
      raise ValueError(f"shrink must be in [0, 1], got {self.shrink!r}")
    for name in ("max_flips", "max_rounds", "backfit"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def _check_pair(w, h):
  w = jnp.asarray(w)
  h = jnp.asarray(h)
  if w.ndim != 2:
    raise ValueError(f"w must be a kernel (in, out), got shape {w.shape}")
  m = w.shape[0]
  if h.shape != (m, m):
    raise ValueError(f"h must have shape ({m}, {m}) for w of shape {w.shape} (in, out), "
                     f"got {h.shape}")
  return w.astype(jnp.float32), h.astype(jnp.float32)


def input_scale(h: jax.Array, alpha: float) -> jax.Array:
  """``diag(H)^(alpha/2)``, geometric mean 1 (inputs that never fire get the smallest scale)."""
  dg = jnp.diagonal(jnp.asarray(h, jnp.float32))
  pos = dg > 0
  floor = jnp.min(jnp.where(pos, dg, jnp.inf))
  dg = jnp.where(pos, dg, jnp.where(jnp.isfinite(floor), floor, 1.0))
  d = dg ** (alpha / 2)
  return d / jnp.exp(jnp.mean(jnp.log(d)))


def search_metric(h_scaled: jax.Array, opts: CutOptions) -> jax.Array:
  """``(1 − λ) H' + λ diag(H') + δ mean(diag H') I`` (see the module doc)."""
  dg = jnp.diagonal(h_scaled)
  m = h_scaled.shape[0]
  hs = (1 - opts.shrink) * h_scaled + opts.shrink * jnp.diag(dg)
  return hs + opts.damp * jnp.mean(dg) * jnp.eye(m, dtype=hs.dtype)


def calibrated_cuts(w: jax.Array, h: jax.Array, *, key: jax.Array, width: int,
                    options: CutOptions = CutOptions(),
                    with_gains: bool = True) -> tuple[InputScaled, jax.Array | None]:
  """Width-``width`` H-aware signed cuts of ``diag(d) · w`` with greedy scales.

  Args:
    w: float (m, n) kernel, Flax layout (in, out).
    h: float (m, m) input second moment (e.g. ``Calibration.hessians[name]``).
    key: ``jax.random.key``.
    width: number of cuts (the largest budget wanted: prefixes give the rest).
    options: see :class:`CutOptions`.
    with_gains: also return the gains (the ``"diag"`` search computes them
      afterwards, from the Gram of the cuts; ``False`` skips that).

  Returns:
    ``(part, gains)``: an :class:`InputScaled` whose inner ``SignedCut`` holds
    all ``width`` cuts with their greedy scales, and the drop of the output
    error ``tr(EᵀHE)`` under the search metric per cut (width,) (``None``
    for the ``"diag"`` search without ``with_gains``).

  Raises:
    ValueError: mismatched shapes or width < 1.
  """
  w, h = _check_pair(w, h)
  m, n = w.shape
  d = input_scale(h, options.alpha)
  hp = h / d[:, None] / d[None, :]
  metric = search_metric(hp, options)
  if options.search in ("diag", "plain"):
    # Bucketed (one compilation for nearby widths; the same cuts as sc.decompose).
    inner = _decompose.decompose_bucketed(d[:, None] * w, key=key, width=width, outliers=0)
    part = InputScaled(scale=d, inner=inner)
    return part, (_greedy_gains(part, w, metric) if with_gains else None)
  s, t, c, gains = objective.hcut_decompose(
      d[:, None] * w, metric, key=key, width=width,
      max_flips=options.max_flips, max_rounds=options.max_rounds)
  inner = sc.SignedCut(s_bits=sc.pack_signs(s), t_bits=sc.pack_signs(t), c=c,
                       num_cuts=jnp.int32(width), shape=(m, n))
  return InputScaled(scale=d, inner=inner), gains


@jax.jit
def _prefix_gains(hs, s, t, c, target):
  # err(k) = L0 − 2 Σ_{j≤k} c_j b_j + Σ_{j,l≤k} c_j c_l G_jl, so the drop of cut k is
  # 2 c_k b_k − c_k² G_kk − 2 c_k Σ_{l<k} G_kl c_l.
  g = jnp.matmul(hs, s.T, precision=_HI) * jnp.matmul(t, t.T, precision=_HI)
  b = jnp.sum(jnp.matmul(hs, target, precision=_HI) * t, axis=1)
  before = jnp.matmul(jnp.tril(g, -1), c, precision=_HI)
  return 2 * c * b - c * c * jnp.diagonal(g) - 2 * c * before


def _greedy_gains(part: InputScaled, w, metric):
  """The drop of ``tr(RᵀH_sR)`` per cut of ``part`` with its own (greedy) scales."""
  s, t = _signs(part.inner)
  hs = jnp.matmul(s, metric, precision=_HI)
  return _prefix_gains(hs, s, t, part.inner.c, part.scale[:, None] * w)


def _signs(f: sc.SignedCut):
  m, n = f.shape
  s = sc.unpack_signs(f.s_bits, m).astype(jnp.float32)
  t = sc.unpack_signs(f.t_bits, n).astype(jnp.float32)
  return s, t


def _sparse_dense(idx, val, shape):
  m, n = shape
  return jnp.zeros((m * n,), jnp.float32).at[idx].add(val).reshape(m, n)


class Gram(NamedTuple):
  """The least-squares system of all cuts of a part under its metric (prefixes give any width).

  Attributes:
    hs: (w, m) rows ``s_jᵀ H_s``.
    g: (w, w) ``(s_jᵀ H_s s_k)(t_jᵀ t_k)``.
    b: (w,) ``s_jᵀ H_s W' t_j``.
  """

  hs: jax.Array
  g: jax.Array
  b: jax.Array


def gram(part: InputScaled, w: jax.Array, h: jax.Array,
         options: CutOptions = CutOptions()) -> Gram:
  """The :class:`Gram` of every cut of ``part`` (compute once, refit many budgets from it)."""
  w, h = _check_pair(w, h)
  d = part.scale
  metric = search_metric(h / d[:, None] / d[None, :], options)
  s, t = _signs(part.inner)
  hs = jnp.matmul(s, metric, precision=_HI)
  g = jnp.matmul(hs, s.T, precision=_HI) * jnp.matmul(t, t.T, precision=_HI)
  b = jnp.sum(jnp.matmul(hs, d[:, None] * w, precision=_HI) * t, axis=1)
  return Gram(hs=hs, g=g, b=b)


def _solve(g, b, ridge):
  lam = ridge * jnp.mean(jnp.diagonal(g)) + 1e-30
  return jax.scipy.linalg.solve(g + lam * jnp.eye(g.shape[0], dtype=g.dtype), b, assume_a="pos")


def fit_budget(part: InputScaled, w: jax.Array, h: jax.Array, *, bits_per_weight: float,
               sparse_fraction: float = 0.0, options: CutOptions = CutOptions(),
               refit: bool = True, ridge: float = 1e-6, rounds: int = 2,
               system: Gram | None = None) -> InputScaled:
  """The calibrated result at one budget: truncate the cuts, add a sparse part, refit.

  The budget is ``bits_per_weight · m·n / 8`` bytes; the scales take ``4 m``,
  each sparse entry 8 (int32 index + f32 value), each cut
  ``sc.bytes_per_cut(m, n)``; the cuts get what is left.

  Args:
    part: from :func:`calibrated_cuts` (at a width >= what the budget pays for).
    w, h: the kernel and its input second moment, as given to it.
    bits_per_weight: the budget.
    sparse_fraction: share of the m·n entries stored apart, chosen by output
      impact on the residual of the cuts (0: none).
    options: the options the cuts were made with (for the metric).
    refit: refit c (and the sparse values) by least squares under the metric.
    ridge: relative ridge of the c solve.
    rounds: alternations of c and sparse-value refits.
    system: the :func:`gram` of ``part`` (optional): the refit then only slices
      it and solves, instead of forming the system of the kept cuts.

  Returns:
    An :class:`InputScaled` whose inner ``SignedCut`` has ``num_cuts`` cuts and
    an optional sparse part (in the scaled space).

  Raises:
    ValueError: a budget that pays for no cut, or a bad fraction.
  """
  w, h = _check_pair(w, h)
  m, n = w.shape
  if not 0 <= sparse_fraction < 1:
    raise ValueError(f"sparse_fraction must be in [0, 1), got {sparse_fraction!r}")
  budget = bits_per_weight * m * n / 8 - 4 * m
  k_sparse = int(sparse_fraction * m * n)
  cuts = int((budget - 8 * k_sparse) // sc.bytes_per_cut(m, n))
  if cuts < 1:
    raise ValueError(f"bits_per_weight={bits_per_weight} pays for no cut on {(m, n)} "
                     f"after the scales and {k_sparse} sparse entries")
  f = part.inner
  cuts = min(cuts, f.width)
  d = part.scale
  target = d[:, None] * w
  hp = h / d[:, None] / d[None, :]
  metric = search_metric(hp, options)
  s, t = _signs(f)
  s, t = s[:cuts], t[:cuts]
  c = f.c[:cuts]
  if options.backfit:
    if refit:   # start from the jointly best scales of the kept cuts
      c = objective.refit_scales(s, t, target, metric, ridge=ridge)
    s, t, c = objective.hcut_backfit(target, metric, s, t, c, passes=options.backfit,
                                     max_flips=options.max_flips,
                                     max_rounds=options.max_rounds)
    f = sc.SignedCut(s_bits=sc.pack_signs(s), t_bits=sc.pack_signs(t), c=c,
                     num_cuts=jnp.int32(cuts), shape=(m, n))
    system = None   # the Gram of the old signs no longer applies
  idx = val = None
  sp = jnp.zeros_like(target)
  if refit and system is None and k_sparse and rounds > 1:
    # Form the least-squares system of the kept cuts once for all rounds.
    kept = dataclasses.replace(f, s_bits=f.s_bits[:cuts], t_bits=f.t_bits[:cuts], c=c,
                               num_cuts=jnp.int32(cuts))
    system = gram(InputScaled(scale=d, inner=kept), w, h, options)
  for r in range(max(1, rounds)):
    if refit and system is not None:
      b = system.b[:cuts]
      if idx is not None:   # b_j − s_jᵀ H_s P t_j over the sparse entries P
        rows, cols = jnp.asarray(idx) // n, jnp.asarray(idx) % n
        b = b - jnp.sum(system.hs[:cuts, rows] * jnp.asarray(val)[None, :] * t[:, cols], axis=1)
      c = _solve(system.g[:cuts, :cuts], b, ridge)
    elif refit:
      c = objective.refit_scales(s, t, target - sp, metric, ridge=ridge)
    if k_sparse == 0:
      break
    resid = target - jnp.matmul(s.T * c[None, :], t, precision=_HI)
    if idx is None:
      idx, val = objective.sparse_by_impact(resid, metric, k_sparse)
    else:
      val = objective.refit_sparse(idx, resid, metric)
    sp = _sparse_dense(jnp.asarray(idx), jnp.asarray(val), (m, n))
    if not refit or r == rounds - 1:
      break
  inner = sc.SignedCut(s_bits=f.s_bits[:cuts], t_bits=f.t_bits[:cuts], c=c.astype(jnp.float32),
                       num_cuts=jnp.int32(cuts), shape=(m, n))
  if idx is not None:
    inner = sc.Sum((inner, sc.Sparse(jnp.asarray(idx, jnp.int32), jnp.asarray(val, jnp.float32),
                                     jnp.int32(len(idx)), shape=(m, n))))
  return InputScaled(scale=d, inner=inner)


def fit_plain_start(w: jax.Array, h: jax.Array, *, key: jax.Array, bits_per_weight: float,
                    options: CutOptions = CutOptions(), outliers="auto", refit: bool = True,
                    ridge: float = 1e-6, start=None):
  """The calibrated result of ``search="plain"``: the plain cuts of ``D·W``, backfitted and refit.

  1. The start: ``decompose(D·W, bits_per_weight=b, outliers=outliers)`` with
     ``b`` what is left after the input scales' ``4 m`` bytes (``alpha=0``:
     no scales, the whole budget; ``start`` may pass that decomposition in).
     Its weight outliers stay as they are, stored apart.
  2. The scales c refit by least squares under the search metric on the
     target without the outliers, ``backfit`` H-aware passes over the cuts
     (:func:`objective.hcut_backfit`), c refit again.

  The result has the bytes of the start (within ``bits_per_weight · m·n / 8``),
  is not prefix-consistent, and on the calibration statistics starts from the
  plain decomposition's error under the metric and lowers it.

  Returns:
    ``Sum((SignedCut, Sparse))`` / ``SignedCut`` (``alpha=0``), or an
    :class:`InputScaled` of one.

  Raises:
    ValueError: a budget that pays for no cut after the scales.
  """
  w, h = _check_pair(w, h)
  m, n = w.shape
  scaled = options.alpha > 0
  bits = bits_per_weight - (32 * m / (m * n) if scaled else 0.0)
  if bits <= 0:
    raise ValueError(f"bits_per_weight={bits_per_weight} pays for no cut on {(m, n)} after the "
                     f"input scales ({4 * m} bytes)")
  d = input_scale(h, options.alpha) if scaled else jnp.ones((m,), jnp.float32)
  target = d[:, None] * w if scaled else w
  metric = search_metric(h / d[:, None] / d[None, :] if scaled else h, options)
  if start is None or scaled:
    start = _decompose.decompose_bucketed(target, key=key, bits_per_weight=bits,
                                          outliers=outliers)
  parts = start.parts if isinstance(start, sc.Sum) else (start,)
  f = parts[0]
  others = parts[1:]
  rest = target
  for p in others:
    rest = rest - p.reconstruct()
  k = int(f.num_cuts)
  if k < 1:
    raise ValueError(f"bits_per_weight={bits_per_weight} pays for no cut on {(m, n)}")
  # The k cuts in slots of a bucketed width (c = 0 after k): the outlier count varies k
  # from kernel to kernel, and the padded steps compile once per bucket.
  wb = _decompose.width_bucket(k)
  # Slicing, padding and (un)packing on the host: k differs from kernel to kernel, and each
  # eager jnp op of a new shape would compile (≈ 200 compilations in the MiniLM job).
  s = _packing.unpack_signs_np(np.asarray(f.s_bits), m).astype(np.float32)
  t = _packing.unpack_signs_np(np.asarray(f.t_bits), n).astype(np.float32)
  pad = lambda x: jnp.asarray(  # noqa: E731
      np.pad(np.asarray(x)[:k], [(0, wb - k)] + [(0, 0)] * (np.ndim(x) - 1)))
  s, t, c = pad(s), pad(t), pad(f.c)
  if refit:
    c = objective.refit_scales_padded(s, t, rest, metric, k, ridge)
  if options.backfit:
    s, t, c = objective.hcut_backfit_padded(rest, metric, s, t, c, k, passes=options.backfit,
                                            max_flips=options.max_flips,
                                            max_rounds=options.max_rounds)
    if refit:
      c = objective.refit_scales_padded(s, t, rest, metric, k, ridge)
  s, t, c = (np.asarray(x)[:k] for x in (s, t, c))
  cut = sc.SignedCut(s_bits=jnp.asarray(_packing.pack_signs_np(s)),
                     t_bits=jnp.asarray(_packing.pack_signs_np(t)),
                     c=jnp.asarray(c, jnp.float32), num_cuts=jnp.int32(k), shape=(m, n))
  inner = sc.Sum((cut, *others)) if others else cut
  return InputScaled(scale=d, inner=inner) if scaled else inner


def error_curve(gains: jax.Array, w: jax.Array, h: jax.Array, part: InputScaled,
                options: CutOptions = CutOptions()) -> np.ndarray:
  """Output error under the search metric after k = 0 … width greedy cuts (width + 1,).

  Exact for the greedy scales (each cut lowers ``tr(RᵀH_sR)`` by its gain);
  a refit only lowers it further.
  """
  w, h = _check_pair(w, h)
  d = part.scale
  target = d[:, None] * w
  metric = search_metric(h / d[:, None] / d[None, :], options)
  total = float(objective.output_error(target, jnp.zeros_like(target), metric))
  return np.maximum(total - np.concatenate([[0.0], np.cumsum(np.asarray(gains, np.float64))]),
                    0.0)
