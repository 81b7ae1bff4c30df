"""``decompose(..., calibration=...)``: calibrated compression through the public entry point.

One matrix: ``decompose(w, key=k, bits_per_weight=4, calibration=h)`` with a
Flax-layout kernel ``w`` (in, out) and its input second moment ``h`` (in, in)
(``Calibration.hessians[name]``, or any ``XᵀX / N``). Signed cuts then run the
calibrated pipeline of :mod:`jax_signedcut._calibration.cuts` (input scales,
H-aware cuts, optional sparse part by output impact, least-squares refit of c)
and, with ``fallback`` (default), keep the plain signed cuts of the same budget
instead when they have the lower output error ``tr(EᵀHE)`` under ``h``;
``method="gptq"`` runs GPTQ on the same ``h``.

A pytree: ``decompose(params, ..., calibration=stats)`` where ``stats`` is a
:class:`~jax_signedcut._calibration.stats.Calibration` or any pytree / mapping
whose leaf paths (``/``-joined, as :mod:`jax_signedcut._core.tree` names
leaves) are the names of the kernels they belong to — what :func:`calibrate`
returns for an NNX model (``layers/0/query/kernel``) matches ``nnx.state``'s
paths, and :func:`calibrate_linen` (``params/Dense_0/kernel``) matches a Linen
variables dict. Selected leaves with statistics are compressed calibrated,
selected leaves without statistics as without calibration (a method that needs
it is an error naming the leaf). A ``Calibration`` of layout ``"torch"``
declares the named leaves to be (out, in): they are compressed transposed and
come back as :class:`~jax_signedcut._parts.scaled.Transposed`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

#: The options of signed cuts with calibration (``options=`` of decompose / a Budget), with
#: their defaults. Without calibration signed cuts take no options.
SIGNED_CUT_OPTIONS = {
    "alpha": 0.5,            # input scales diag(H)^(alpha/2); 0: none
    "shrink": 0.6,           # weight of diag(H) in the search metric
    "damp": 0.01,            # ridge of the search metric, relative to mean(diag H)
    "max_flips": 256,        # single sign flips per s-step
    "max_rounds": 20,        # alternations per cut
    "search": "diag",        # "diag": C++ cuts of D·W; "hcut": H-aware greedy sign search;
                             # "plain": the plain cuts (with weight outliers) of D·W, backfitted
    "backfit": 3,            # H-aware backfitting passes over the kept cuts (not prefix-consistent)
    "sparse_fraction": 0.0,  # share of entries stored apart, chosen by output impact
    "refit": True,           # least-squares refit of c (and the sparse values) under H
    "fallback": True,        # keep the plain cuts when their output error is lower
    "blocks": 1,             # input-row blocks compressed in turn, GPTQ-style (RowBlocks)
}

_CUT_KEYS = ("alpha", "shrink", "damp", "max_flips", "max_rounds", "search", "backfit")


def _where(path):
  return f"leaf {path!r}" if path else "decompose(calibration=...)"


def check_statistics(h, weight_shape, *, path: str = "", layout: str = "flax") -> jax.Array:
  """The (in, in) float32 second moment for a weight, after every check.

  Args:
    h: the statistics (array-like).
    weight_shape: the weight's shape (in, out) (``layout="flax"``) or (out, in)
      (``"torch"``).
    path: the leaf's path, for messages.
    layout: how the weight is stored.

  Raises:
    ValueError: a weight that is not 2-D, statistics of the wrong shape (naming
      both shapes), non-float, non-finite, asymmetric, not PSD or all zero.
  """
  from jax_signedcut._calibration import stats as _stats  # noqa: PLC0415

  where = _where(path)
  if isinstance(h, jax.core.Tracer):
    raise ValueError(f"{where}: calibrated compression runs eagerly (it checks the statistics "
                     "and chooses a sparse part on the host); call decompose outside jax.jit")
  shape = tuple(weight_shape)
  if len(shape) != 2:
    raise ValueError(f"{where}: calibration statistics apply to a 2-D weight, got shape {shape} "
                     "(stacked layers: decompose each layer with its own statistics)")
  fan_in = shape[1] if layout == "torch" else shape[0]
  h_shape = tuple(np.shape(h))
  if h_shape != (fan_in, fan_in):
    io = "(out, in)" if layout == "torch" else "(in, out)"
    fan_out = shape[0] if layout == "torch" else shape[1]
    raise ValueError(f"{where}: calibration statistics have shape {h_shape}, but the weight "
                     f"{shape} {io} has {fan_in} inputs: expected ({fan_in}, {fan_in})"
                     + (" (wrong layout?)" if h_shape == (fan_out, fan_out) else ""))
  name = path or "calibration"
  h = _stats.check_hessian(np.asarray(h), name)
  if not np.any(h):
    raise ValueError(f"{where}: calibration statistics are all zero (no tokens reached it?)")
  return jnp.asarray(h, jnp.float32)


def check_options(options) -> dict:
  """Signed-cut calibration options merged over :data:`SIGNED_CUT_OPTIONS`, validated."""
  from jax_signedcut._calibration import cuts as _cuts  # noqa: PLC0415

  opts = {**SIGNED_CUT_OPTIONS, **dict(options or ())}
  unknown = sorted(set(opts) - set(SIGNED_CUT_OPTIONS))
  if unknown:
    raise ValueError(f"signed cuts with calibration take the options {sorted(SIGNED_CUT_OPTIONS)}, "
                     f"got unknown {unknown}")
  sf = opts["sparse_fraction"]
  if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 <= sf < 1:
    raise ValueError(f"sparse_fraction must be a number in [0, 1), got {sf!r}")
  for k in ("refit", "fallback"):
    if not isinstance(opts[k], bool):
      raise ValueError(f"{k} must be True or False, got {opts[k]!r}")
  nb = opts["blocks"]
  if isinstance(nb, bool) or not isinstance(nb, (int, np.integer)) or nb < 1:
    raise ValueError(f"blocks must be an int >= 1, got {nb!r}")
  opts["blocks"] = int(nb)
  _cuts.CutOptions(**{k: opts[k] for k in _CUT_KEYS})   # its own checks
  if opts["search"] == "plain" and sf:
    raise ValueError(f"sparse_fraction={sf!r} applies to the 'diag' and 'hcut' searches; "
                     "search='plain' keeps the weight outliers of decompose's outliers= instead")
  return opts


def signed_cut(a, h, *, key, bits_per_weight: float, options=None, outliers="auto",
               path: str = ""):
  """Calibrated signed cuts of one Flax-layout kernel ``a`` (in, out) under ``h`` (checked).

  Returns an :class:`~jax_signedcut.InputScaled` (the calibrated part, within
  ``bits_per_weight · in·out / 8`` bytes) — with ``blocks > 1`` a
  :class:`~jax_signedcut.RowBlocks` of them
  (:func:`jax_signedcut._calibration.blocks.blocked_signed_cut`) — or, with
  ``fallback`` and a lower output error, the plain ``decompose`` of the same
  budget (with ``outliers``).
  """
  from jax_signedcut._calibration import blocks as _blocks  # noqa: PLC0415
  from jax_signedcut._calibration import objective as _objective  # noqa: PLC0415
  from jax_signedcut._signedcut import decompose as _decompose  # noqa: PLC0415

  opts = check_options(options)
  a = jnp.asarray(a, jnp.float32)
  plain = None
  if opts["blocks"] > 1:
    out = _blocks.blocked_signed_cut(a, h, key=key, bits_per_weight=bits_per_weight,
                                     options=opts, outliers=outliers, path=path)
  elif opts["search"] == "plain":
    if opts["alpha"] == 0 or opts["fallback"]:
      # With alpha=0 this plain decomposition is the start as well as the fallback.
      plain = _decompose.decompose_bucketed(a, key=key, bits_per_weight=bits_per_weight,
                                            outliers=outliers)
    out = _plain_start(a, h, key=key, bits_per_weight=bits_per_weight, opts=opts,
                       outliers=outliers, start=plain, path=path)
  else:
    out = _one_part(a, h, key=key, bits_per_weight=bits_per_weight, opts=opts, path=path)
  if not opts["fallback"]:
    return out
  if plain is None:
    # Bucketed: the row blocks' slightly different budgets share compilations (same factors).
    plain = _decompose.decompose_bucketed(a, key=key, bits_per_weight=bits_per_weight,
                                          outliers=outliers)
  e_ours = float(_objective.output_error(a, out.reconstruct(), h))
  e_plain = float(_objective.output_error(a, plain.reconstruct(), h))
  return out if e_ours <= e_plain else plain


def _plain_start(a, h, *, key, bits_per_weight, opts, outliers, start, path):
  """``search="plain"``: :func:`cuts.fit_plain_start` with the checked options."""
  from jax_signedcut._calibration import cuts as _cuts  # noqa: PLC0415

  cut_opts = _cuts.CutOptions(**{k: opts[k] for k in _CUT_KEYS})
  try:
    return _cuts.fit_plain_start(a, h, key=key, bits_per_weight=bits_per_weight,
                                 options=cut_opts, outliers=outliers, refit=opts["refit"],
                                 start=start)
  except ValueError as e:
    raise ValueError(f"{_where(path)}: {e}") from None


def _one_part(a, h, *, key, bits_per_weight, opts, path):
  """The calibrated :class:`InputScaled` of one kernel within the budget (no fallback)."""
  from jax_signedcut._calibration import cuts as _cuts  # noqa: PLC0415
  from jax_signedcut._signedcut import budget as _budget  # noqa: PLC0415

  cut_opts = _cuts.CutOptions(**{k: opts[k] for k in _CUT_KEYS})
  m, n = a.shape
  k_sparse = int(opts["sparse_fraction"] * m * n)
  width = int((bits_per_weight * m * n / 8 - 4 * m - 8 * k_sparse)
              // _budget.bytes_per_cut(m, n))
  if width < 1:
    raise ValueError(f"{_where(path)}: bits_per_weight={bits_per_weight:g} pays for no "
                     f"calibrated cut on shape {(m, n)} after the input scales ({4 * m} bytes) "
                     f"and {k_sparse} sparse entries")
  part, _ = _cuts.calibrated_cuts(a, h, key=key, width=width, options=cut_opts,
                                  with_gains=False)
  return _cuts.fit_budget(part, a, h, bits_per_weight=bits_per_weight,
                          sparse_fraction=opts["sparse_fraction"], options=cut_opts,
                          refit=opts["refit"])


def compress_one(a, h, *, key, width, rate, bits_per_weight, max_error, outliers, lowrank,
                 method, options, path: str = "", layout: str = "flax"):
  """``decompose`` of one 2-D array with calibration statistics ``h`` (any method)."""
  from jax_signedcut._core import checks as _checks  # noqa: PLC0415
  from jax_signedcut._methods import registry as _registry  # noqa: PLC0415
  from jax_signedcut._parts.scaled import Transposed  # noqa: PLC0415
  from jax_signedcut._signedcut import start as _start  # noqa: PLC0415

  where = _where(path)
  if isinstance(a, jax.core.Tracer):
    raise ValueError(f"{where}: calibrated compression runs eagerly; call decompose outside "
                     "jax.jit")
  a = _checks.float_matrix("a", a)
  h = check_statistics(h, a.shape, path=path, layout=layout)
  if layout == "torch":
    return Transposed(inner=compress_one(
        jnp.swapaxes(jnp.asarray(a), 0, 1), h, key=key, width=width, rate=rate,
        bits_per_weight=bits_per_weight, max_error=max_error, outliers=outliers,
        lowrank=lowrank, method=method, options=options, path=path))
  signed = method == _registry.SIGNED_CUT
  name = "calibrated signed cuts" if signed else f"method {method!r}"
  if not signed:
    m = _registry.get(method)
    if m.calibration == "none":
      raise ValueError(f"{where}: method {method!r} cannot use calibration statistics (the "
                       "methods that can: signed_cut, "
                       + ", ".join(_registry.calibrated_names()) + ")")
  extra = [f"{k}={v!r}" for k, v in (("width", width), ("max_error", max_error))
           if v is not None]
  if lowrank not in (0, None):
    extra.append(f"lowrank={lowrank!r}")
  if not signed and outliers not in ("auto", None):
    extra.append(f"outliers={outliers!r}")
  if extra:
    raise ValueError(f"{where}: {name} take a rate or bits_per_weight budget, not "
                     + ", ".join(extra))
  bits = _checks.budget_bits(rate, bits_per_weight, needs=f"{where}: {name} need")
  key = _start.as_key(key)
  if key.shape != ():
    raise ValueError(f"{where}: key must be a single key (shape ()), got shape {key.shape}")
  if signed:
    return signed_cut(a, h, key=key, bits_per_weight=bits, options=options,
                      outliers=outliers, path=path)
  m = _registry.get(method)
  opts = {**m.options, **dict(_registry.check_options(method, options))}
  return m.compress(jnp.asarray(a), key=key, bits_per_weight=bits, calibration=h, **opts)


@dataclasses.dataclass(frozen=True)
class Matched:
  """Statistics matched to a tree's leaves: ``{path: (h, layout)}``."""

  by_path: dict


def match(calibration, paths) -> Matched:
  """Statistics by leaf path, from a ``Calibration``, a mapping or a pytree of matrices.

  Raises:
    ValueError: statistics whose name is no leaf of the tree (naming some of
      them and some leaves), or statistics that are not arrays.
  """
  from jax_signedcut._calibration import stats as _stats  # noqa: PLC0415
  from jax_signedcut._core import tree as _tree  # noqa: PLC0415

  layout = "flax"
  if isinstance(calibration, _stats.Calibration):
    layout = calibration.layout
    calibration = dict(calibration.hessians)
  if _tree.is_single_array(calibration):
    raise ValueError("calibration for a pytree must be a Calibration, a mapping or a pytree of "
                     "(in, in) matrices keyed by leaf path, got one array "
                     f"{tuple(np.shape(calibration))}")
  flat, _ = jax.tree_util.tree_flatten_with_path(calibration)
  found = {}
  for kp, h in flat:
    p = _tree.leaf_path(kp)
    if not hasattr(h, "shape"):
      raise ValueError(f"calibration statistics {p!r} must be an (in, in) array, got "
                       f"{type(h).__name__}")
    found[p] = h
  known = set(paths)
  stray = sorted(p for p in found if p not in known)
  if stray:
    raise ValueError(f"calibration statistics for {len(stray)} names that are no leaf of the "
                     f"tree: {stray[:4]} (leaves are e.g. {sorted(known)[:4]}; names must be "
                     "the leaves' '/'-joined paths)")
  return Matched({p: (h, layout) for p, h in found.items()})
