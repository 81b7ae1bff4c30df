"""``decompose`` over pytrees: rules, budgets, skips and per-leaf keys.

A pytree (a dict of params, a list, a Flax ``nnx.State``, a Linen variables
dict …) is decomposed leaf by leaf. Each leaf has a *path*: its key path joined
with ``/`` (dict keys, attribute names and sequence indices, e.g.
``params/Dense_0/kernel`` or ``blocks/0/linear/kernel``; the trailing
``value`` of an ``nnx.Variable`` is dropped, so paths read as ``nnx.State``
prints them).

Which leaves are decomposed, and with which budget:

1. Leaves that are not floating-point arrays, that have ndim < 2 (biases, norm
   scales) or a last-two dim smaller than ``min_dim`` are kept as they are.
2. Leaves whose path matches one of the ``skip`` regexes are kept.
3. The ``rules`` are tried in order, first match wins (``re.search`` on the
   path, so anchor with ``^``/``$`` when needed); a rule's budget ``None``
   keeps the leaf dense.
4. Otherwise the default budget (``decompose``'s own width / rate /
   bits_per_weight / max_error) applies, if one was given.

A leaf of shape (..., m, n) with leading dims (stacked layers of ``nn.scan`` /
``nnx.scan``) is decomposed as a batch of matrices.

Keys: leaf ``p`` uses ``jax.random.fold_in(key, zlib.crc32(p.encode()))``, so a
leaf's factors depend only on ``key``, its path and its values — not on the
order or presence of other leaves. Every matrix of a stacked leaf uses that
same leaf key (the batch semantics of single-array ``decompose``).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import warnings
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core import checks as _checks
from jax_signedcut._signedcut import budget as _budget
from jax_signedcut._core import keypath as _keypath
from jax_signedcut._core.protocol import is_compressed

#: Leaves whose last two dims are not both at least this large are kept dense
#: unless ``decompose(..., min_dim=...)`` says otherwise: a cut of a tiny
#: matrix costs more than it saves.
MIN_DIM = 16


class Budget(NamedTuple):
  """A per-rule storage budget: exactly one of width / rate / bits_per_weight,
  optionally with ``max_error`` as an early stop (see ``decompose``), and the
  method that spends it (``None``: decompose's own ``method``). Methods other
  than ``"signed_cut"`` take a rate or bits_per_weight (no width, max_error,
  outliers or lowrank) and their own ``options``.

  Example:
    >>> Budget(rate=0.25)
    Budget(width=None, rate=0.25, bits_per_weight=None, max_error=None, outliers=None, lowrank=None, method=None, options=None)
    >>> Budget(bits_per_weight=4, method="rtn", options={"group_size": 64}).method
    'rtn'
  """

  width: int | None = None
  rate: float | None = None
  bits_per_weight: float | None = None
  max_error: float | None = None
  outliers: Any = None      # None: decompose's own ``outliers`` argument
  lowrank: Any = None       # None: decompose's own ``lowrank`` argument (int or "auto")
  method: str | None = None  # None: decompose's own ``method`` ("signed_cut", "rtn", …)
  options: Any = None       # the method's options (a dict); None: decompose's own


@dataclasses.dataclass(frozen=True)
class _Rule:
  index: int
  pattern: str
  regex: re.Pattern | None
  budget: Budget | None     # None: keep dense


def leaf_path(path) -> str:
  """The ``/``-joined path of a key path (see :mod:`jax_signedcut._core.keypath`)."""
  return _keypath.leaf_path(path)


def leaf_key(key: jax.Array, path: str) -> jax.Array:
  """The key of the leaf at ``path``: ``fold_in(key, crc32(path))``."""
  return jax.random.fold_in(key, np.uint32(zlib.crc32(path.encode("utf-8"))))


def _check_budget(b, where: str) -> Budget:
  if isinstance(b, dict):
    unknown = set(b) - set(Budget._fields)
    if unknown:
      raise ValueError(f"{where}: unknown budget keys {sorted(unknown)}; "
                       f"expected some of {list(Budget._fields)}")
    b = Budget(**b)
  if not isinstance(b, Budget):
    raise ValueError(f"{where}: budget must be a Budget, a dict or None, got {b!r}")
  given = [(k, v) for k, v in zip(("width", "rate", "bits_per_weight"), b[:3]) if v is not None]
  if len(given) != 1:
    raise ValueError(f"{where}: exactly one of width, rate, bits_per_weight must be given, "
                     f"got {b!r}")
  k, v = given[0]
  if k == "width":
    _checks.integer(f"{where}: width", v, minimum=1, error=ValueError)
  else:
    _checks.real(f"{where}: {k}", v)
  if b.max_error is not None:
    _checks.real(f"{where}: max_error", b.max_error)
  if b.outliers is not None:
    from jax_signedcut._signedcut import outliers as _outliers  # noqa: PLC0415
    try:
      _outliers.check_mode(b.outliers)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
  if b.lowrank is not None:
    from jax_signedcut._parts import lowrank as _lowrank  # noqa: PLC0415
    try:
      _lowrank.check_rank(b.lowrank)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
  return _check_method(b, where)


def _check_method(b: Budget, where: str) -> Budget:
  """The method part of a budget: a known name, its options, and only the budgets it takes."""
  from jax_signedcut._methods import registry  # noqa: PLC0415
  method = b.method
  try:
    if method is not None and method != registry.SIGNED_CUT:
      registry.get(method)
      extra = [k for k in ("width", "max_error", "outliers", "lowrank")
               if getattr(b, k) is not None]
      if extra:
        raise ValueError(f"method {method!r} takes a rate or bits_per_weight budget, not "
                         + ", ".join(f"{k}={getattr(b, k)!r}" for k in extra))
    options = registry.check_options(method or registry.SIGNED_CUT, b.options) \
        if b.options is not None else None
    if options is not None and method is None:
      raise ValueError(f"options={b.options!r} need the method they are for (method=...)")
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return b._replace(options=options)


def _check_rules(rules) -> tuple[_Rule, ...]:
  if rules is None:
    return ()
  if isinstance(rules, (str, bytes, dict)) or not hasattr(rules, "__iter__"):
    raise ValueError(f"rules must be a list of (regex, budget) pairs, got {rules!r}")
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"rules[{i}] must be a (regex, budget) pair, got {rule!r}")
    pattern, budget = rule
    where = f"rules[{i}] ({pattern!r})"
    if not isinstance(pattern, str):
      raise ValueError(f"{where}: the regex must be a str, got {type(pattern).__name__}")
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{where}: bad regex: {e}") from None
    out.append(_Rule(i, pattern, regex, None if budget is None else _check_budget(budget, where)))
  return tuple(out)


def _check_skip(skip) -> tuple[re.Pattern, ...]:
  if isinstance(skip, str):
    skip = (skip,)
  out = []
  for i, pattern in enumerate(skip):
    if not isinstance(pattern, str):
      raise ValueError(f"skip[{i}] must be a regex str, got {pattern!r}")
    try:
      out.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"skip[{i}] ({pattern!r}): bad regex: {e}") from None
  return tuple(out)


def is_single_array(a) -> bool:
  """Whether ``a`` means one (batch of) matrix rather than a container of leaves."""
  if isinstance(a, (jax.Array, np.ndarray, np.generic)) or (
      hasattr(a, "shape") and hasattr(a, "dtype") and not is_compressed(a)):
    return True
  if isinstance(a, (list, tuple)):
    # A nested list of numbers is array-like (the single-matrix meaning).
    leaves = jax.tree_util.tree_leaves(a)
    return bool(leaves) and all(isinstance(x, numbers.Number) for x in leaves)
  return False


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What happens to each leaf: ``(path, width, max_error)`` or None (kept)."""

  paths: tuple[str, ...]
  jobs: tuple[tuple[int, float | None] | None, ...]
  treedef: Any


def plan(tree, *, rules, skip, min_dim, default: Budget | None,
         method_default: str = "signed_cut") -> tuple[Plan, list]:
  """Resolves rules for every leaf. Returns the plan and the flat leaves."""
  rules = _check_rules(rules)
  skips = _check_skip(skip)
  _checks.integer("min_dim", min_dim, minimum=1, error=ValueError)
  if default is None and not any(r.budget is not None for r in rules):
    raise ValueError(
        "decompose on a pytree needs a budget: pass rules=[(regex, Budget(...)), ...] "
        "and/or a default width / rate / bits_per_weight")
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_compressed)
  used = [False] * len(rules)
  paths, jobs = [], []
  for kp, leaf in flat:
    path = leaf_path(kp)
    paths.append(path)
    job = None
    if (_is_float(leaf) and leaf.ndim >= 2 and min(leaf.shape[-2:]) >= min_dim
        and not any(s.search(path) for s in skips)):
      budget = default
      for r in rules:
        if r.regex.search(path):
          used[r.index] = True
          budget = r.budget
          break
      if budget is not None and (budget.method or method_default) == "signed_cut":
        m, n = leaf.shape[-2:]
        try:
          _budget.resolve_width(m, n, width=budget.width, rate=budget.rate,
                                bits_per_weight=budget.bits_per_weight)
        except ValueError as e:
          raise ValueError(f"leaf {path!r} of shape {tuple(leaf.shape)}: {e}") from None
      job = budget
    jobs.append(job)
  unused = [f"rules[{r.index}] ({r.pattern!r})" for r in rules if not used[r.index]]
  if unused:
    warnings.warn("decompose: these rules selected no leaf (first match wins; leaves that are "
                  "skipped, non-float, 1-D or smaller than min_dim are never selected): "
                  + ", ".join(unused), UserWarning, stacklevel=5)
  return Plan(tuple(paths), tuple(jobs), treedef), [leaf for _, leaf in flat]


def _check_finite(leaf, path):
  _checks.finite_values(f"leaf {path!r} of shape {tuple(leaf.shape)}", leaf)


def decompose_tree(tree, *, key, default: Budget | None, backend: str, rules, skip,
                   min_dim, decompose_one, progress: bool = False, outliers="auto",
                   lowrank: int = 0, method_default: str = "signed_cut", options_default=None,
                   calibration=None):
  """Decomposes the leaves of ``tree`` selected by the rules (see module doc).

  ``calibration``: statistics matched to leaves by path (see
  :mod:`jax_signedcut._calibration.api`); selected leaves with statistics are
  compressed calibrated (eagerly, one at a time), the others as without.
  """
  p, leaves = plan(tree, rules=rules, skip=skip, min_dim=min_dim, default=default,
                   method_default=method_default)
  stats = {}
  if calibration is not None:
    from jax_signedcut._calibration import api as _cal_api  # noqa: PLC0415
    stats = _cal_api.match(calibration, p.paths).by_path
  for path, job, leaf in zip(p.paths, p.jobs, leaves):
    if job is not None:
      _check_finite(leaf, path)
  from jax_signedcut._signedcut import start as _start  # noqa: PLC0415
  key = _start.as_key(key)
  if key.shape != ():
    raise ValueError(f"key must be a single key (shape ()) for a pytree, got shape {key.shape}")
  todo = [i for i, j in enumerate(p.jobs) if j is not None]
  bar = None
  if progress:
    try:
      from tqdm.auto import tqdm  # noqa: PLC0415
      bar = tqdm(total=len(todo), desc="decompose", unit="leaf")
    except ImportError:  # tqdm is optional: no bar without it.
      bar = None
  out = list(leaves)
  for i in todo:
    b = p.jobs[i]
    if bar is not None:
      bar.set_postfix_str(f"{p.paths[i]} {tuple(leaves[i].shape)}")
    # With a bar, a big leaf also gets a bar of its own (cuts found so far).
    extra = {"progress_desc": p.paths[i]} if progress else {}
    method = method_default if b.method is None else b.method
    other = method != "signed_cut"
    rank = 0 if other else lowrank if b.lowrank is None else b.lowrank
    opts = options_default if b.method is None and b.options is None else b.options
    if p.paths[i] in stats:
      from jax_signedcut._calibration import api as _cal_api  # noqa: PLC0415
      h, layout = stats[p.paths[i]]
      try:
        f = _cal_api.compress_one(
            leaves[i], h, key=leaf_key(key, p.paths[i]), width=b.width, rate=b.rate,
            bits_per_weight=b.bits_per_weight, max_error=b.max_error,
            outliers=outliers if b.outliers is None else b.outliers,
            lowrank=rank, method=method, options=opts, path=p.paths[i], layout=layout)
      except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(f"leaf {p.paths[i]!r}") else
                         f"leaf {p.paths[i]!r} of shape {tuple(leaves[i].shape)}: {msg}") from None
      out[i] = f
      if bar is not None:
        bar.update(1)
      continue
    if opts and method == "signed_cut":
      if calibration is None:
        raise ValueError(f"leaf {p.paths[i]!r}: signed cuts take options only with "
                         f"calibration statistics (calibration=...), got options={dict(opts)!r}")
      opts = None   # calibration options; this leaf has no statistics: plain cuts
    try:
      f = decompose_one(leaves[i], key=leaf_key(key, p.paths[i]), width=b.width, rate=b.rate,
                        bits_per_weight=b.bits_per_weight, max_error=b.max_error,
                        outliers="auto" if other else
                        outliers if b.outliers is None else b.outliers,
                        backend=backend, lowrank=rank, method=method, options=opts,
                        **extra)
    except ValueError as e:
      if not rank and not other:
        raise
      # A rank or method the leaf's shape or budget cannot hold: say which leaf.
      raise ValueError(f"leaf {p.paths[i]!r} of shape {tuple(leaves[i].shape)}: {e}") from None
    if progress:
      # One leaf at a time: wait, so that only one leaf's working set is alive.
      f = jax.block_until_ready(f)
    out[i] = f
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return jax.tree_util.tree_unflatten(p.treedef, out)
