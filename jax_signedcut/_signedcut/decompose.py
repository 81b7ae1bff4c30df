"""``decompose``: input checks, width resolution and backend dispatch."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core import checks as _checks
from jax_signedcut._core import sharding as _sharding
from jax_signedcut._signedcut import budget as _budget
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut import factors as _factors
from jax_signedcut._parts import lowrank as _lowrank
from jax_signedcut._signedcut import oracle as _oracle
from jax_signedcut._signedcut import outliers as _outliers
from jax_signedcut._core import scaling as _scaling
from jax_signedcut._core import progress as _progress
from jax_signedcut._signedcut import start as _start
from jax_signedcut._core import tree as _tree
from jax_signedcut._kernels import extension as _extension
from jax_signedcut._methods import registry as _registry
from jax_signedcut._parts.lowrank import LowRankPart
from jax_signedcut._parts.sparse import Sparse
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut.factors import SignedCut

BACKENDS = ("auto", "jnp", "ffi")


def _check_matrix(a, name="a"):
  return _checks.float_matrix(name, a)


def _check_max_error(max_error):
  return None if max_error is None else _checks.real("max_error", max_error)


_SMALLEST_NORMAL_EXPONENT = -126


@jax.jit
def _max_exponents(a):
  return _scaling.max_exponent(a, (-2, -1))


def _warn_subnormal(a, name="a"):
  """Warns (eagerly) if a matrix's entries are all float32 subnormals: its cuts are 0."""
  if isinstance(a, jax.core.Tracer):
    return
  if isinstance(a, jax.Array):
    e = np.asarray(_max_exponents(a))
    top = np.where(e == 0, 1.0, 0.0)   # e = 0 only for |max| in [1, 2) or all zeros
  else:
    x = np.asarray(a)
    top = np.maximum(np.max(x, axis=(-2, -1)), -np.min(x, axis=(-2, -1))).astype(np.float32)
    e = np.where(top > 0, np.frexp(np.where(top > 0, top, 1))[1] - 1, 0)
  tiny = (e < _SMALLEST_NORMAL_EXPONENT) & (top != 0)
  if np.any(tiny):
    warnings.warn(
        f"{name} has {int(np.sum(tiny))} matrix(es) whose largest entry is below the float32 "
        f"normal range (2^-126 ≈ 1.2e-38): their cut scales would be subnormal, are "
        "flushed to 0, and the decomposition is all zeros. Scale the matrix up first.",
        UserWarning, stacklevel=4)


def _check_allocation(w, m, n, count):
  """A clear error, before any allocation, for a width no machine could hold."""
  words = _packing.num_words(m) + 2 * _packing.num_words(n)   # s, t and the start signs
  nbytes = w * count * (4 * words + 4)
  _checks.allocation("width", w, nbytes,
                     f"the factors of {count} matrix(es) of shape ({m}, {n}) "
                     f"({4 * words + 4} bytes per cut)")


def decompose(a, *, key, width: int | None = None, rate: float | None = None,
              bits_per_weight: float | None = None, max_error: float | None = None,
              outliers="auto", backend: str = "auto", rules=None, skip=(),
              min_dim: int = _tree.MIN_DIM, lowrank: int | str = 0,
              method: str = "signed_cut", options=None, calibration=None):
  """Greedy signed cut decomposition ``A ≈ S·diag(c)·Tᵀ`` of a matrix, a batch or a pytree.

  With ``method`` another compression method spends the same budget instead
  (``"rtn"``, ``"lplr"``, ``"dsvd"``, ``"lp_lowrank"``; see
  :mod:`jax_signedcut._methods.registry`), and rules may mix methods per leaf
  with ``Budget(method=...)``.

  Cuts are built one at a time on the remainder; each starts from key-derived
  random column signs and alternates ``s = sgn(R t)``, ``t = sgn(Rᵀ s)`` until
  ``sᵀ R t`` stops rising, then subtracts ``c s tᵀ`` with ``c = sᵀ R t / (m n)``.

  Args:
    a: float array (..., m, n); float32, bfloat16, float16 or float64
      (computed in float32). Leading dims are independent matrices.
    key: a ``jax.random.key`` of shape () — the same start signs are used for
      every matrix of the batch — or of the batch shape (...).
    width: number of cuts.
    rate: storage as a fraction of the bf16 footprint (see ``width_for_rate``).
    bits_per_weight: storage in bits per entry (see ``width_for_bits``).
    max_error: stop early once ‖R‖_F ≤ max_error·‖A‖_F; the width from the
      other argument is then the maximum and ``num_cuts`` records the count.
    outliers: ``"auto"`` (default), a fraction in (0, 1), or 0. The selected
      entries are stored apart (int32 flat index + f32 value, 8 bytes each) and
      removed before the cuts are made. With ``rate``/``bits_per_weight`` they
      are paid from the same budget (the cuts that are left over are recorded in
      ``num_cuts``; the arrays keep the full width); with ``width`` they come on
      top. ``"auto"`` takes the entries more than 6 robust standard deviations
      from the median (at most 0.5 % of them) and picks none on well-behaved
      (e.g. Gaussian) matrices; see ``jax_signedcut._signedcut.outliers``. A fraction
      takes that share of the largest-magnitude entries.
    lowrank: rank r >= 0 of an optional low-rank part (default 0: none), or
      ``"auto"`` (outside ``jax.jit`` only): the rank of 0, 4, 8, 16, 32 that
      fits the budget and gives the smallest error, at the cost of one
      decomposition per candidate.
      After the outlier split, the rank-r truncated SVD of the remainder is
      stored as bf16 factors ``U`` (..., m, r), ``V`` (..., n, r) (fields
      ``lr_u``, ``lr_v``) and subtracted before the cuts are made. Its
      ``r·(m+n)·2`` bytes are paid from a rate/bits budget like the sparse part
      (fewer cuts; a budget too small for it is an error); with ``width`` it
      comes on top. Helps smooth, nearly low-rank matrices (position
      embeddings); hurts well-behaved kernels. See ``jax_signedcut._parts.lowrank``.
    backend: ``"jnp"`` (the pure-jnp oracle, any platform), ``"ffi"`` (the C++
      kernel, CPU only) or ``"auto"`` (the C++ kernel when the computation is
      lowered for CPU, the jnp oracle on other platforms).
    rules: pytrees only: an ordered list of ``(regex, budget)`` pairs; the
      first regex that ``re.search``-matches a leaf's ``/``-joined path picks
      its budget: a :class:`Budget` (or a dict of its fields) or ``None`` to
      keep the leaf dense. Leaves no rule matches get the default budget
      from width / rate / bits_per_weight / max_error, or stay dense when
      none is given. A warning lists rules that selected no leaf.
    skip: pytrees only: regexes of paths kept dense whatever the rules say
      (e.g. ``("embed", "lm_head")``).
    min_dim: pytrees only: leaves whose last two dims are not both >= this
      stay dense. 1-D and non-float leaves always stay dense.
    method: ``"signed_cut"`` (default) or the name of another registered
      method. Other methods take ``rate`` or ``bits_per_weight`` (bits per
      weight is the common currency, a rate r is 16·r bits) and no width,
      max_error, lowrank or (non-default) outliers; their result's ``nbytes``
      stays within the budget.
    options: the method's own options as a dict (e.g. ``{"group_size": 64}``
      for ``"rtn"``, ``{"bits": (4, 4)}`` for ``"lplr"``). Signed cuts take
      options only with ``calibration`` (``sparse_fraction``, ``fallback``, …;
      see ``jax_signedcut._calibration.api.SIGNED_CUT_OPTIONS``).
    calibration: input statistics, to minimise the error on the layer's outputs
      ``tr(EᵀHE)`` instead of ‖E‖_F (docs/calibration.md). For one matrix
      ``a`` (in, out) (Flax layout, ``y = x a``): its (in, in) second moment
      ``H = XᵀX / N``. For a pytree: a ``Calibration`` (``sc.calibrate``,
      ``sc.load_calibration``) or a mapping / pytree of such matrices keyed by
      leaf path; selected leaves with statistics are compressed calibrated, the
      others as without. Signed cuts then use input scales, H-aware cuts and a
      least-squares refit (keeping the plain cuts where those have the lower
      output error, unless ``options={"fallback": False}``); ``method="gptq"``
      needs statistics; the other methods cannot use them. Calibrated
      compression takes a rate or bits_per_weight budget and runs eagerly
      (not under ``jax.jit``).

  A bare array (``jax.Array``, ``np.ndarray``, nested lists of numbers) is one
  matrix or a batch of matrices. Anything else (dict, list, tuple, Flax
  ``nnx.State`` or Linen variables) is a pytree: the selected leaves come back
  as ``SignedCut`` (leading stacked dims decomposed as a batch), all other
  leaves unchanged. Leaf ``path`` uses the key
  ``fold_in(key, zlib.crc32(path.encode()))``; see :mod:`jax_signedcut._core.tree`.

  Exactly one of width / rate / bits_per_weight must be given. All
  configuration is static under ``jax.jit``; ``a`` and ``key`` may be traced.

  Returns:
    A :class:`SignedCut` with s_bits (..., w, ceil(m/32)), t_bits
    (..., w, ceil(n/32)), c (..., w) and num_cuts (...) when the cuts are
    the only part; with a sparse part (any ``outliers`` but 0, so also the
    default) or a low-rank part, a :class:`Sum` of ``(LowRankPart, SignedCut,
    Sparse)`` (those present, in that order). Another ``method`` gives its own
    type (``QuantizedMatrix``, ``LowRank``). Every one is a ``Compressed``.

  Raises:
    TypeError: non-float ``a``, a bad key or a non-integer width.
    ValueError: ndim < 2, an empty dimension, NaN/Inf entries (checked
      eagerly only: under ``jax.jit`` a non-finite matrix gives NaN scales and
      ``num_cuts`` 0 instead), a bad budget, or an unknown backend; for
      pytrees also a bad rule (regex or budget, naming the rule), a selected
      leaf with NaN/Inf or whose budget pays for no cut (naming its path).

  Example:
    >>> import jax
    >>> import jax_signedcut as sc
    >>> a = jax.random.normal(jax.random.key(1), (64, 48))
    >>> f = sc.decompose(a, key=jax.random.key(0), width=96, outliers=0)
    >>> f.s_bits.shape, f.t_bits.shape, f.c.shape
    ((96, 2), (96, 2), (96,))
    >>> g = sc.decompose(a, key=jax.random.key(0), width=96)   # outliers="auto"
    >>> [type(p).__name__ for p in g.parts]
    ['SignedCut', 'Sparse']
    >>> bool(sc.relative_error(a, f) < 0.5)
    True
  """
  if a is None or isinstance(a, (numbers.Number, str, bytes)):
    raise TypeError(f"a must be an array of shape (..., m, n) or a pytree of them, got "
                    f"{type(a).__name__} {a!r:.40}")
  if not _tree.is_single_array(a):
    return _decompose_pytree(a, key=key, width=width, rate=rate, bits_per_weight=bits_per_weight,
                             max_error=max_error, outliers=outliers, backend=backend,
                             rules=rules, skip=skip, min_dim=min_dim, progress=False,
                             leafwise=False, lowrank=lowrank, method=method, options=options,
                             calibration=calibration)
  if rules is not None or (skip != () and skip):
    raise ValueError("rules and skip apply to pytrees of parameters; a bare array is one "
                     f"matrix (or a batch), got rules={rules!r}, skip={skip!r}")
  if calibration is not None:
    from jax_signedcut._calibration import api as _cal_api  # noqa: PLC0415
    if not isinstance(method, str) or (method != _registry.SIGNED_CUT
                                       and method not in _registry.names()):
      _registry.get(method)   # the unknown-method error
    return _cal_api.compress_one(a, calibration, key=key, width=width, rate=rate,
                                 bits_per_weight=bits_per_weight, max_error=max_error,
                                 outliers=outliers, lowrank=lowrank, method=method,
                                 options=options)
  if method != _registry.SIGNED_CUT or options is not None:
    return _compress_other(a, key=key, width=width, rate=rate, bits_per_weight=bits_per_weight,
                           max_error=max_error, outliers=outliers, lowrank=lowrank,
                           method=method, options=options)
  a, key, w, max_error, mode, budget, lowrank = _check_single(
      a, key, width, rate, bits_per_weight, max_error, outliers, backend, lowrank)
  m, n = a.shape[-2:]
  if lowrank == "auto":
    return _pick_rank(lambda r: _decompose(jnp.asarray(a), key, width=w, max_error=max_error,
                                           backend=backend, outliers=mode, budget=budget,
                                           lowrank=r), a, m, n, budget)
  run = functools.partial(_decompose, width=w, max_error=max_error, backend=backend,
                          outliers=mode, budget=budget, lowrank=lowrank)
  return _per_shard(run, jnp.asarray(a), key)


def width_bucket(w: int) -> int:
  """``w`` rounded up to a multiple of ``2^(bit_length(w) − 4)``: at most 1/8 more, w <= 16 kept.

  The widths of :func:`decompose_bucketed`'s compilations.
  """
  if w <= 16:
    return w
  step = 1 << (w.bit_length() - 4)
  return -(-w // step) * step


def truncate_cuts(f, width: int):
  """``f`` (a ``SignedCut`` or a ``Sum`` holding one) with its cut arrays cut to ``width`` slots."""
  if isinstance(f, Sum):
    return Sum(tuple(truncate_cuts(p, width) if isinstance(p, SignedCut) else p
                     for p in f.parts))
  if any(isinstance(x, jax.core.Tracer) for x in (f.s_bits, f.t_bits, f.c, f.num_cuts)):
    return dataclasses.replace(f, s_bits=f.s_bits[..., :width, :],
                               t_bits=f.t_bits[..., :width, :], c=f.c[..., :width],
                               num_cuts=jnp.minimum(f.num_cuts, width).astype(jnp.int32))
  # Eagerly on the host: each eager slice of a new width would compile.
  host = lambda x, sl: jnp.asarray(np.asarray(x)[sl])  # noqa: E731
  rows = (Ellipsis, slice(None, width), slice(None))
  return dataclasses.replace(f, s_bits=host(f.s_bits, rows), t_bits=host(f.t_bits, rows),
                             c=host(f.c, (Ellipsis, slice(None, width))),
                             num_cuts=jnp.asarray(np.minimum(np.asarray(f.num_cuts), width),
                                                  jnp.int32))


def decompose_bucketed(a, *, key, width: int | None = None, rate: float | None = None,
                       bits_per_weight: float | None = None, outliers="auto",
                       backend: str = "auto"):
  """``decompose`` of one array (eagerly) compiled at a bucketed width: the same factors.

  For callers that decompose many matrices of one shape at slightly different
  widths or budgets (the calibrated pipeline's searches of row blocks and the
  plain fallback): the greedy runs ``width_bucket(w)`` cuts in a compilation
  shared by every width of the bucket (the budget is traced) and the result is
  cut back to ``w`` slots. Cut j depends only on the key and the cuts before it
  (prefix consistency: start words from ``fold_in(key, j)``), so the factors are
  bit for bit those of ``decompose`` at width ``w``; at most 1/8 more cuts are
  searched.
  """
  if isinstance(a, jax.core.Tracer):
    raise ValueError("decompose_bucketed runs eagerly; under jax.jit use decompose")
  if not _tree.is_single_array(a):
    raise TypeError(f"a must be an array, got {type(a).__name__}")
  a, key, w, max_error, mode, budget, lowrank = _check_single(
      a, key, width, rate, bits_per_weight, None, outliers, backend, 0)
  f = _decompose(jnp.asarray(a), key, width=width_bucket(w), max_error=None, backend=backend,
                 outliers=mode, budget=budget, lowrank=0)
  return truncate_cuts(f, w)


def _explicit_batch_sharding(a):
  """``(mesh, batch spec, whether a matrix axis is sharded)`` when ``a``'s type says it is
  sharded over explicit mesh axes (``jax.sharding.AxisType.Explicit``), else None."""
  sharding = getattr(jax.typeof(a), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
  if all(p is None for p in spec):
    return None
  return mesh, spec[:-2], spec[-2:] != (None, None)


def _per_shard(run, a, key):
  """``run(a, key)``, on each device's own matrices when the batch is sharded explicitly.

  Matrices are independent, so a stack (layers × m × n) sharded on a leading
  axis is decomposed shard by shard inside ``jax.shard_map``: no gather, and
  the factors come back sharded the same way. A sharded matrix axis is gathered
  first (a matrix is decomposed whole). (With ``AxisType.Auto`` meshes the
  compiler partitions the computation itself: see ``_core/sharding.py``.)
  """
  found = _explicit_batch_sharding(a)
  if found is None:
    return run(a, key)
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  mesh, batch, matrix_sharded = found
  if not isinstance(a, jax.core.Tracer):
    mesh = a.sharding.mesh      # called eagerly: the concrete mesh
  if matrix_sharded:      # each matrix whole on its device
    a = jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, P(*batch, None, None)))
  if all(p is None for p in batch):
    return run(a, key)
  key_spec = P(*batch) if key.shape == a.shape[:-2] else P()
  if key_spec != P():
    key = jax.sharding.reshard(key, jax.sharding.NamedSharding(mesh, key_spec))
  return jax.shard_map(run, mesh=mesh, in_specs=(P(*batch, None, None), key_spec),
                       out_specs=P(*batch))(a, key)


def _compress_other(a, *, key, width, rate, bits_per_weight, max_error, outliers, lowrank,
                    method, options):
  """``decompose`` of one array (or batch) by a registered method other than signed cuts."""
  budget = _tree._check_method(  # noqa: SLF001
      _tree.Budget(width, rate, bits_per_weight, max_error,
                   None if outliers == "auto" else outliers, lowrank or None, method, options),
      f"method {method!r}")
  if method == _registry.SIGNED_CUT:
    raise ValueError("options are for the other methods; signed cuts take decompose's own "
                     f"arguments (and options only with calibration=), got options={options!r}")
  bits = _checks.budget_bits(rate, bits_per_weight, needs=f"method {method!r} needs")
  a = _check_matrix(a)
  key = _start.as_key(key)
  m = _registry.get(method)
  return m.compress(jnp.asarray(a), key=key, bits_per_weight=bits,
                    **{**m.options, **dict(budget.options or ())})


def _check_single(a, key, width, rate, bits_per_weight, max_error, outliers, backend, lowrank):
  """The checks of ``decompose`` on one array (or batch): what ``_decompose`` needs.

  Returns:
    ``(a, key, width, max_error, outlier mode, byte budget or None, lowrank)``.
  """
  a = _check_matrix(a)
  m, n = a.shape[-2:]
  w = _budget.resolve_width(m, n, width=width, rate=rate, bits_per_weight=bits_per_weight)
  if w > _checks.INT32_MAX:
    raise ValueError(f"width={w} exceeds 2**31 - 1, the most cuts num_cuts (int32) can count")
  _check_allocation(w, m, n, math.prod(a.shape[:-2]))
  _warn_subnormal(a)
  max_error = _check_max_error(max_error)
  mode = _outliers.check_mode(outliers)
  budget = None
  if rate is not None:
    budget = rate * 2 * m * n
  elif bits_per_weight is not None:
    budget = bits_per_weight * m * n / 8
  lowrank = _check_lowrank(lowrank, m, n, budget)
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  key = _start.as_key(key)
  batch = tuple(a.shape[:-2])
  if key.shape not in ((), batch):
    raise ValueError(
        f"key must have shape () or the batch shape {batch} of a (shape {a.shape}), "
        f"got key shape {key.shape}")
  return a, key, w, max_error, mode, budget, lowrank


def _pick_rank(run, a, m, n, budget):
  """``lowrank="auto"``: ``run(r)`` for each candidate rank; the one of least ‖A − Â‖_F."""
  if isinstance(a, jax.core.Tracer):
    raise ValueError("lowrank='auto' picks the rank from the data, so it cannot run under "
                     "jax.jit / vmap; give an int rank there")
  x = jnp.asarray(a, jnp.float32)
  best = None
  for r in _lowrank.candidates(m, n, budget):
    f = run(r)
    err = float(jnp.sum(jnp.square(x - f.reconstruct())))
    if best is None or err < best[0]:
      best = (err, f)
  return best[1]


def _check_lowrank(lowrank, m, n, budget):
  """Validates ``lowrank`` for (m, n) matrices and a byte budget (or None)."""
  r = _lowrank.check_rank(lowrank, (m, n))
  if r == "auto":
    return r
  if budget is not None and _lowrank.nbytes_for(r, m, n) > budget:
    raise ValueError(
        f"lowrank={r} needs {_lowrank.nbytes_for(r, m, n)} bytes (r·(m+n)·2 for shape "
        f"{(m, n)}) but the rate/bits budget is {budget:g} bytes")
  return r


def _decompose_pytree(tree, *, key, width, rate, bits_per_weight, max_error, outliers, backend,
                      rules, skip, min_dim, progress, leafwise, lowrank=0,
                      method="signed_cut", options=None, calibration=None):
  _outliers.check_mode(outliers)
  _lowrank.check_rank(lowrank)
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if (width, rate, bits_per_weight) == (None, None, None):
    if max_error is not None:
      raise ValueError(f"max_error={max_error!r} is an early stop and needs a width, rate or "
                       "bits_per_weight as the cap")
    default = None
  else:
    default = _tree._check_budget(  # noqa: SLF001
        _tree.Budget(width, rate, bits_per_weight, max_error,
                     method=None if method == _registry.SIGNED_CUT else method,
                     options=None if method == _registry.SIGNED_CUT else options),
        "default budget (decompose's width/rate/bits_per_weight/max_error/method)")
  return _tree.decompose_tree(tree, key=key, default=default, backend=backend, rules=rules,
                              skip=skip, min_dim=min_dim,
                              decompose_one=_decompose_leaf if leafwise else decompose,
                              progress=progress, outliers=outliers, lowrank=lowrank,
                              method_default=method, calibration=calibration,
                              options_default=_tree._check_method(  # noqa: SLF001
                                  _tree.Budget(bits_per_weight=1, method=method,
                                               options=options), "options").options)


def decompose_leafwise(tree, *, key, width: int | None = None, rate: float | None = None,
                       bits_per_weight: float | None = None, max_error: float | None = None,
                       outliers="auto", backend: str = "auto", rules=None, skip=(),
                       min_dim: int = _tree.MIN_DIM, progress: bool = True,
                       lowrank: int | str = 0, method: str = "signed_cut", options=None,
                       calibration=None):
  """``decompose`` of a pytree one leaf at a time, with a progress bar.

  Not for use under ``jax.jit``: each selected leaf is decomposed by its own
  jitted call (compiled once per shape and budget) and waited for before the
  next starts, so peak memory stays near one leaf's working set. The factors
  are the same as ``jax.jit(lambda t: decompose(t, ...))(tree)`` gives. On CPU
  the outliers are chosen on the host and zeroed in a copy of the leaf (only
  when it has some), not by full-size temporaries inside the jitted call.

  Args:
    tree: a pytree of arrays (see :func:`decompose`).
    key, width, rate, bits_per_weight, max_error, outliers, backend, rules,
      skip, min_dim, lowrank, method, options, calibration: as for :func:`decompose`.
    progress: show a tqdm bar (if tqdm is installed).

  Returns:
    The tree with the selected leaves replaced by :class:`SignedCut`.

  Example:
    >>> import jax
    >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 32)), "b": jax.numpy.zeros(32)}
    >>> f = decompose_leafwise(params, key=jax.random.key(1), rate=0.5, progress=False,
    ...                        outliers=0)
    >>> type(f["w"]).__name__, f["b"].shape
    ('SignedCut', (32,))
  """
  if _tree.is_single_array(tree):
    raise TypeError("decompose_leafwise takes a pytree of parameters; use decompose for an "
                    f"array, got {type(tree).__name__}")
  return _decompose_pytree(tree, key=key, width=width, rate=rate, bits_per_weight=bits_per_weight,
                           max_error=max_error, outliers=outliers, backend=backend, rules=rules,
                           skip=skip, min_dim=min_dim, progress=progress, leafwise=True,
                           lowrank=lowrank, method=method, options=options,
                           calibration=calibration)


# ``budget`` (bytes, a float or None) is traced: it only limits the cut count in the
# graph (``_factors.budget_limit``), so budgets that differ only in bytes (the row
# blocks of a calibrated kernel, say) share one compilation per width.
@functools.partial(jax.jit, static_argnames=("width", "max_error", "backend", "outliers",
                                             "lowrank"))
def _decompose(a, key, *, width, max_error, backend, outliers=0, budget=None, lowrank=0):
  batch = a.shape[:-2]
  m, n = a.shape[-2:]
  count = math.prod(batch)
  a = a.astype(jnp.float32).reshape(count, m, n)
  a_full = a
  k_max = _outliers.max_count(outliers, m, n)
  sparse = None
  if k_max:
    a, *sparse = _sharding.per_matrix(_vmapped(_outliers.extract, mode=outliers, k_max=k_max), a)
  stats = _full_stats(a_full, with_norm=bool(k_max or lowrank) and max_error is not None)
  a, lowpart = _split_lowrank(a, lowrank)
  return _cuts(a, key, sparse, stats, batch=batch, width=width, max_error=max_error,
               backend=backend, budget=budget, lowpart=lowpart)


@functools.cache
def _vmapped(fn, **kw):
  """``jax.vmap(partial(fn, **kw))``, one object per configuration (for ``per_matrix``)."""
  return jax.vmap(functools.partial(fn, **kw))


def _scale_down(a, rescale=None):
  """``(a·2⁻ᵏ, k)`` of the f32 matrices a (N, m, n), k per matrix (``_scaling``).

  ``rescale``: None decides in the graph (a ``lax.cond``); False (the host
  found every k = 0) returns ``a`` itself with no scaling op at all, so the
  leaf-by-leaf path keeps its memory profile for ordinary matrices.
  """
  if rescale is False:
    return a, jnp.zeros(a.shape[:1], jnp.int32)
  k = _scaling.exponent(a)
  scaled = jax.lax.cond(jnp.any(k != 0), lambda x: _scaling.ldexp(x, -k[:, None, None]),
                        lambda x: x, a)
  return scaled, k


def _scale_up(x, k):
  """``x·2ᵏ`` of small per-matrix arrays x (N, ...), bit for bit x where k = 0."""
  k = k.reshape(k.shape + (1,) * (x.ndim - 1))
  return jnp.where(k == 0, x, _scaling.ldexp(x, k).astype(x.dtype))


def _split_lowrank(a, lowrank, rescale=None):
  """(a − U·Vᵀ, (U, V)) of the remainders a (N, m, n), or (a, None) for rank 0.

  The SVD runs on a·2⁻ᵏ (exact; see ``_scaling``) so that singular values of
  huge matrices do not overflow; U and V get 2^⌈k/2⌉ and 2^⌊k/2⌋ back.
  """
  if not lowrank:
    return a, None
  scaled, k = _scale_down(a, rescale)
  rem, lr_u, lr_v = _sharding.per_matrix(_vmapped(_lowrank.extract, r=lowrank), scaled)
  rem = jax.lax.cond(jnp.any(k != 0), lambda x: _scaling.ldexp(x, k[:, None, None]),
                     lambda x: x, rem)
  lr_u = _scale_up(lr_u.astype(jnp.float32), k - k // 2).astype(lr_u.dtype)
  lr_v = _scale_up(lr_v.astype(jnp.float32), k // 2).astype(lr_v.dtype)
  return rem, (lr_u, lr_v)


def _full_stats(a, *, with_norm):
  """(finite (N,), ‖A·2⁻ᵏ‖² (N,) or None, k (N,)) of the f32 matrices (N, m, n) before the split.

  The norm is taken of A scaled by the power of two of ``_scaling.exponent`` (k = 0,
  no scaling, for every ordinary matrix) so that it cannot overflow.
  """
  finite = jnp.all(jnp.isfinite(a), axis=(-2, -1))
  k = _scaling.exponent(a)
  full2 = jnp.sum(jnp.square(_scaling.ldexp(a, -k[:, None, None])), axis=(-2, -1)) \
      if with_norm else None
  return finite, full2, k


def _account(cuts, others, a, full2, k_full, *, width, max_error, budget, lowrank):
  """The cuts of a decomposition with other parts, limited by ``max_error`` and the budget.

  The backend stopped at ``max_error`` relative to the remainder after the
  other parts, which is no later than needed; stop at ``max_error·‖A‖``
  instead, using ‖R_k‖² = ‖remainder‖² − mn Σ_{j<k} c_j², every term scaled by
  the 2⁻²ᵏ that ``full2`` was (``_full_stats``). With a rate or bits
  budget, the other parts' bytes are paid first and the cuts get the rest.
  """
  m, n = cuts.shape
  if max_error is not None:
    c = _scaling.ldexp(cuts.c, -k_full[:, None])
    rem2 = jnp.sum(jnp.square(_scaling.ldexp(a, -k_full[:, None, None])), axis=(-2, -1))
    r2 = rem2[:, None] - (m * n) * jnp.cumsum(jnp.square(c), axis=-1) + (m * n) * jnp.square(c)
    needed = jnp.sum(r2 > jnp.float32(max_error) ** 2 * full2[:, None], axis=-1,
                     dtype=jnp.int32)
    if not lowrank:
      # A sparse part that took no entry leaves the remainder as it was.
      needed = jnp.where(others[0].count > 0, needed, cuts.num_cuts)
    cuts = _factors.limit_cuts(cuts, needed)
  if budget is not None:
    cuts = _factors.limit_cuts(cuts, _factors.budget_limit(budget, m, n, width=width,
                                                           others=others))
  return cuts


def _cuts(a, key, sparse, stats, *, batch, width, max_error, backend, budget, lowpart=None,
          rescale=None):
  """The cuts of the remainders a (N, m, n), then the sparse and low-rank parts' accounting.

  ``stats`` is ``_full_stats`` of the matrices before the split. The backends
  see each remainder scaled by 2⁻ᵏ (``_scaling``: exact, and k = 0 for every
  ordinary matrix, which is then not copied) and the scales c get 2ᵏ back.
  """
  finite, full2, k_full = stats
  count, m, n = a.shape
  if key.shape == ():
    words = _start.start_words(key, width, n)
    words_axis = None
  else:
    words = jax.vmap(lambda k: _start.start_words(k, width, n))(key.reshape(count))
    words_axis = 0

  def run_jnp(a, words):
    run = functools.partial(_oracle.greedy, max_error=max_error)
    return jax.vmap(run, in_axes=(0, words_axis))(a, words)

  def run_ffi(a, words):
    from jax_signedcut._kernels import greedy as _ffi  # noqa: PLC0415  (loads the extension lazily)
    return _ffi.greedy(a, words, max_error=max_error)

  scaled, k = _scale_down(a, rescale)
  if backend == "ffi":
    s_bits, t_bits, c, num_cuts = run_ffi(scaled, words)
  elif backend == "auto":
    # The C++ kernel where this lowers for CPU, the jnp oracle elsewhere.
    s_bits, t_bits, c, num_cuts = _extension.on_platform(scaled, words, cpu=run_ffi,
                                                         default=run_jnp)
  else:
    s_bits, t_bits, c, num_cuts = run_jnp(scaled, words)
  del scaled
  c = _scale_up(c, k)

  cuts = SignedCut(s_bits=s_bits, t_bits=t_bits, c=c, num_cuts=num_cuts, shape=(m, n))
  others = []
  if lowpart is not None:
    others.append(LowRankPart(*lowpart, shape=(m, n)))
  if sparse is not None:
    others.append(Sparse(*sparse, shape=(m, n)))
  if others:
    cuts = _account(cuts, others, a, full2, k_full, width=width, max_error=max_error,
                    budget=budget, lowrank=lowpart is not None)
  # Under jit the NaN/Inf check cannot raise; make the failure visible instead.
  cuts = dataclasses.replace(cuts, c=jnp.where(finite[:, None], cuts.c, jnp.nan),
                             num_cuts=jnp.where(finite, cuts.num_cuts, 0).astype(jnp.int32))
  # The parts in the order they were taken out: low rank, cuts, sparse.
  parts = [p for p in others if isinstance(p, LowRankPart)] + [cuts] + \
      [p for p in others if isinstance(p, Sparse)]
  f = cuts if len(parts) == 1 else Sum(tuple(parts))
  return jax.tree.map(lambda x: x.reshape(*batch, *x.shape[1:]), f)


# The host split of the leaf-by-leaf paths (decompose_leafwise, the CLI): the
# same factors as _decompose, with the outliers chosen on the host a chunk at a
# time and zeroed in place, so that no full-size score, top-k or remainder
# temporaries exist next to the matrix while the kernel runs.

@functools.partial(jax.jit, static_argnames=("with_norm",))
def _host_full_stats(a, *, with_norm):
  m, n = a.shape[-2:]
  return _full_stats(a.reshape(-1, m, n), with_norm=with_norm)


def _zero_entries(a, idx, factor):
  m, n = a.shape[-2:]
  x = a.reshape(-1, m * n)
  x = jax.vmap(lambda x, i, f: x.at[i].multiply(f))(x, idx.reshape(x.shape[0], -1),
                                                      factor.reshape(x.shape[0], -1))
  return x.reshape(a.shape)


_zero_entries_copy = jax.jit(_zero_entries)
_zero_entries_in_place = jax.jit(_zero_entries, donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("width", "max_error", "backend", "lowrank",
                                             "rescale"))
def _decompose_split(rem, key, sparse_idx, sparse_val, num_sparse, stats, *, width,
                     max_error, backend, budget, lowrank=0, rescale=None):
  batch = rem.shape[:-2]
  m, n = rem.shape[-2:]
  count = math.prod(batch)
  k_max = sparse_idx.shape[-1]
  sparse = (sparse_idx.reshape(count, k_max), sparse_val.reshape(count, k_max),
            num_sparse.reshape(count))
  rem, lowpart = _split_lowrank(rem.reshape(count, m, n), lowrank, rescale)
  stats = jax.tree.map(lambda x: x.reshape(count), stats)
  return _cuts(rem, key, sparse, stats, batch=batch, width=width, max_error=max_error,
               backend=backend, budget=budget, lowpart=lowpart,
               rescale=None if lowrank else rescale)


def _on_cpu(x) -> bool:
  if isinstance(x, np.ndarray):
    return jax.default_backend() == "cpu"
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and \
      all(d.platform == "cpu" for d in x.devices())


def _release_heap() -> None:
  """Hands the heap's free pages back to the OS before the kernel runs (glibc only).

  The selection's and the compiler's freed temporaries otherwise stay resident
  under the kernel's peak (measured on one 4096² f32 matrix: +15 MiB, about 0.25x of it).
  """
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _decompose_leaf(a, *, key, width=None, rate=None, bits_per_weight=None, max_error=None,
                    outliers="auto", backend="auto", donate=False, progress_desc=None,
                    lowrank=0, method="signed_cut", options=None):
  """``decompose`` of one matrix (or batch) for the leaf-by-leaf paths, at lower peak memory.

  Same arguments, checks and factors (bit for bit) as :func:`decompose` of an
  array; on CPU the outliers are chosen on the host (see
  ``_outliers.select_host``) and zeroed in place instead of by ``extract``'s
  full-size temporaries inside the jitted call. ``donate=True`` lets it
  overwrite a float32 ``jax.Array`` input (the caller must not use it after).
  ``progress_desc``: a label to show a per-matrix bar under (cuts found so far,
  read from the kernel's counter while the call runs) when the matrix is large
  (``_progress.MIN_WORK``); the result is returned ready either way.
  """
  if not _tree.is_single_array(a):
    raise TypeError(f"a must be an array, got {type(a).__name__}")
  if method != _registry.SIGNED_CUT or options is not None:
    return jax.block_until_ready(decompose(
        a, key=key, width=width, rate=rate, bits_per_weight=bits_per_weight,
        max_error=max_error, outliers=outliers, lowrank=lowrank, method=method,
        options=options))
  a, key, w, max_error, mode, budget, lowrank = _check_single(
      a, key, width, rate, bits_per_weight, max_error, outliers, backend, lowrank)
  m, n = a.shape[-2:]
  batch = tuple(a.shape[:-2])

  count = math.prod(batch)
  if lowrank == "auto":
    return _pick_rank(lambda r: _decompose_leaf(
        a, key=key, width=width, rate=rate, bits_per_weight=bits_per_weight,
        max_error=max_error, outliers=outliers, backend=backend, donate=False,
        progress_desc=progress_desc, lowrank=r), a, m, n, budget)

  def run(call):
    big = progress_desc is not None and count * m * n * w >= _progress.MIN_WORK
    return _progress.run_with_progress(call, total_cuts=count * w, desc=str(progress_desc),
                                       enabled=big)

  if mode == 0 or not _on_cpu(a):
    _release_heap()
    return run(lambda: _decompose(jnp.asarray(a), key, width=w, max_error=max_error,
                                  backend=backend, outliers=mode, budget=budget,
                                  lowrank=lowrank))
  own = donate or not isinstance(a, jax.Array)
  x = jnp.asarray(a)
  if x.dtype != jnp.float32:
    x, own = x.astype(jnp.float32), True
  del a
  k_max = _outliers.max_count(mode, m, n)
  idx = np.zeros((count, k_max), np.int32)
  val = np.zeros((count, k_max), np.float32)
  num = np.zeros((count,), np.int32)
  host = np.asarray(x).reshape(count, m * n)    # a view on CPU
  for b in range(count):
    chosen = _outliers.select_host(host[b], mode, k_max)
    num[b] = chosen.size
    idx[b, :chosen.size] = chosen
    val[b, :chosen.size] = host[b, chosen]
  del host, chosen
  stats = _host_full_stats(x, with_norm=max_error is not None)
  if num.any():
    factor = np.where(np.arange(k_max) < num[:, None], np.float32(0), np.float32(1))
    x = (_zero_entries_in_place if own else _zero_entries_copy)(x, idx, factor)
  # Whether a remainder needs the power-of-two scaling, found on the host (a view
  # on CPU, no copy) so that ordinary matrices compile without any scaling op.
  host = np.asarray(x).reshape(count, m, n)
  rescale = None if any(_scaling.host_exponent(host[b]) for b in range(count)) else False
  del host
  _release_heap()
  shape = lambda v: v.reshape(batch + v.shape[1:])  # noqa: E731
  return run(lambda: _decompose_split(x, key, shape(idx), shape(val), shape(num), stats,
                                     width=w, max_error=max_error, backend=backend,
                                     budget=budget, lowrank=lowrank, rescale=rescale))
