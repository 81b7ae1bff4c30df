"""Global bit allocation: one byte budget over many matrices, spent where the error falls fastest.

Each matrix ``l`` offers options ``(bytes_l[k], error_l[k])`` (e.g. its
output error after k cuts: prefix-consistent cuts give the whole curve from
one run). With a sensitivity ``sens_l`` (how much the model's loss grows per
unit of this matrix's error), the allocation minimises ``Σ sens_l ·
error_l[k_l]`` subject to ``Σ bytes_l[k_l] <= budget``.

:func:`allocate` solves the Lagrangian relaxation exactly: on each curve's
lower convex hull the marginal gains ``−Δerror/Δbytes`` fall, so taking hull
steps in order of falling gain (across all matrices) until the budget is
spent is optimal for the convexified problem, and within one step of the
optimum of the original. Options off the hull are never chosen.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import numpy as np


def _lower_hull(b: np.ndarray, e: np.ndarray) -> list[int]:
  """Indices of the lower convex hull of points (b, e), b strictly increasing."""
  hull: list[int] = []
  for i in range(len(b)):
    while len(hull) >= 2:
      i0, i1 = hull[-2], hull[-1]
      # Drop i1 if it lies on or above the segment i0 -> i.
      if (e[i1] - e[i0]) * (b[i] - b[i0]) >= (e[i] - e[i0]) * (b[i1] - b[i0]):
        hull.pop()
      else:
        break
    hull.append(i)
  return hull


def allocate(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], budget: float, *,
             sensitivity: Mapping[str, float] | None = None) -> dict[str, int]:
  """Chooses one option per matrix minimising the weighted error within a byte budget.

  Args:
    curves: ``{name: (bytes, error)}``, 1-D arrays of equal length per matrix,
      ``bytes`` strictly increasing (option 0 is the cheapest; it is always
      affordable or the budget is an error).
    budget: total bytes.
    sensitivity: ``{name: weight >= 0}`` (default 1 for every matrix).

  Returns:
    ``{name: chosen option index}``.

  Raises:
    ValueError: malformed curves, negative weights, or a budget below the sum
      of the cheapest options.

  Example:
    >>> import numpy as np
    >>> curves = {"a": (np.array([1., 2, 3]), np.array([9., 4, 3])),
    ...           "b": (np.array([1., 2, 3]), np.array([5., 3.5, 3.2]))}
    >>> allocate(curves, 4.0)
    {'a': 1, 'b': 1}
    >>> allocate(curves, 4.0, sensitivity={"a": 0.01, "b": 1.0})
    {'a': 0, 'b': 2}
  """
  sensitivity = dict(sensitivity or {})
  hulls, cost = {}, 0.0
  for name, (b, e) in curves.items():
    b = np.asarray(b, np.float64)
    e = np.asarray(e, np.float64)
    if b.ndim != 1 or b.shape != e.shape or len(b) == 0:
      raise ValueError(f"curve {name!r}: bytes and error must be 1-D of equal length, got "
                       f"{b.shape} and {e.shape}")
    if np.any(np.diff(b) <= 0):
      raise ValueError(f"curve {name!r}: bytes must be strictly increasing")
    wgt = float(sensitivity.get(name, 1.0))
    if not np.isfinite(wgt) or wgt < 0:
      raise ValueError(f"sensitivity of {name!r} must be a finite number >= 0, got {wgt!r}")
    hulls[name] = (b, wgt * e, _lower_hull(b, wgt * e))
    cost += b[0]
  if cost > budget:
    raise ValueError(f"budget {budget:g} bytes is below the cheapest options ({cost:g} bytes)")
  pos = {name: 0 for name in curves}          # position on the hull
  heap = []

  def push(name):
    b, e, hull = hulls[name]
    p = pos[name]
    if p + 1 < len(hull):
      i0, i1 = hull[p], hull[p + 1]
      gain = (e[i0] - e[i1]) / (b[i1] - b[i0])
      if gain > 0:   # never spend bytes on an option with no less error (e.g. another method's)
        heapq.heappush(heap, (-gain, name))

  for name in curves:
    push(name)
  left = budget - cost
  while heap:
    neg_gain, name = heapq.heappop(heap)
    b, _, hull = hulls[name]
    p = pos[name]
    step = b[hull[p + 1]] - b[hull[p]]
    if step > left:
      continue                                  # this matrix cannot take its next step
    left -= step
    pos[name] = p + 1
    push(name)
  return {name: hulls[name][2][pos[name]] for name in curves}


# ---------------------------------------------------------------------------------------------
# Bits per kernel from calibrated curves and measured sensitivities (issue 14).


def budget_grid(bits_per_weight: float, step: float = 1.0, span: int = 1) -> tuple[float, ...]:
  """The options ``b − span·step, …, b, …, b + span·step`` bits per weight around ``b``.

  Raises:
    ValueError: ``b − span·step`` not > 0, ``step`` not > 0 or ``span`` not an integer >= 1.
  """
  b = float(bits_per_weight)
  if isinstance(span, bool) or not isinstance(span, (int, np.integer)) or span < 1:
    raise ValueError(f"span must be an integer >= 1, got {span!r}")
  lo = b - span * step
  if not (np.isfinite(lo) and lo > 0 and step > 0):
    raise ValueError(f"allocation around bits_per_weight={bits_per_weight!r} with step "
                     f"{step!r} and span {span!r} needs bits_per_weight - span * step > 0")
  return tuple(b + k * float(step) for k in range(-span, span + 1))


def _options_for(options, name):
  if options is None:
    return {}
  if callable(options):
    return dict(options(name) or {})
  return dict(options)


def _check_same_names(weights, hessians) -> None:
  if set(weights) != set(hessians):
    odd = sorted(set(weights) ^ set(hessians))
    raise ValueError(f"weights and hessians must name the same kernels; differ in {odd[:4]}")


def _check_budgets(budgets) -> tuple[float, ...]:
  budgets = tuple(float(b) for b in budgets)
  if not budgets or any(b1 <= b0 for b0, b1 in zip(budgets, budgets[1:])) or budgets[0] <= 0:
    raise ValueError(f"budgets must be increasing positive bits per weight, got {budgets}")
  return budgets


def budget_curves(weights: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray], *,
                  key, budgets, options=None, outliers="auto", keep: float | None = None):
  """Each kernel's squared relative output error at each budget, of the part it would keep.

  One calibrated cut run per kernel at the largest budget; every smaller budget is
  its prefix refit (:func:`~jax_signedcut._calibration.cuts.fit_budget`); with
  ``blocks > 1`` (not prefix-consistent) one run per budget. With
  ``fallback`` (default) a budget's error is the lower of the calibrated part and
  the plain ``decompose`` of the same budget — what ``decompose(...,
  calibration=...)`` keeps.

  Args:
    weights: ``{name: (in, out) kernel}`` (Flax layout: transpose torch weights).
    hessians: ``{name: (in, in) H/N}``, the same names.
    key: PRNG key, or a callable ``name -> key`` (e.g. ``lambda p: leaf_key(key, p)``,
      the key ``decompose`` gives that leaf, for the same cuts).
    budgets: increasing bits per weight, e.g. :func:`budget_grid` ``(4)``.
    options: signed-cut calibration options (``SIGNED_CUT_OPTIONS`` keys), one dict
      for every kernel or a callable ``name -> dict``.
    outliers: the plain alternative's ``outliers``.
    keep: also return each kernel's kept part (dense) at this budget (one of
      ``budgets``), e.g. to measure sensitivities; or a tuple of budgets.

  Returns:
    ``(curves, kept)``: ``curves = {name: (bits array, squared error array)}``,
    ``kept = {name: dense (in, out) array}`` (empty without ``keep``; keyed
    ``(name, bits)`` when ``keep`` is a tuple).

  Raises:
    ValueError: names in one mapping and not the other, budgets not increasing,
      ``keep`` not a budget, or what ``decompose(..., calibration=...)`` rejects.
  """
  import jax.numpy as jnp  # noqa: PLC0415

  from jax_signedcut._calibration import api as _api  # noqa: PLC0415
  from jax_signedcut._calibration import cuts as _cuts  # noqa: PLC0415
  from jax_signedcut._calibration import objective as _objective  # noqa: PLC0415
  from jax_signedcut._signedcut import budget as _budget  # noqa: PLC0415
  from jax_signedcut._signedcut import decompose as _decompose  # noqa: PLC0415

  budgets = _check_budgets(budgets)
  several = isinstance(keep, (tuple, list))
  keeps = () if keep is None else tuple(float(b) for b in (keep if several else (keep,)))
  if any(b not in budgets for b in keeps):
    raise ValueError(f"keep={keep!r} is not among budgets {budgets}")
  _check_same_names(weights, hessians)
  curves, kept = {}, {}
  for name in sorted(weights):
    w = jnp.asarray(weights[name], jnp.float32)
    h = _api.check_statistics(hessians[name], w.shape, path=name)
    opts = _api.check_options(_options_for(options, name))
    cut_opts = _cuts.CutOptions(**{k: opts[k] for k in _api._CUT_KEYS})  # noqa: SLF001
    m, n = w.shape
    sf = opts["sparse_fraction"]
    width = int((max(budgets) * m * n / 8 - 4 * m - 8 * int(sf * m * n))
                // _budget.bytes_per_cut(m, n))
    if width < 1:
      raise ValueError(f"kernel {name!r}: {max(budgets):g} bits per weight pay for no "
                       f"calibrated cut on shape {(m, n)}")
    k = key(name) if callable(key) else key
    if opts["blocks"] == 1:
      part, _ = _cuts.calibrated_cuts(w, h, key=k, width=width, options=cut_opts,
                                      with_gains=False)
      system = _cuts.gram(part, w, h, cut_opts)
    errs = []
    for b in budgets:
      if opts["blocks"] == 1:
        ours = _cuts.fit_budget(part, w, h, bits_per_weight=b, sparse_fraction=sf,
                                options=cut_opts, refit=opts["refit"],
                                system=system).reconstruct()
      else:   # not prefix-consistent: a run per budget (with its own fallbacks)
        ours = _api.signed_cut(w, h, key=k, bits_per_weight=b, options=opts,
                               outliers=outliers, path=name).reconstruct()
      best, e = ours, float(_objective.relative_output_error(w, ours, h))
      if opts["fallback"] and opts["blocks"] == 1:
        plain = _decompose.decompose(w, key=k, bits_per_weight=b,
                                     outliers=outliers).reconstruct()
        e_plain = float(_objective.relative_output_error(w, plain, h))
        if e_plain < e:
          best, e = plain, e_plain
      errs.append(e * e)
      if b in keeps:
        kept[(name, b) if several else name] = np.asarray(best)
    curves[name] = (np.array(budgets), np.array(errs))
  return curves, kept


def plain_curves(weights: Mapping[str, np.ndarray], *, key, budgets, outliers="auto",
                 keep: float | None = None):
  """Each matrix's squared relative weight error at each budget, of its plain cuts.

  For the matrices without input statistics (e.g. embedding tables: a lookup has no
  second moment worth an (in, in) matrix) that share a budget with calibrated kernels:
  with a measured sensitivity per unit of this error they enter :func:`allocate_bits`
  beside :func:`budget_curves`' kernels. The cuts are ``decompose``'s at each budget
  (``bits_per_weight``, ``outliers``; one run at the largest, truncated), so with ``key`` the key ``decompose`` gives the
  leaf (``lambda p: leaf_key(key, p)``) the allocated budget reproduces them.

  Args:
    weights: ``{name: 2-D array}``.
    key: PRNG key, or a callable ``name -> key``.
    budgets: increasing bits per weight.
    outliers: ``decompose``'s ``outliers``.
    keep: also return each matrix's reconstruction (dense) at this budget.

  Returns:
    ``(curves, kept)`` as :func:`budget_curves`.

  Raises:
    ValueError: budgets not increasing, ``keep`` not a budget, or what ``decompose``
      rejects (naming the matrix).
  """
  import jax.numpy as jnp  # noqa: PLC0415

  from jax_signedcut._signedcut import decompose as _decompose  # noqa: PLC0415
  from jax_signedcut._signedcut import factors as _factors  # noqa: PLC0415

  budgets = _check_budgets(budgets)
  if keep is not None and float(keep) not in budgets:
    raise ValueError(f"keep={keep!r} is not among budgets {budgets}")
  curves, kept = {}, {}
  for name in sorted(weights):
    w = np.asarray(weights[name], np.float32)
    if w.ndim != 2 or w.size == 0:
      raise ValueError(f"matrix {name!r} must be a non-empty 2-D array, got shape {w.shape}")
    k = key(name) if callable(key) else key
    norm2 = float(np.sum(np.square(w, dtype=np.float64)))
    try:   # one run at the largest budget: plain cuts are prefix-consistent (truncate)
      full = _decompose.decompose(jnp.asarray(w), key=k, bits_per_weight=budgets[-1],
                                  outliers=outliers)
      runs = [_factors.truncate(full, bits_per_weight=b) for b in budgets[:-1]] + [full]
    except ValueError as e:
      raise ValueError(f"matrix {name!r} at {budgets} bits per weight: {e}") from None
    errs = []
    for b, f in zip(budgets, runs):
      r = np.asarray(f.reconstruct(), np.float32)
      errs.append(float(np.sum(np.square(w - r, dtype=np.float64))) / max(norm2, 1e-30))
      if keep is not None and b == float(keep):
        kept[name] = r
    curves[name] = (np.array(budgets), np.array(errs))
  return curves, kept


def gptq_curves(weights: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray], *,
                codes, damp: float = 0.01, keep: int | None = None):
  """Each kernel's squared relative output error under H of GPTQ at each code width.

  The GPTQ options of a per-matrix method choice: beside :func:`budget_curves`' cuts, a
  kernel may take int-b codes (one f32 scale per output channel) where they cost less
  output error per bit; :func:`merge_curves` puts both on one curve.

  Args:
    weights: ``{name: (in, out) kernel}``.
    hessians: ``{name: (in, in) H/N}``, the same names.
    codes: increasing code widths (integers 2..8).
    damp: GPTQ's relative damping of H.
    keep: also return each kernel's dense GPTQ reconstruction at this code width.

  Returns:
    ``(curves, kept)``: ``curves = {name: (stored bits per weight, squared error)}``
    (codes and scales: ``rtn_bits_per_weight``), ``kept`` as :func:`budget_curves`.

  Raises:
    ValueError: names in one mapping and not the other, codes not increasing integers in
      2..8, ``keep`` not among them, or what ``gptq`` rejects.
  """
  import jax.numpy as jnp  # noqa: PLC0415

  from jax_signedcut._calibration import api as _api  # noqa: PLC0415
  from jax_signedcut._calibration import gptq as _gptq  # noqa: PLC0415
  from jax_signedcut._calibration import objective as _objective  # noqa: PLC0415
  from jax_signedcut._methods import rtn as _rtn  # noqa: PLC0415

  codes = tuple(codes)
  if (not codes or any(isinstance(b, bool) or int(b) != b or not 2 <= b <= 8 for b in codes)
      or any(b1 <= b0 for b0, b1 in zip(codes, codes[1:]))):
    raise ValueError(f"codes must be increasing integers in 2..8, got {codes}")
  if keep is not None and keep not in codes:
    raise ValueError(f"keep={keep!r} is not among codes {codes}")
  _check_same_names(weights, hessians)
  curves, kept = {}, {}
  for name in sorted(weights):
    w = jnp.asarray(weights[name], jnp.float32)
    h = _api.check_statistics(hessians[name], w.shape, path=name)
    fan_in, out = w.shape
    errs = []
    for b in codes:
      r = _gptq.gptq(w, h, bits=int(b), damp=damp).reconstruct()
      errs.append(float(_objective.relative_output_error(w, r, h)) ** 2)
      if keep is not None and b == keep:
        kept[name] = np.asarray(r)
    curves[name] = (np.array([_rtn.rtn_bits_per_weight(out, fan_in, int(b)) for b in codes]),
                    np.array(errs))
  return curves, kept


def gptq_codes(budgets) -> tuple[int, ...]:
  """The GPTQ code widths of a budget grid: its values rounded to integers in 2..8.

  Raises:
    ValueError: none of ``budgets`` rounds into 2..8 (naming them).
  """
  codes = tuple(sorted({int(round(b)) for b in budgets if 2 <= round(b) <= 8}))
  if not codes:
    raise ValueError(f"the options {tuple(budgets)} bits per weight hold no GPTQ code width "
                     "in 2..8")
  return codes


def merge_curves(by_method: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]):
  """One curve per matrix over the options of several methods, and which method each is.

  Args:
    by_method: ``{method: {name: (bits, error)}}``; a matrix may be missing from some
      methods (e.g. embedding tables have no GPTQ curve).

  Returns:
    ``(curves, methods)``: ``curves = {name: (bits, error)}`` with the options of every
    method sorted by bits (of two options with the same bits, the lower error), for
    :func:`allocate_bits`; ``methods = {name: {bits: method}}`` to read the choice back.
  """
  options: dict[str, dict[float, tuple[float, str]]] = {}
  for method, curves in by_method.items():
    for name, (bits, err) in curves.items():
      for b, e in zip(np.asarray(bits, np.float64), np.asarray(err, np.float64)):
        best = options.setdefault(name, {}).get(float(b))
        if best is None or e < best[0]:
          options[name][float(b)] = (float(e), method)
  curves, methods = {}, {}
  for name, opts in options.items():
    bits = sorted(opts)
    curves[name] = (np.array(bits), np.array([opts[b][0] for b in bits]))
    methods[name] = {b: opts[b][1] for b in bits}
  return curves, methods


def check_sensitivities(sensitivity: Mapping[str, float], names, *, where: str = "") -> dict:
  """``{name: float}`` after checking: finite, >= 0, one for each of ``names``, no others.

  Raises:
    ValueError: naming the offending names / values (and ``where``, e.g. a file).
  """
  at = f"{where}: " if where else ""
  out = {}
  for k, v in dict(sensitivity).items():
    try:
      f = float(v)
    except (TypeError, ValueError):
      f = float("nan")
    if isinstance(v, bool) or not np.isfinite(f) or f < 0:
      raise ValueError(f"{at}sensitivity of {k!r} must be a finite number >= 0, got {v!r}")
    out[k] = f
  names = set(names)
  missing, stray = sorted(names - set(out)), sorted(set(out) - names)
  if missing:
    raise ValueError(f"{at}no sensitivity for {len(missing)} kernels with statistics: "
                     f"{missing[:4]}")
  if stray:
    raise ValueError(f"{at}sensitivities for {len(stray)} names without statistics: "
                     f"{stray[:4]} (kernels are e.g. {sorted(names)[:4]})")
  return out


def allocate_bits(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  sizes: Mapping[str, int], bits_per_weight: float, *,
                  sensitivity: Mapping[str, float] | None = None) -> dict[str, float]:
  """Bits per weight per kernel, ``Σ bits_l · size_l <= bits_per_weight · Σ size_l``.

  Args:
    curves: ``{name: (bits, error)}`` (e.g. :func:`budget_curves`).
    sizes: ``{name: number of weights}``.
    bits_per_weight: the average over these kernels.
    sensitivity: ``{name: loss per unit of error}`` (default 1).

  Returns:
    ``{name: bits per weight}``, each one of its curve's options.
  """
  if set(curves) != set(sizes):
    raise ValueError(f"curves and sizes must name the same kernels; differ in "
                     f"{sorted(set(curves) ^ set(sizes))[:4]}")
  if sensitivity is not None:
    sensitivity = check_sensitivities(sensitivity, curves)
  nbytes = {k: (np.asarray(b, np.float64) * sizes[k] / 8, e) for k, (b, e) in curves.items()}
  total = float(bits_per_weight) * sum(sizes.values()) / 8
  choice = allocate(nbytes, total * (1 + 1e-12), sensitivity=sensitivity)
  return {k: float(np.asarray(curves[k][0])[i]) for k, i in choice.items()}


def allocation_rules(bits: Mapping[str, float], *, options=None, method="signed_cut"):
  """``rules`` for ``decompose`` / ``decompose_leafwise``: one exact-path rule per kernel.

  ``options``: one dict for every kernel or a callable ``name -> dict``; ``method``: one
  method for every kernel or a callable ``name -> method`` (e.g. from
  :func:`merge_curves`' ``methods``).
  """
  import re  # noqa: PLC0415

  from jax_signedcut._core.tree import Budget  # noqa: PLC0415

  method_of = method if callable(method) else (lambda name: method)  # noqa: E731
  return [(f"^{re.escape(name)}$",
           Budget(bits_per_weight=float(b), method=method_of(name),
                  options=_options_for(options, name) or None))
          for name, b in sorted(bits.items())]


def measure_sensitivities(model, kept: Mapping[str, np.ndarray], loss, errors=None) -> dict:
  """Per kernel: the model's loss with only that kernel replaced, per unit of its error.

  Args:
    model: a Flax NNX module; each name in ``kept`` is the ``/``-joined path of one
      of its parameters (as ``nnx.state(model, nnx.Param)`` and ``decompose`` name
      them). The parameter is restored after each measurement.
    kept: ``{name: replacement value}`` (e.g. :func:`budget_curves`' ``kept``).
    loss: ``loss(model) -> float``, e.g. ``mean(1 − cos)`` of the outputs to the
      original model's on calibration inputs (never evaluation data).
    errors: ``{name: the replacement's error}`` in the curves' unit (squared
      relative output error); the sensitivity is ``loss / error``. None: the loss.

  Returns:
    ``{name: sensitivity >= 0}``.

  Raises:
    ValueError: a name that is no parameter of the model, a replacement of another
      shape, a non-finite loss.
  """
  import jax.numpy as jnp  # noqa: PLC0415

  out = {}
  for name, value in kept.items():
    var = _variable(model, name)
    old = var.get_value()
    if tuple(np.shape(value)) != tuple(old.shape):
      raise ValueError(f"replacement for {name!r} has shape {tuple(np.shape(value))}, the "
                       f"parameter {tuple(old.shape)}")
    var.set_value(jnp.asarray(value, old.dtype))
    try:
      val = float(loss(model))
    finally:
      var.set_value(old)
    if not np.isfinite(val):
      raise ValueError(f"loss with {name!r} replaced is not finite ({val})")
    e = 1.0 if errors is None else float(errors[name])
    out[name] = max(val, 0.0) / max(e, 1e-30)
  return out


def _variable(model, name: str):
  obj = model
  for k in name.split("/"):
    try:
      obj = obj[int(k)] if k.isdigit() else getattr(obj, k)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise ValueError(f"{name!r} is no parameter path of the model (no {k!r})") from None
  if not hasattr(obj, "set_value"):
    raise ValueError(f"{name!r} is no parameter of the model (got {type(obj).__name__})")
  return obj
