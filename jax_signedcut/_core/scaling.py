"""Exact power-of-two scaling, so that every finite float32 matrix gives finite factors.

The greedy sums |entries| over whole rows and columns (γ can reach m·n·max|A|)
and the ``max_error`` test squares them (‖A‖² can reach m·n·max|A|²), so a
matrix with entries near 1e19 already overflows ‖A‖² in float32 and one near
1e34 overflows γ; at the other end, float32 subnormals (|x| < 2⁻¹²⁶) are
flushed to zero by XLA on CPU, so a matrix of them looks like zeros.

The cure is exact: a matrix whose largest entry is outside
``[2^-SAFE_EXPONENT, 2^SAFE_EXPONENT)`` is multiplied by 2⁻ᵏ, with k = ⌊log₂
max|A|⌋ per matrix, before the greedy, and its scales c are multiplied by 2ᵏ
after. Multiplying by a power of two changes no bit of the mantissa, and the
greedy is equivariant under it (signs, ties and the order of every sum are the
same), so the factors are those of an ideal float32 with a wider exponent
range. Matrices inside the range (every ordinary weight matrix) are not
touched at all.

The arithmetic is done on the bit patterns (:func:`ldexp`), not by a float
multiply, because a multiply on CPU would read a subnormal input as zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Matrices with ⌊log₂ max|A|⌋ in ``[-SAFE_EXPONENT, SAFE_EXPONENT)`` are left as they
#: are: their ‖A‖² (≤ m·n·2⁶⁴) and γ (≤ m·n·2³²) stay far from the float32 limit for
#: any m·n < 2⁶⁴, and their squares far above the subnormals.
SAFE_EXPONENT = 32

_SIGN = 0x80000000
_MAG = 0x7FFFFFFF
_MANT = 0x007FFFFF
_MAX_FINITE = 0x7F7FFFFF


def _u32(x):
  return jnp.asarray(x, jnp.uint32)


def ldexp(x: jax.Array, e: jax.Array) -> jax.Array:
  """``x · 2^e`` for float32 ``x`` and int32 ``e`` (broadcast), by integer arithmetic.

  Exact when the result is a normal float32. A result below the normal range
  is flushed to a zero of the same sign (what XLA on CPU does with subnormal
  results anyway); one above it saturates at ±float32 max. Subnormal inputs
  are read as their true values; NaN and ±inf pass through unchanged.
  """
  x = jnp.asarray(x, jnp.float32)
  e = jnp.asarray(e, jnp.int32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  sign = bits & _u32(_SIGN)
  mag = bits & _u32(_MAG)
  field = jax.lax.shift_right_logical(mag, _u32(23)).astype(jnp.int32)
  mant = mag & _u32(_MANT)
  # A subnormal mant·2⁻¹⁴⁹ with its leading bit at position p is 1.f·2^(p−149):
  # shift the leading bit up to the implicit position and give it field p − 22.
  sub = field == 0
  p = 31 - jax.lax.clz(mant).astype(jnp.int32)
  shift = jnp.clip(23 - p, 0, 31).astype(jnp.uint32)
  mant = jnp.where(sub, jax.lax.shift_left(mant, shift) & _u32(_MANT), mant)
  field = jnp.where(sub, p - 22, field)
  new = field + e
  out = sign | jax.lax.shift_left(jnp.clip(new, 0, 254).astype(jnp.uint32), _u32(23)) | mant
  out = jnp.where((mag == 0) | (new <= 0), sign, out)
  out = jnp.where(new >= 255, sign | _u32(_MAX_FINITE), out)
  out = jnp.where(mag >= _u32(0x7F800000), bits, out)       # NaN / inf unchanged
  return jax.lax.bitcast_convert_type(out, jnp.float32)


def max_exponent(a: jax.Array, axes) -> jax.Array:
  """⌊log₂ max|a|⌋ over ``axes`` (int32), subnormals included; 0 for all-zero input.

  The maximum is taken over the bit patterns, which order like the magnitudes
  and do not flush subnormals.
  """
  mag = jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.float32), jnp.uint32) & _u32(_MAG)
  top = jnp.max(mag, axis=axes)
  field = jax.lax.shift_right_logical(top, _u32(23)).astype(jnp.int32)
  mant = top & _u32(_MANT)
  sub = (31 - jax.lax.clz(mant).astype(jnp.int32)) - 149
  return jnp.where(top == 0, 0, jnp.where(field == 0, sub, field - 127))


def exponent(a: jax.Array, axes=(-2, -1)) -> jax.Array:
  """The k each matrix of ``a`` is scaled by 2⁻ᵏ with: 0 inside the safe range.

  Non-finite matrices get 0 (they are reported, not scaled).
  """
  e = max_exponent(a, axes)
  safe = (e >= -SAFE_EXPONENT) & (e < SAFE_EXPONENT)
  return jnp.where(safe | (e >= 128), 0, e).astype(jnp.int32)


def host_exponent(x) -> int:
  """:func:`exponent` of one finite host (numpy) matrix, without a temporary copy."""
  import numpy as np  # noqa: PLC0415

  top = max(float(np.max(x)), -float(np.min(x)))
  if top == 0 or not np.isfinite(top):
    return 0
  e = int(np.frexp(np.float32(top))[1]) - 1
  return 0 if -SAFE_EXPONENT <= e < SAFE_EXPONENT else e
