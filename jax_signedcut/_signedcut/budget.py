"""Width from a storage budget (docs/method.md, "Choosing the width"; the accounting: docs/contract.md, "Budgets").

A cut costs ``4 + ceil(m/64)*8 + ceil(n/64)*8`` bytes in the reference
pipeline's accounting (one f32 scale and the two sign vectors in 64-bit
words). Our uint32 packing never needs more than that, so a width from these
functions always fits the budget.

Unlike the reference pipeline we do not raise the result to at least 8 cuts:
that floor only matters for tiny budgets, and there it would silently spend
more than the caller asked for. A budget that cannot pay for one cut is an
error instead.
"""

from __future__ import annotations

import math

from jax_signedcut._core import checks as _checks


def bytes_per_cut(m: int, n: int) -> int:
  """Budget bytes charged for one cut of an m×n matrix."""
  return 4 + math.ceil(m / 64) * 8 + math.ceil(n / 64) * 8


def bytes_per_stored_cut(m: int, n: int) -> int:
  """Bytes one cut of an m×n matrix takes as stored: its uint32 sign words and an f32 scale."""
  return 4 * (math.ceil(m / 32) + math.ceil(n / 32)) + 4


def _check_dims(m, n):
  for name, v in (("m", m), ("n", n)):
    _checks.integer(name, v, minimum=1, error=ValueError)


def _check_positive(name, v):
  _checks.real(name, v)


def _width_for_bytes(m, n, budget_bytes, what):
  w = math.floor(budget_bytes / bytes_per_cut(m, n))
  if w < 1:
    raise ValueError(
        f"{what} gives width {w} for a matrix of shape {(m, n)}: the budget of "
        f"{budget_bytes:g} bytes does not pay for one cut ({bytes_per_cut(m, n)} bytes)")
  return w


def width_for_rate(m: int, n: int, rate: float) -> int:
  """Number of cuts whose storage is ``rate`` times the bf16 footprint ``2*m*n`` bytes.

  Args:
    m: rows.
    n: columns.
    rate: fraction of the bf16 size, > 0.

  Returns:
    ``floor(rate * 2*m*n / (4 + ceil(m/64)*8 + ceil(n/64)*8))``.

  Raises:
    ValueError: if an argument is not positive or the budget pays for no cut.

  Example:
    >>> width_for_rate(4096, 4096, 0.5)
    16320
    >>> width_for_rate(14336, 4096, 0.5)
    25442
  """
  _check_dims(m, n)
  _check_positive("rate", rate)
  return _width_for_bytes(m, n, rate * 2 * m * n, f"rate={rate!r}")


def width_for_bits(m: int, n: int, bits_per_weight: float) -> int:
  """Number of cuts whose storage is ``bits_per_weight`` bits per matrix entry.

  Example:
    >>> width_for_bits(4096, 4096, 8)
    16320
  """
  _check_dims(m, n)
  _check_positive("bits_per_weight", bits_per_weight)
  return _width_for_bytes(m, n, bits_per_weight * m * n / 8,
                          f"bits_per_weight={bits_per_weight!r}")


def resolve_width(m: int, n: int, *, width=None, rate=None, bits_per_weight=None) -> int:
  """The width from exactly one of width / rate / bits_per_weight."""
  given = [k for k, v in (("width", width), ("rate", rate),
                          ("bits_per_weight", bits_per_weight)) if v is not None]
  if len(given) != 1:
    raise ValueError(
        "exactly one of width, rate, bits_per_weight must be given, got "
        + ("none" if not given else ", ".join(f"{k}={v!r}" for k, v in
                                              (("width", width), ("rate", rate),
                                               ("bits_per_weight", bits_per_weight))
                                              if v is not None))
        + " (to stop at a target error, pass max_error together with one of them as the cap)")
  if width is not None:
    return _checks.integer("width", width, minimum=1)
  if rate is not None:
    return width_for_rate(m, n, rate)
  return width_for_bits(m, n, bits_per_weight)
