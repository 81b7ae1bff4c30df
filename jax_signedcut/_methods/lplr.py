"""Low-rank factor pytrees, LPLR and the direct-SVD-quantization (DSVD) baseline.

LPLR (Saha, Srivastava, Pilanci, "Matrix compression via randomized low rank
and low precision factorization", arXiv 2310.11028) for A (m×n) and rank k:

    S ~ N(0, 1/k)^{n×k}            (a Gaussian sketch; optionally ±1/√k)
    Z = Q_B1(A S)                  (m×k, quantized with B1 bits)
    W = pinv(Z) A                  (k×n, the least-squares fit *to the quantized Z*)
    R = Q_B2(W)                    (quantized with B2 bits)
    A ≈ Z R

Fitting W to the already-quantized Z lets the second factor absorb the first
factor's rounding, which is why LPLR beats quantizing an SVD's factors
directly (DSVD: U_k and Σ_k V_kᵀ rounded with B1 and B2 bits).

Both return a :class:`LowRank`: ``A ≈ Σ_j u_j v_jᵀ = uᵀ v`` with the factors
stored component-major, ``u`` (k, m) and ``v`` (k, n), like the sign rows of a
:class:`~jax_signedcut.SignedCut`. Each factor is either a
:class:`~jax_signedcut.QuantizedMatrix` (B bits per entry on the 2**B-level
uniform grid, with one f32 absmax scale per factor — ``scale="global"`` — or
per component, i.e. per column of Z and of Wᵀ — ``scale="per_column"``) or,
for ``B = 32``, a plain float32 array (no quantization).
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
from jax_signedcut._methods import rtn as _quantize
from jax_signedcut._signedcut import start as _start
from jax_signedcut._signedcut.decompose import _check_matrix
from jax_signedcut._methods.rtn import QuantizedMatrix

SKETCHES = ("gaussian", "rademacher")
SCALES = ("global", "per_column")
_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank(Compressed):
  """A rank-k factorization ``A ≈ uᵀ v = Σ_j u_j v_jᵀ``, possibly batched.

  Attributes:
    u: (..., k, m) float array, or a QuantizedMatrix of shape (k, m).
    v: (..., k, n) float array, or a QuantizedMatrix of shape (k, n).
    shape: static (m, n).
  """

  u: jax.Array | QuantizedMatrix
  v: jax.Array | QuantizedMatrix
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def rank(self) -> int:
    """k (static)."""
    u = self.u
    return u.shape[0] if isinstance(u, QuantizedMatrix) else u.shape[-2]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    u = self.u
    return u.batch_shape if isinstance(u, QuantizedMatrix) else tuple(u.shape[:-2])

  def check(self, name: str = "f") -> LowRank:
    """That both factors are (..., k, m) and (..., k, n) of one batch shape and one k.

    Raises:
      TypeError / ValueError: naming ``name`` and the factor.
    """
    shape = _protocol.check_shape(name, self.shape)
    if len(shape) != 2:
      raise ValueError(f"{name}.shape must be (m, n), got {self.shape!r}")
    want = []
    for field, x, d in (("u", self.u, shape[0]), ("v", self.v, shape[1])):
      if isinstance(x, QuantizedMatrix):
        x.check(f"{name}.{field}")
        got = (tuple(x.batch_shape), x.shape[0], x.shape[1])
      elif hasattr(x, "shape") and hasattr(x, "dtype") and x.ndim >= 2:
        _protocol.check_field(name, field, x, tuple(x.shape), "float")
        got = (tuple(x.shape[:-2]), x.shape[-2], x.shape[-1])
      else:
        raise TypeError(f"{name}.{field} must be a float array (..., k, {d}) or a "
                        f"QuantizedMatrix, got {getattr(x, 'shape', type(x).__name__)!r}")
      if got[2] != d:
        raise ValueError(f"{name}.{field} must have {d} columns for a matrix of shape "
                         f"{shape}, got shape {got[0] + got[1:]}")
      want.append(got[:2])
    if want[0] != want[1]:
      raise ValueError(f"{name}.u and {name}.v must have one batch shape and rank, got "
                       f"{want[0][0]} + ({want[0][1]}, ...) and {want[1][0]} + "
                       f"({want[1][1]}, ...)")
    return self

  def stored_bytes(self):
    """Bytes stored per matrix by both factors (codes, scales, or float entries); static."""
    b = self.batch_shape
    per = sum(int(np.max(x.stored_bytes())) if isinstance(x, QuantizedMatrix)
              else math.prod(x.shape[len(b):]) * x.dtype.itemsize for x in (self.u, self.v))
    return np.full(b, per, np.int64)

  def _dense(self):
    return jnp.einsum("...km,...kn->...mn", _dense(self.u), _dense(self.v), precision=_HI)

  def _matmul(self, x2, precision=None):  # f32 at every level
    # x (B, m) @ uᵀv: through the rank-k inner space, never the (m, n) matrix.
    p = jnp.matmul(x2, _dense(self.u).T, precision=_HI)
    return jnp.matmul(p, _dense(self.v), precision=_HI)


def _dense(x):
  return _quantize.dequantize_matrix(x) if isinstance(x, QuantizedMatrix) \
      else jnp.asarray(x, jnp.float32)


def reconstruct_lowrank(f: LowRank, dtype=jnp.float32) -> jax.Array:
  """Dense (..., m, n) matrices ``uᵀ v`` of a :class:`LowRank`."""
  if not isinstance(f, LowRank):
    raise TypeError(f"f must be a LowRank, got {type(f).__name__}")
  return _reconstruct_lowrank(f, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _reconstruct_lowrank(f, dtype):
  return f._dense().astype(dtype)  # noqa: SLF001


def _factor_words(d, bits):
  return d if bits == 32 else _quantize.code_words(d, bits)


def lowrank_nbytes(m: int, n: int, rank: int, bits: tuple[int, int],
                   scale: str = "global") -> int:
  """Exact bytes of an LPLR/DSVD factorization: packed codes, padding and f32 scales.

  Each of the ``rank`` components stores ``ceil(m·B1/32) + ceil(n·B2/32)``
  words (``m`` resp. ``n`` words for a 32-bit float factor) plus, with
  ``scale="per_column"``, one f32 scale per quantized factor; with
  ``"global"`` each quantized factor has a single f32 scale.

  Example:
    >>> lowrank_nbytes(64, 96, 8, (4, 2))  # 8 * (8 + 6) words + 2 scales
    456
  """
  per_k = _factor_words(m, bits[0]) + _factor_words(n, bits[1])
  quantized = sum(b != 32 for b in bits)
  if scale == "per_column":
    per_k += quantized
    fixed = 0
  else:
    fixed = quantized
  return 4 * (rank * per_k + fixed)


def rank_for_bits(m: int, n: int, bits_per_weight: float, bits: tuple[int, int],
                  scale: str = "global") -> int:
  """The largest rank whose :func:`lowrank_nbytes` fits ``bits_per_weight·m·n`` bits.

  This is the budget rule ``k = floor(bits / (m·B1 + n·B2))`` of the LPLR
  paper with the scales and the word padding counted exactly; it is capped at
  ``min(m, n)`` (more components cannot help).

  Raises:
    ValueError: if the budget does not pay for one component.

  Example:
    >>> rank_for_bits(4096, 4096, 2, (4, 4))  # 2 bits * 4096² / (4096*4 + 4096*4), less 2 scales
    1023
  """
  bits = _check_bit_pair(bits)
  scale = _check_choice("scale", scale, SCALES)
  if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, numbers.Real) \
      or not math.isfinite(bits_per_weight) or bits_per_weight <= 0:
    raise ValueError(f"bits_per_weight must be a finite number > 0, got {bits_per_weight!r}")
  one = lowrank_nbytes(m, n, 1, bits, scale)
  fixed = lowrank_nbytes(m, n, 0, bits, scale)
  budget = bits_per_weight * m * n / 8
  k = math.floor((budget - fixed) / (one - fixed))
  while k >= 1 and lowrank_nbytes(m, n, k, bits, scale) > budget:  # float rounding guard
    k -= 1
  if k < 1:
    raise ValueError(
        f"bits_per_weight={bits_per_weight!r} gives rank {k} for a matrix of shape {(m, n)} with "
        f"bits={bits}: {budget:g} bytes do not pay for one component "
        f"({lowrank_nbytes(m, n, 1, bits, scale)} bytes)")
  return min(k, m, n)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
  return value


def _check_bit_pair(bits):
  if not isinstance(bits, (tuple, list)) or len(bits) != 2:
    raise ValueError(f"bits must be a pair (B1, B2), got {bits!r}")
  return tuple(_quantize.check_bits(b, f"bits[{i}]", allow_float=True)
               for i, b in enumerate(bits))


def check_rank(rank, m, n):
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
    raise TypeError(f"rank must be an int, got {rank!r} of type {type(rank).__name__}")
  if not 1 <= rank <= min(m, n):
    raise ValueError(f"rank must be in 1..min(m, n) = 1..{min(m, n)} for a matrix of shape "
                     f"{(m, n)}, got {rank}")
  return int(rank)


def _resolve_rank(m, n, rank, bits_per_weight, bits, scale):
  if (rank is None) == (bits_per_weight is None):
    raise ValueError(f"exactly one of rank, bits_per_weight must be given, got rank={rank!r}, "
                     f"bits_per_weight={bits_per_weight!r}")
  if rank is not None:
    return check_rank(rank, m, n)
  return rank_for_bits(m, n, bits_per_weight, bits, scale)


def _batch_key(key, batch, a_shape, required):
  if key is None:
    if required:
      raise TypeError("key is required (a jax.random.key)")
    return None
  key = _start.as_key(key)
  if key.shape not in ((), batch):
    raise ValueError(f"key must have shape () or the batch shape {batch} of a (shape {a_shape}), "
                     f"got key shape {key.shape}")
  return key


def _quantize_factor(x, bits, scale, key):
  """x (k, d) → (stored factor, its dequantized values)."""
  if bits == 32:
    return x, x
  mode = "global" if scale == "global" else "row"
  q = _quantize.quantize_matrix(x, bits=bits, grid="uniform", mode=mode, key=key)
  return q, _quantize.dequantize_matrix(q)


def _lplr_one(a, key, *, rank, bits, sketch, power_iters, orthonormalize, dither, scale):
  m, n = a.shape
  k_sketch, k_z, k_w = jax.random.split(key, 3)
  if sketch == "gaussian":
    s = jax.random.normal(k_sketch, (n, rank), jnp.float32)
  else:
    s = jnp.where(jax.random.bernoulli(k_sketch, 0.5, (n, rank)), 1.0, -1.0)
  s = s / jnp.sqrt(jnp.float32(rank))
  y = jnp.matmul(a, s, precision=_HI)
  for _ in range(power_iters):
    # Orthonormalise between passes so that the range does not collapse onto
    # the top singular vector in f32; the scale of Y is irrelevant (absmax).
    q, _ = jnp.linalg.qr(y)
    y = jnp.matmul(a, jnp.matmul(a.T, q, precision=_HI), precision=_HI)
  if orthonormalize:
    y, _ = jnp.linalg.qr(y)
  u, z_t = _quantize_factor(y.T, bits[0], scale, k_z if dither else None)
  w = jnp.matmul(jnp.linalg.pinv(z_t.T), a, precision=_HI)        # (k, n)
  v, _ = _quantize_factor(w, bits[1], scale, k_w if dither else None)
  return u, v


def _dsvd_one(a, key, *, rank, bits, dither, scale):
  uu, sv, vt = jnp.linalg.svd(a, full_matrices=False)
  k_u, k_v = jax.random.split(key) if key is not None else (None, None)
  u, _ = _quantize_factor(uu[:, :rank].T, bits[0], scale, k_u if dither else None)
  v, _ = _quantize_factor(sv[:rank, None] * vt[:rank], bits[1], scale, k_v if dither else None)
  return u, v


def _batched(one, a, key, **config):
  """Runs ``one(a_i, key_i, **config)`` over the leading dims of a (..., m, n)."""
  batch = a.shape[:-2]
  m, n = a.shape[-2:]
  count = math.prod(batch)
  a = a.astype(jnp.float32).reshape(count, m, n)
  key_axis = None if key is None or key.shape == () else 0
  if key_axis == 0:
    key = key.reshape(count)
  u, v = jax.vmap(functools.partial(one, **config), in_axes=(0, key_axis))(a, key)
  unflat = lambda x: x.reshape(*batch, *x.shape[1:])  # noqa: E731
  u, v = jax.tree.map(unflat, u), jax.tree.map(unflat, v)
  return LowRank(u=u, v=v, shape=(m, n))


@functools.partial(jax.jit, static_argnames=("rank", "bits", "sketch", "power_iters",
                                             "orthonormalize", "dither", "scale"))
def _lplr(a, key, **config):
  return _batched(_lplr_one, a, key, **config)


@functools.partial(jax.jit, static_argnames=("rank", "bits", "dither", "scale"))
def _dsvd(a, key, **config):
  return _batched(_dsvd_one, a, key, **config)


def _check_common(a, bits, scale, dither, power_iters=0):
  a = _check_matrix(a)
  bits = _check_bit_pair(bits)
  scale = _check_choice("scale", scale, SCALES)
  if not isinstance(dither, bool):
    raise TypeError(f"dither must be a bool, got {dither!r}")
  if isinstance(power_iters, bool) or not isinstance(power_iters, numbers.Integral) \
      or power_iters < 0:
    raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
  return a, bits, scale


def lplr(a: jax.Array, *, key: jax.Array, rank: int | None = None,
         bits_per_weight: float | None = None, bits: tuple[int, int] = (8, 8),
         sketch: str = "gaussian", power_iters: int = 0, orthonormalize: bool = False,
         dither: bool = False, scale: str = "global") -> LowRank:
  """LPLR: randomized low-rank factorization with low-precision factors.

  Args:
    a: float array (..., m, n) (float32/bfloat16/float16/float64, computed
      in float32); leading dims are a batch of independent matrices.
    key: ``jax.random.key`` of shape () (one sketch for the whole batch) or of
      the batch shape. It drives the sketch and, with ``dither``, the rounding.
    rank: the number of components k, 1..min(m, n).
    bits_per_weight: a storage budget instead of ``rank``; ``k`` is
      :func:`rank_for_bits` (scales and padding counted exactly).
    bits: (B1, B2), the code widths of Z and of W, each 1..16, or 32 for an
      unquantized float32 factor.
    sketch: ``"gaussian"`` (N(0, 1/k) entries, as in the paper) or ``"rademacher"``.
    power_iters: subspace iterations ``A Aᵀ`` applied to the sketch (0 = the
      paper's plain sketch; 1–2 help when the spectrum decays slowly).
    orthonormalize: quantize an orthonormal basis Q of the sketch's range
      instead of A S itself (not in the paper; the same subspace, but W = Qᵀ A
      stays well scaled when k approaches min(m, n), where pinv(Q(A S)) A
      can have a huge range that the second quantizer then destroys).
    dither: dithered (unbiased stochastic) rounding, the variant the paper
      analyses, instead of round-to-nearest.
    scale: ``"global"`` (one absmax scale per factor) or ``"per_column"``
      (one per column of Z and of Wᵀ, i.e. per component).

  Exactly one of rank / bits_per_weight. Configuration is static under
  ``jax.jit``; ``a`` and ``key`` may be traced; ``jax.vmap`` over stacked
  matrices works.

  Returns:
    A :class:`LowRank` with ``u`` (k, m) from Zᵀ and ``v`` (k, n) from R;
    ``reconstruct_lowrank`` gives Z R, ``.nbytes`` the exact storage.

  Raises:
    TypeError: non-float ``a``, missing/bad key, non-int rank or bits.
    ValueError: bad shape, NaN/Inf (eager only), bits outside 1..16 (and not
      32), rank outside 1..min(m, n), a budget below one component, none or
      both of rank/bits_per_weight, an unknown sketch or scale.

  Example:
    >>> import jax
    >>> a = jax.random.normal(jax.random.key(0), (64, 96))
    >>> f = lplr(a, key=jax.random.key(1), bits_per_weight=4, bits=(8, 8))
    >>> f.rank, f.u.shape, f.v.shape, f.nbytes <= 4 * 64 * 96 // 8
    (19, (19, 64), (19, 96), True)
  """
  a, bits, scale = _check_common(a, bits, scale, dither, power_iters)
  sketch = _check_choice("sketch", sketch, SKETCHES)
  m, n = a.shape[-2:]
  k = _resolve_rank(m, n, rank, bits_per_weight, bits, scale)
  key = _batch_key(key, tuple(a.shape[:-2]), a.shape, required=True)
  if not isinstance(orthonormalize, bool):
    raise TypeError(f"orthonormalize must be a bool, got {orthonormalize!r}")
  return _lplr(jnp.asarray(a), key, rank=k, bits=bits, sketch=sketch,
               power_iters=int(power_iters), orthonormalize=orthonormalize, dither=dither,
               scale=scale)


def dsvd(a: jax.Array, *, rank: int | None = None, bits_per_weight: float | None = None,
         bits: tuple[int, int] = (8, 8), dither: bool = False, scale: str = "global",
         key: jax.Array | None = None) -> LowRank:
  """The DSVD baseline: quantize the truncated SVD's U_k and Σ_k V_kᵀ directly.

  Same arguments, budget rule and result layout as :func:`lplr` (``u`` is
  U_kᵀ, ``v`` is Σ_k V_kᵀ); ``key`` is only needed with ``dither=True``.

  Example:
    >>> import jax
    >>> a = jax.random.normal(jax.random.key(0), (64, 96))
    >>> dsvd(a, rank=8, bits=(4, 4)).nbytes
    648
  """
  a, bits, scale = _check_common(a, bits, scale, dither)
  m, n = a.shape[-2:]
  k = _resolve_rank(m, n, rank, bits_per_weight, bits, scale)
  key = _batch_key(key, tuple(a.shape[:-2]), a.shape, required=dither)
  return _dsvd(jnp.asarray(a), key, rank=k, bits=bits, dither=dither, scale=scale)


def _compress_lplr(a, *, key, bits_per_weight, bits=(8, 8), sketch="gaussian", power_iters=0,
                   orthonormalize=False, dither=False, scale="global"):
  return lplr(a, key=key, bits_per_weight=bits_per_weight, bits=tuple(bits), sketch=sketch,
              power_iters=power_iters, orthonormalize=orthonormalize, dither=dither, scale=scale)


def _compress_dsvd(a, *, key, bits_per_weight, bits=(8, 8), dither=False, scale="global"):
  return dsvd(a, bits_per_weight=bits_per_weight, bits=tuple(bits), dither=dither, scale=scale,
              key=key if dither else None)


_registry.register(_registry.Method(
    "lplr", _compress_lplr,
    {"bits": (8, 8), "sketch": "gaussian", "power_iters": 0, "orthonormalize": False,
     "dither": False, "scale": "global"},
    "LPLR: quantized sketch Z and quantized least-squares factor, rank from the budget"))
_registry.register(_registry.Method(
    "dsvd", _compress_dsvd, {"bits": (8, 8), "dither": False, "scale": "global"},
    "direct SVD quantization: U_k and Σ_k V_kᵀ quantized, rank from the budget"))
