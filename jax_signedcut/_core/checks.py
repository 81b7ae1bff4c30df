"""Argument checks shared by every public entry point.

Each check returns the value in its canonical form (a Python ``int`` or
``float``, a typed key, an array) or raises ``TypeError`` (wrong kind of
value) or ``ValueError`` (right kind, bad value) with a message that names the
argument and quotes what was given. The ``name`` argument is what the message
calls the value ("width", "leaf 'w' of shape (4, 4)", "rules[0] ('.*'): width").
"""

from __future__ import annotations

import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

#: The float dtypes a matrix to compress may have (all are computed in float32).
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)
#: The largest count an int32 field (``num_cuts``, a width) can hold.
INT32_MAX = 2**31 - 1


def is_integer(v) -> bool:
  """Whether ``v`` is an integer (Python or numpy), bools excluded."""
  return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def integer(name: str, v, *, minimum: int | None = None, maximum: int | None = None,
            error=TypeError) -> int:
  """``v`` as an int in ``[minimum, maximum]``.

  Args:
    name: what the message calls ``v``.
    v: the value; a Python or numpy integer (not a bool).
    minimum, maximum: inclusive bounds, or None.
    error: the exception for a value that is not an integer (``TypeError``
      by default; some callers keep a historical ``ValueError``).

  Raises:
    TypeError (or ``error``): ``v`` is not an integer. ValueError: out of range.
  """
  if minimum is not None and maximum is not None:
    bounds = f" in {minimum}..{maximum}"
  elif minimum is not None:
    bounds = f" >= {minimum}"
  elif maximum is not None:
    bounds = f" <= {maximum}"
  else:
    bounds = ""
  if not is_integer(v):
    raise error(f"{name} must be an int{bounds}, got {v!r} of type {type(v).__name__}")
  v = int(v)
  if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
    raise ValueError(f"{name} must be an int{bounds}, got {v}")
  return v


def real(name: str, v, *, positive: bool = True, allow_zero: bool = False) -> float:
  """``v`` as a finite float (> 0 when ``positive``; ≥ 0 with ``allow_zero``).

  Raises:
    ValueError: ``v`` is not a real number, not finite or not positive.
  """
  ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) \
      and math.isfinite(v)
  if ok and positive:
    ok = v >= 0 if allow_zero else v > 0
  if not ok:
    what = "a finite number" + ((" >= 0" if allow_zero else " > 0") if positive else "")
    raise ValueError(f"{name} must be {what}, got {v!r}")
  return float(v)


def budget_bits(rate, bits_per_weight, *, needs: str) -> float:
  """The bits per weight of a budget given as exactly one of ``rate`` (× 16) or
  ``bits_per_weight``; else a ValueError that starts with ``needs`` (who needs it)."""
  given = [(k, v) for k, v in (("rate", rate), ("bits_per_weight", bits_per_weight))
           if v is not None]
  if len(given) != 1:
    raise ValueError(f"{needs} exactly one of rate, bits_per_weight, got "
                     f"rate={rate!r}, bits_per_weight={bits_per_weight!r}")
  k, v = given[0]
  real(k, v)
  return float(v) * 16 if k == "rate" else float(v)


def as_array(name: str, a):
  """``a`` itself if it is an array, else ``np.asarray(a)`` with a message naming ``name``.

  Raises:
    ValueError: a ragged nested list, or anything numpy cannot make a numeric array of.
    TypeError: a Python scalar or a string (not a matrix).
  """
  if hasattr(a, "dtype") and hasattr(a, "shape"):
    return a
  if isinstance(a, (str, bytes)) or a is None:
    raise TypeError(f"{name} must be an array of shape (..., m, n), got {type(a).__name__} "
                    f"{a!r:.40}")
  try:
    out = np.asarray(a)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name} must be a rectangular array of numbers (a nested list whose "
                     f"rows all have the same length), got a {type(a).__name__} that numpy "
                     f"cannot make an array of: {e}") from None
  if out.dtype == object:
    raise ValueError(f"{name} must be a rectangular array of numbers, got a "
                     f"{type(a).__name__} of mixed or ragged entries")
  return out


def float_matrix(name: str, a, *, check_finite: bool = True):
  """``a`` as an array (..., m, n) of a float dtype, non-empty and (eagerly) finite.

  Raises:
    TypeError: not a float dtype. ValueError: ndim < 2, an empty dim, ragged
      input, or NaN/Inf entries (checked only when ``a`` is concrete).
  """
  a = as_array(name, a)
  dtype = jnp.dtype(a.dtype)
  if not any(dtype == jnp.dtype(d) for d in FLOAT_DTYPES):
    raise TypeError(
        f"{name} must be a float32, bfloat16, float16 or float64 array, got dtype {dtype}")
  if a.ndim < 2:
    raise ValueError(f"{name} must have shape (..., m, n) with ndim >= 2, got shape "
                     f"{tuple(a.shape)}")
  if any(d == 0 for d in a.shape):
    raise ValueError(f"{name} must not be empty, got shape {tuple(a.shape)}")
  if check_finite:
    finite_values(name, a)
  return a


def finite_values(name: str, a) -> None:
  """Raises ValueError naming ``name`` and one bad index if concrete ``a`` has NaN/Inf."""
  if isinstance(a, jax.core.Tracer):
    return
  if isinstance(a, jax.Array):
    if bool(_all_finite(a)):   # one reduction, no full-size mask on the host
      return
    finite = np.asarray(jnp.isfinite(a))
  else:
    finite = np.isfinite(np.asarray(a, dtype=np.float32))
  if not finite.all():
    bad = tuple(int(i) for i in np.argwhere(~finite)[0])
    value = np.asarray(np.asarray(a)[bad] if not isinstance(a, jax.Array) else a[bad],
                       dtype=np.float32)
    where = f"{name}[{', '.join(map(str, bad))}] = {value}" if name.isidentifier() \
        else f"at index {bad}: {value}"
    raise ValueError(f"{name} has {int((~finite).sum())} non-finite entries (NaN/Inf), e.g. "
                     f"{where}")


@jax.jit
def _all_finite(a):
  return jnp.all(jnp.isfinite(a))


def key(name: str, k) -> jax.Array:
  """A typed PRNG key array from a typed key or a raw uint32 (..., 2) key.

  Raises:
    TypeError: anything else, naming ``name``.
  """
  if k is None or isinstance(k, (bool, numbers.Number, str, bytes)):
    raise TypeError(f"{name} must be a jax.random.key (or a raw uint32 PRNGKey of shape "
                    f"(..., 2)), got {type(k).__name__} {k!r:.40}")
  if not isinstance(k, jax.Array):
    try:
      k = jnp.asarray(k)
    except (TypeError, ValueError):
      raise TypeError(f"{name} must be a jax.random.key, got {type(k).__name__}") from None
  if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
    return k
  if k.dtype == jnp.uint32 and k.ndim >= 1 and k.shape[-1] == 2:
    return jax.random.wrap_key_data(k)
  raise TypeError(
      f"{name} must be a jax.random.key (or a raw uint32 PRNGKey of shape (..., 2)), "
      f"got dtype {k.dtype} and shape {tuple(k.shape)}")


def _memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def allocation(name: str, value, nbytes: int, what: str) -> None:
  """Raises ValueError before allocating ``nbytes`` for ``what`` if no machine could.

  The bound is this machine's physical memory: a request past it could only
  fail later, after allocating what it could, with an error naming no argument.
  """
  limit = _memory_bytes()
  if limit is not None and nbytes > limit:
    raise ValueError(f"{name}={value!r} needs {nbytes:,} bytes ({nbytes / 2**30:.1f} GiB) for "
                     f"{what}, more than this machine's {limit / 2**30:.1f} GiB of memory")
