"""Uniform B-bit quantizers, packed integer codes and round-to-nearest (RTN).

One quantizer serves every method here: ``L`` evenly spaced levels on
``[-scale, scale]``,

    level_k = -scale + k · step,   step = 2·scale / (L - 1),   k = 0 … L-1,

with two grids:

* ``grid="uniform"``: ``L = 2**bits`` levels (every code is used; no exact 0
  level). This is the quantizer analysed in the LPLR paper; with 1 bit it is
  ``±scale``.
* ``grid="int"``: ``L = 2**bits - 1`` levels, i.e. the symmetric integers
  ``-(2**(bits-1) - 1) … 2**(bits-1) - 1`` times ``scale / (2**(bits-1) - 1)``:
  the usual "int-b absmax" rounding (int8: ±127). It contains 0 and needs
  ``bits >= 2``. The per-row int-b figures in docs/figures.md use this grid.

Rounding is to the nearest level (error ≤ step/2 inside ``[-scale, scale]``;
values outside are clipped) or, with a ``key``, *dithered*: stochastic
rounding to one of the two neighbouring levels with the probabilities that make
it unbiased, ``E[Q(x)] = x`` for ``x`` in ``[-scale, scale]`` (error < step).

Codes are stored as unsigned ``k`` packed densely per row: code ``i`` of a row
occupies bits ``[i·bits, (i+1)·bits)`` of the row's bit stream, bit ``j`` of
the stream is bit ``j % 32`` of word ``j // 32`` (the sign packing's
convention), unused tail bits are 0. A row of ``c`` codes takes
``ceil(c·bits / 32)`` uint32 words, so at most 31 bits per row are padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._methods import registry as _registry
from jax_signedcut._core import protocol as _protocol
from jax_signedcut._core.protocol import Compressed
from jax_signedcut._signedcut.decompose import _check_matrix

GRIDS = ("uniform", "int")
MAX_BITS = 16


def check_bits(bits, name="bits", *, grid="uniform", allow_float=False):
  """Validates a code width; returns it as int. ``allow_float`` also admits 32 (no quantization)."""
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {bits!r} of type {type(bits).__name__}")
  lo = 2 if grid == "int" else 1
  if allow_float and bits == 32:
    return 32
  if not lo <= bits <= MAX_BITS:
    extra = " (or 32 for unquantized float32)" if allow_float else ""
    why = " (the symmetric int grid has 2**bits - 1 levels)" if grid == "int" else ""
    raise ValueError(f"{name} must be in {lo}..{MAX_BITS}{extra}{why}, got {bits}")
  return int(bits)


def check_grid(grid):
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
  return grid


def num_levels(bits: int, grid: str = "uniform") -> int:
  """Number of quantization levels of a ``bits``-bit code on ``grid``."""
  return 2**bits if grid == "uniform" else 2**bits - 1


def code_words(count: int, bits: int) -> int:
  """uint32 words holding ``count`` codes of ``bits`` bits, densely packed."""
  return -(-count * bits // 32)


def _step(scale, levels):
  return 2 * scale / (levels - 1)


def quantize(x: jax.Array, scale: jax.Array, *, bits: int, grid: str = "uniform",
             key: jax.Array | None = None) -> jax.Array:
  """Codes of the uniform ``bits``-bit quantizer on ``[-scale, scale]``.

  Args:
    x: float array.
    scale: float array broadcastable to ``x``, ≥ 0 (a zero scale quantizes
      everything to 0).
    bits: code width, 1..16 (2..16 on the ``"int"`` grid).
    grid: ``"uniform"`` (2**bits levels) or ``"int"`` (2**bits - 1 levels,
      symmetric around 0).
    key: if given, dithered (unbiased stochastic) rounding with randomness from
      this key; otherwise round to nearest.

  Returns:
    uint32 codes in ``0 … num_levels - 1``, shape of ``x`` broadcast with ``scale``.

  Example:
    >>> import jax.numpy as jnp
    >>> quantize(jnp.array([-1.0, -0.2, 0.3, 1.0]), jnp.float32(1.0), bits=2)
    Array([0, 1, 2, 3], dtype=uint32)
  """
  bits = check_bits(bits, grid=check_grid(grid))
  levels = num_levels(bits, grid)
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  # Explicit broadcasting keeps this usable under jax_numpy_rank_promotion="raise".
  x, scale = jnp.broadcast_arrays(x, jnp.asarray(scale, dtype))
  step = _step(scale, levels)
  safe = jnp.where(step > 0, step, 1)
  # Centred code space, so that 0 is exact on the int grid; a zero scale maps
  # to the middle code, which decodes to 0 on either grid.
  t = jnp.where(step > 0, x / safe, 0) + (levels - 1) / 2
  if key is None:
    k = jnp.round(t)
  else:
    k = jnp.floor(t + jax.random.uniform(key, t.shape, dtype))
  return jnp.clip(k, 0, levels - 1).astype(jnp.uint32)


def dequantize(codes: jax.Array, scale: jax.Array, *, bits: int, grid: str = "uniform",
               dtype=jnp.float32) -> jax.Array:
  """Values ``-scale + codes·step`` of codes from :func:`quantize`."""
  bits = check_bits(bits, grid=check_grid(grid))
  levels = num_levels(bits, grid)
  codes, scale = jnp.broadcast_arrays(codes, jnp.asarray(scale, dtype))
  return ((codes.astype(dtype) - (levels - 1) / 2) * _step(scale, levels)).astype(dtype)


def _lanes(n, ndim, scale=1):
  """uint32 [0, n)·scale shaped (1, …, 1, n) for ``ndim`` dims (no implicit rank promotion)."""
  return (jnp.arange(n, dtype=jnp.uint32) * jnp.uint32(scale)).reshape((1,) * (ndim - 1) + (n,))


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """Packs uint32 codes (..., c) < 2**bits into words (..., ceil(c·bits/32)), see module doc."""
  c = codes.shape[-1]
  nw = code_words(c, bits)
  lead = codes.shape[:-1]
  codes = codes.astype(jnp.uint32)
  if 32 % bits == 0:
    per = 32 // bits
    codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, nw * per - c)])
    shifts = _lanes(per, len(lead) + 2, bits)
    return jnp.sum(codes.reshape(*lead, nw, per) << shifts, axis=-1, dtype=jnp.uint32)
  # General widths: spell out the bit stream (codes may straddle words).
  stream = (codes[..., None] >> _lanes(bits, codes.ndim + 1)) & jnp.uint32(1)
  stream = stream.astype(jnp.uint8).reshape(*lead, c * bits)
  stream = jnp.pad(stream, [(0, 0)] * len(lead) + [(0, nw * 32 - c * bits)])
  stream = stream.reshape(*lead, nw, 32).astype(jnp.uint32)
  return jnp.sum(stream << _lanes(32, len(lead) + 2), axis=-1, dtype=jnp.uint32)


def unpack_codes(words: jax.Array, count: int, bits: int) -> jax.Array:
  """Inverse of :func:`pack_codes`: uint32 codes (..., count)."""
  lead = words.shape[:-1]
  mask = jnp.uint32((1 << bits) - 1)
  if 32 % bits == 0:
    per = 32 // bits
    codes = (words[..., :, None] >> _lanes(per, words.ndim + 1, bits)) & mask
    return codes.reshape(*lead, words.shape[-1] * per)[..., :count]
  stream = (words[..., :, None] >> _lanes(32, words.ndim + 1)) & jnp.uint32(1)
  stream = stream.reshape(*lead, words.shape[-1] * 32)[..., :count * bits]
  stream = stream.reshape(*lead, count, bits)
  return jnp.sum(stream << _lanes(bits, len(lead) + 2), axis=-1, dtype=jnp.uint32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix(Compressed):
  """Uniformly quantized matrices (..., r, c): packed codes and their scales.

  Attributes:
    codes: uint32 (..., r, ceil(c·bits/32)): each row's codes, densely packed.
    scale: float32 (..., r or 1, G or 1): absmax scales. ``(..., 1, 1)`` is
      one scale per matrix, ``(..., r, 1)`` one per row, ``(..., r, G)`` one
      per group of ``group_size`` consecutive columns of a row (the last group
      may be shorter).
    shape: static (r, c).
    bits: static code width.
    grid: static ``"uniform"`` or ``"int"`` (see the module doc).
    group_size: static columns per scale group, or None (one group per row).
  """

  codes: jax.Array
  scale: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))
  grid: str = dataclasses.field(metadata=dict(static=True))
  group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:-2])

  def check(self, name: str = "f") -> QuantizedMatrix:
    """That the static fields are valid and the codes and scales fit ``shape`` and each other.

    Raises:
      TypeError / ValueError: naming ``name`` and the field.
    """
    shape = _protocol.check_shape(name, self.shape)
    if len(shape) != 2:
      raise ValueError(f"{name}.shape must be (r, c), got {self.shape!r}")
    r, c = shape
    try:
      check_bits(self.bits, grid=check_grid(self.grid))
    except (TypeError, ValueError) as e:
      raise type(e)(f"{name}: {e}") from None
    gs = self.group_size
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, (int, np.integer))
                           or gs < 1):
      raise ValueError(f"{name}.group_size must be None or an int >= 1, got {gs!r}")
    codes = self.codes
    if not hasattr(codes, "shape") or codes.ndim < 2:
      raise ValueError(f"{name}.codes must have shape (..., {r}, words), got "
                       f"{getattr(codes, 'shape', codes)!r}")
    batch = tuple(codes.shape[:-2])
    _protocol.check_field(name, "codes", codes, batch + (r, code_words(c, self.bits)), "uint32")
    groups = 1 if gs is None else -(-c // int(gs))
    scale = self.scale
    if not hasattr(scale, "shape") or tuple(scale.shape) not in (
        batch + (r, groups), batch + (1, groups)) or (gs is not None and r > 1
                                                      and scale.shape[-2] == 1):
      raise ValueError(f"{name}.scale must have shape {batch} + ({r} or 1, {groups}), got "
                       f"{getattr(scale, 'shape', scale)!r}")
    _protocol.check_field(name, "scale", scale, tuple(scale.shape), "float")
    return self

  def stored_bytes(self):
    """Bytes stored per matrix: the code words and the f32 scales (static)."""
    b = self.batch_shape
    per = 4 * (math.prod(self.codes.shape[len(b):]) + math.prod(self.scale.shape[len(b):]))
    return np.full(b, per, np.int64)

  def _dense(self):
    return _dequantize(self)

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per matrix entry, scales included."""
    r, c = self.shape
    return 8 * self.nbytes / (math.prod(self.batch_shape) * r * c)


def _absmax(a, mode, group_size):
  """Absmax scales of a (..., r, c) for mode "global" | "row" | "group"."""
  r, c = a.shape[-2:]
  x = jnp.abs(a)
  if mode == "global":
    return jnp.max(x, axis=(-2, -1), keepdims=True)
  if mode == "row":
    return jnp.max(x, axis=-1, keepdims=True)
  g = -(-c // group_size)
  x = jnp.pad(x, [(0, 0)] * (a.ndim - 1) + [(0, g * group_size - c)])
  return jnp.max(x.reshape(*a.shape[:-1], g, group_size), axis=-1)


def _expand_scale(scale, shape, group_size):
  _, c = shape
  if group_size is not None:
    scale = jnp.repeat(scale, group_size, axis=-1, total_repeat_length=scale.shape[-1] * group_size)
    scale = scale[..., :c]
  return scale


def quantize_matrix(a: jax.Array, *, bits: int, grid: str = "uniform", mode: str = "row",
                    group_size: int | None = None, key: jax.Array | None = None
                    ) -> QuantizedMatrix:
  """Quantizes float matrices (..., r, c) with absmax scales; no argument checks (internal).

  Args:
    a: float (..., r, c).
    bits, grid, key: see :func:`quantize`.
    mode: ``"global"`` (one scale per matrix), ``"row"`` or ``"group"``.
    group_size: columns per group for ``mode="group"``.
  """
  a = jnp.asarray(a)
  a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
  r, c = a.shape[-2:]
  scale = _absmax(a, mode, group_size).astype(jnp.float32)
  gs = group_size if mode == "group" else None
  codes = quantize(a, _expand_scale(scale, (r, c), gs), bits=bits, grid=grid, key=key)
  return QuantizedMatrix(codes=pack_codes(codes, bits), scale=scale, shape=(r, c), bits=bits,
                         grid=grid, group_size=gs)


def dequantize_matrix(q: QuantizedMatrix, dtype=jnp.float32) -> jax.Array:
  """Dense matrices (..., r, c) of a :class:`QuantizedMatrix`.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[3.0, -1.2, 0.0], [6.0, 2.5, -6.0]])
    >>> dequantize_matrix(rtn(a, bits=3))  # levels: ±3 steps of absmax/3 per row
    Array([[ 3., -1.,  0.],
           [ 6.,  2., -6.]], dtype=float32)
  """
  if not isinstance(q, QuantizedMatrix):
    raise TypeError(f"q must be a QuantizedMatrix, got {type(q).__name__}")
  return _dequantize_matrix(q, jnp.dtype(dtype))


def _dequantize(q):
  _, c = q.shape
  codes = unpack_codes(q.codes, c, q.bits)
  scale = _expand_scale(q.scale, q.shape, q.group_size)
  return dequantize(codes, scale, bits=q.bits, grid=q.grid, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnums=1)   # one dispatch instead of one per op when eager
def _dequantize_matrix(q, dtype):
  return _dequantize(q).astype(dtype)


def _check_group_size(group_size):
  if group_size is None:
    return None
  if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) \
      or group_size < 1:
    raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
  return int(group_size)


def rtn(a: jax.Array, *, bits: int, group_size: int | None = None, grid: str = "int",
        key: jax.Array | None = None) -> QuantizedMatrix:
  """Round-to-nearest ``bits``-bit quantization of matrices with absmax scales.

  Args:
    a: float array (..., m, n); float32/bfloat16/float16/float64, finite.
      Leading dims are a batch.
    bits: code width, 2..16 on the default ``"int"`` grid, 1..16 on ``"uniform"``.
    group_size: None for one f32 scale per row, or the number of consecutive
      columns sharing a scale (e.g. 64).
    grid: ``"int"`` (symmetric int-b, ±(2**(bits-1)-1), the common baseline) or
      ``"uniform"`` (2**bits levels spanning ±absmax; better at 2–3 bits).
    key: optional key for dithered (unbiased stochastic) rounding instead.

  Returns:
    A :class:`QuantizedMatrix`; ``dequantize_matrix`` gives the dense result,
    ``.nbytes`` the exact storage (``rtn_bits_per_weight`` predicts it).

  Raises:
    TypeError: non-float ``a`` or non-int ``bits``.
    ValueError: bad shape, NaN/Inf entries (eager only), bits or group_size out of range.

  Example:
    >>> import jax
    >>> a = jax.random.normal(jax.random.key(0), (64, 96))
    >>> q = rtn(a, bits=4, group_size=64)
    >>> q.codes.shape, q.scale.shape, q.nbytes
    ((64, 12), (64, 2), 3584)
    >>> rtn_bits_per_weight(64, 96, 4, group_size=64)
    4.666666666666667
  """
  a = _check_matrix(a)
  grid = check_grid(grid)
  bits = check_bits(bits, grid=grid)
  group_size = _check_group_size(group_size)
  mode = "row" if group_size is None else "group"
  return _rtn(jnp.asarray(a), key, bits=bits, grid=grid, mode=mode, group_size=group_size)


@functools.partial(jax.jit, static_argnames=("bits", "grid", "mode", "group_size"))
def _rtn(a, key, *, bits, grid, mode, group_size):
  return quantize_matrix(a.astype(jnp.float32), bits=bits, grid=grid, mode=mode,
                         group_size=group_size, key=key)


def rtn_bits_per_weight(m: int, n: int, bits: int, group_size: int | None = None) -> float:
  """Exact stored bits per weight of :func:`rtn` on an m×n matrix (codes, padding, f32 scales)."""
  groups = 1 if group_size is None else -(-n // group_size)
  return 32 * m * (code_words(n, bits) + groups) / (m * n)


def _compress(a, *, key, bits_per_weight, group_size=None, grid="int"):
  """The ``"rtn"`` method: the widest code whose stored bits per weight fit the budget."""
  del key   # deterministic rounding
  m, n = a.shape[-2:]
  grid = check_grid(grid)
  group_size = _check_group_size(group_size)
  lo = 2 if grid == "int" else 1
  fits = [b for b in range(lo, MAX_BITS + 1)
          if rtn_bits_per_weight(m, n, b, group_size) <= bits_per_weight]
  if not fits:
    raise ValueError(
        f"bits_per_weight={bits_per_weight:g} pays for no {grid}-grid RTN code on shape "
        f"{(m, n)}: {lo} bits with their f32 scales take "
        f"{rtn_bits_per_weight(m, n, lo, group_size):.4g} bits per weight")
  return rtn(a, bits=max(fits), group_size=group_size, grid=grid)


_registry.register(_registry.Method(
    "rtn", _compress, {"group_size": None, "grid": "int"},
    "round to nearest int-b with absmax f32 scales per row (or per group): b is the widest "
    "that fits with its scales"))
