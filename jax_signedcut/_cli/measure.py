"""Relative errors ‖A − Â‖_F / ‖A‖_F of compressed leaves, at the memory of one matrix."""

from __future__ import annotations

import math

import numpy as np

from jax_signedcut._parts.sparse import Sparse
from jax_signedcut._signedcut import factors as _factors


def sum_squares(a: np.ndarray) -> float:
  """Σ a² in float64, in chunks so that the float64 copy stays small."""
  flat = np.asarray(a).reshape(-1)
  step = 1 << 22
  return float(sum(np.sum(np.square(flat[i:i + step], dtype=np.float64))
                   for i in range(0, flat.size, step)))


def estimate(a2: float, f) -> float | None:
  """The error of cuts (and sparse entries) from the greedy's bookkeeping, else None.

  Each cut is the projection of the remainder on s tᵀ, so ‖R_k‖² =
  ‖A − sparse‖² − m·n·Σ c_j²; the sparse entries are exact copies of entries
  of A. Other parts (a low-rank part) and other methods need :func:`exact`.
  """
  try:
    cuts, others = _factors.split_cuts(f)
  except TypeError:
    return None
  if any(not isinstance(p, Sparse) for p in others):
    return None
  m, n = cuts.shape
  sp2 = sum(float(np.sum(np.square(np.asarray(p.val, np.float64)))) for p in others)
  c2 = float(np.sum(np.square(np.asarray(cuts.c, np.float64))))
  r2 = max(0.0, a2 - sp2 - m * n * c2)
  return math.sqrt(r2 / a2) if a2 > 0 else 0.0


def exact(a2: float, a, f) -> float:
  """The error by reconstruction (one matrix, or one batch, at a time)."""
  r = np.asarray(a, np.float32) - np.asarray(f.reconstruct())
  r2 = sum_squares(r)
  return math.sqrt(r2 / a2) if a2 > 0 else math.sqrt(r2)
