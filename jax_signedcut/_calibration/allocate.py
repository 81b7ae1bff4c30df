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
