"""GPTQ: int-b rounding of a kernel, one input at a time, each error pushed onto the inputs left.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, arXiv 2210.17323) minimises the
same output error ``tr(Eᵀ H E)`` as the calibrated cuts. It rounds the weights
of input i (a column of the torch-layout weight (out, in)) and corrects the
inputs not yet rounded for the error just made, with the optimal update under
H: with ``H⁻¹ = Uᵀ U`` (U upper triangular, the Cholesky factor of the
inverse),

    err = (W[:, i] − Q(W[:, i])) / U_ii,    W[:, i:] −= err ⊗ U[i, i:]

(after which column i equals its rounded value). Scales are absmax per output
row (from the original weights) or per group of ``group_size`` consecutive
inputs (from the weights as updated when the group starts), on the
library's uniform quantizer (``sc.quantize``, grid ``"int"`` or
``"uniform"``). Dead inputs (``H_ii = 0``) get weight 0 and are not used to
correct others; the damping ``damp · mean(diag H)`` keeps H invertible.

The result is a ``sc.QuantizedMatrix`` of the torch-layout (out, in) weight,
wrapped as :class:`~jax_signedcut._calibration.parts.Transposed` so that it
reads as the (in, out) Flax kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jax_signedcut as sc
from jax_signedcut._calibration.parts import Transposed

_HI = jax.lax.Precision.HIGHEST


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """uint32 codes (r, c) → words (r, ceil(c·bits/32)): code i at bits [i·bits, (i+1)·bits) of the row."""
  r, c = codes.shape
  nw = -(-c * bits // 32)
  stream = ((codes[:, :, None].astype(np.uint64) >> np.arange(bits, dtype=np.uint64)) & 1)
  stream = stream.reshape(r, c * bits).astype(np.uint64)
  stream = np.pad(stream, ((0, 0), (0, nw * 32 - c * bits))).reshape(r, nw, 32)
  words = np.sum(stream << np.arange(32, dtype=np.uint64), axis=-1)
  return words.astype(np.uint32)


@functools.partial(jax.jit, static_argnames=("bits", "grid", "group_size"))
def _gptq(w_t, h, *, bits, grid, group_size, damp):
  out, fan_in = w_t.shape
  dg = jnp.diagonal(h)
  dead = dg <= 0
  h = jnp.where(dead[:, None] | dead[None, :], 0.0, h) + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w_t = jnp.where(dead[None, :], 0.0, w_t)
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(fan_in, dtype=h.dtype)
  h_inv = jnp.linalg.inv(h)
  h_inv = (h_inv + h_inv.T) / 2
  u = jnp.linalg.cholesky(h_inv).T                               # H⁻¹ = Uᵀ U, U upper
  g = fan_in if group_size is None else group_size
  n_groups = -(-fan_in // g)
  pad = n_groups * g - fan_in
  row_scale = jnp.max(jnp.abs(w_t), axis=1)

  def body(i, st):
    w, scales = st
    if group_size is None:
      scale = row_scale
    else:
      start = (i // g) * g
      wp = jnp.pad(w, ((0, 0), (0, pad)))
      fresh = jnp.max(jnp.abs(jax.lax.dynamic_slice_in_dim(wp, start, g, axis=1)), axis=1)
      scale = jnp.where(i % g == 0, fresh, scales[:, i // g])
      scales = scales.at[:, i // g].set(scale)
    col = w[:, i]
    q = sc.dequantize(sc.quantize(col, scale, bits=bits, grid=grid), scale, bits=bits, grid=grid)
    err = (col - q) / u[i, i]
    w = w - jnp.outer(err, u[i])
    w = w.at[:, i].set(q)                                       # exact, whatever the rounding
    return w, scales

  scales0 = jnp.zeros((out, n_groups), jnp.float32)
  w_q, scales = jax.lax.fori_loop(0, fan_in, body, (w_t.astype(jnp.float32), scales0))
  if group_size is None:
    scales = row_scale[:, None]
  return w_q, scales


def gptq(w: jax.Array, h: jax.Array, *, bits: int, group_size: int | None = None,
         grid: str = "int", damp: float = 0.01) -> Transposed:
  """GPTQ int-b quantization of a Flax kernel ``w`` (in, out) under input second moment ``h``.

  Args:
    w: float (in, out) kernel (``y = x w``).
    h: float (in, in) input second moment, symmetric PSD.
    bits: code width (2..8 on ``"int"``, 1..8 on ``"uniform"``).
    group_size: None for one absmax scale per output channel, or the number of
      consecutive inputs per scale.
    grid: ``"int"`` (symmetric, ±(2^(b−1) − 1) steps) or ``"uniform"`` (2^b levels).
    damp: relative damping of H (GPTQ's percdamp), >= 0.

  Returns:
    :class:`Transposed` of a ``sc.QuantizedMatrix`` (out, in); its
    ``reconstruct()`` is the dense (in, out) kernel, ``nbytes`` the codes and
    scales (``sc.rtn_bits_per_weight(out, in, bits, group_size)`` bits per weight).

  Raises:
    ValueError: mismatched shapes, bad bits / grid / group_size / damp.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))
    >>> q = gptq(w, x.T @ x / 256, bits=4)
    >>> q.shape, q.reconstruct().shape
    ((16, 8), (16, 8))
  """
  w = jnp.asarray(w, jnp.float32)
  h = jnp.asarray(h, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"w must be a kernel (in, out), got shape {w.shape}")
  if h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"h must have shape {(w.shape[0],) * 2} for w of shape {w.shape} "
                     f"(in, out), got {h.shape}")
  if grid not in ("int", "uniform"):
    raise ValueError(f"grid must be 'int' or 'uniform', got {grid!r}")
  lo = 2 if grid == "int" else 1
  if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= 8:
    raise ValueError(f"bits must be an int in {lo}..8 for grid {grid!r}, got {bits!r}")
  if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                 or group_size < 1):
    raise ValueError(f"group_size must be None or an int >= 1, got {group_size!r}")
  if not (isinstance(damp, (int, float)) and np.isfinite(damp) and damp >= 0):
    raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
  w_q, scales = _gptq(w.T, h, bits=bits, grid=grid, group_size=group_size, damp=float(damp))
  out, fan_in = w_q.shape
  if group_size is None:
    full = jnp.broadcast_to(scales, (out, fan_in))
  else:
    full = jnp.repeat(scales, group_size, axis=1)[:, :fan_in]
  codes = np.asarray(sc.quantize(w_q, full, bits=bits, grid=grid))
  q = sc.QuantizedMatrix(codes=jnp.asarray(_pack_codes(codes, bits)),
                         scale=jnp.asarray(scales, jnp.float32), shape=(out, fan_in), bits=bits,
                         grid=grid, group_size=group_size)
  return Transposed(inner=q)


def _compress(a, *, key, bits_per_weight, calibration=None, group_size=None, grid="int",
              damp=0.01):
  """The ``"gptq"`` method: the widest code whose stored bits per weight fit the budget.

  ``a`` is the Flax-layout (in, out) kernel and ``calibration`` its input second
  moment (in, in); the codes are GPTQ's on the torch layout (out, in).
  """
  del key   # deterministic
  from jax_signedcut._methods import rtn as _rtn  # noqa: PLC0415

  if calibration is None:
    raise ValueError("method 'gptq' needs calibration statistics: "
                     "decompose(..., method='gptq', calibration=H)")
  if a.ndim != 2:
    raise ValueError(f"method 'gptq' compresses one (in, out) kernel, got shape {a.shape}")
  fan_in, out = a.shape
  lo = 2 if grid == "int" else 1
  fits = [b for b in range(lo, 9)
          if _rtn.rtn_bits_per_weight(out, fan_in, b, group_size) <= bits_per_weight]
  if not fits:
    raise ValueError(
        f"bits_per_weight={bits_per_weight:g} pays for no {grid}-grid GPTQ code on shape "
        f"{(fan_in, out)}: {lo} bits with their f32 scales take "
        f"{_rtn.rtn_bits_per_weight(out, fan_in, lo, group_size):.4g} bits per weight")
  return gptq(a, calibration, bits=max(fits), group_size=group_size, grid=grid, damp=damp)


from jax_signedcut._methods import registry as _registry  # noqa: E402

_registry.register(_registry.Method(
    "gptq", _compress, {"group_size": None, "grid": "int", "damp": 0.01},
    "GPTQ int-b on the calibration statistics (per output channel or per group): b is the "
    "widest that fits with its f32 scales; needs --calibration", calibration="required"))
