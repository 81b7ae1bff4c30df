"""Greedy signed cut decomposition of one order-k tensor (k ≥ 3), in pure jnp.

A width-w decomposition of a tensor of shape (d_1, …, d_k) is

    A − R_w = Σ_j c_j · s_{1,j} ⊗ … ⊗ s_{k,j},   s_{a,j} ∈ {±1}^{d_a}

(docs/method.md, "Order-k tensors"; start signs: docs/contract.md). Cut j on the remainder R:

    s_a ← key-derived random signs, for every axis a       (see below)
    γ ← −∞
    repeat (at most MAX_SWEEPS sweeps):
        for a = 1 … k:
            v ← R_(a) · ⊗_{b≠a} s_b              # contract R with all other signs
            if ‖v‖₁ > γ:  γ ← ‖v‖₁ ;  s_a ← sgn(v)
        stop after a full sweep in which γ did not rise
    c ← γ / N  (N = Π d_a) ;  R ← R − c · s_1 ⊗ … ⊗ s_k

with sgn(0) = +1. Whenever γ rises it equals ⟨R, ⊗ s⟩ for the current signs,
so c is the exact projection of R on the cut and ‖R‖²_F drops by γ²/N.

Start signs: axis a of cut j starts from the packed words
``jax.random.bits(fold_in(fold_in(key, j), a), (ceil(d_a/32),), uint32)``
(tail bits cleared), the tensor analogue of ``_start.start_words``: a width-w
run starts its first k cuts exactly as a width-k run (prefix-consistent).

Why jnp and not the FFI kernel: the C++ kernel is built around a matrix kept
as R and Rᵀ, streaming rows and columns with incremental updates of R t and
Rᵀ s; a tensor half-step contracts k−1 modes at once and would need its own
kernel. The tensors this targets (images, small stacks) are small enough that
the dense jnp sweep is fast, and it runs on any platform.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import string

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core.protocol import Compressed
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut import start as _start
from jax_signedcut._signedcut.decompose import _check_max_error

# Safety cap on sweeps per cut; γ rises strictly, so sweeps end on their own.
MAX_SWEEPS = 1000
_HI = jax.lax.Precision.HIGHEST
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SignedTensorCut(Compressed):
  """A width-w signed cut decomposition of an order-k tensor.

  Attributes:
    bits: tuple of k uint32 arrays, axis a's signs (w, ceil(d_a/32)) packed as
      in :mod:`jax_signedcut._signedcut.packing` (bit 1 means −1).
    c: float32 (w,) cut scales ≥ 0 (0 past ``num_cuts``).
    num_cuts: int32 () cuts made (< w only with ``max_error``).
    shape: static (d_1, …, d_k).
  """

  bits: tuple[jax.Array, ...]
  c: jax.Array
  num_cuts: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  @property
  def width(self) -> int:
    return self.c.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.c.shape[:-1])

  def stored_bytes(self):
    """Bytes stored: every axis's sign words and the f32 scales of all w slots (static)."""
    b = self.batch_shape
    per = 4 * (sum(math.prod(x.shape[len(b):]) for x in self.bits) + self.width)
    return np.full(b, per, np.int64)

  def _dense(self):
    return _dense_tensor(self)

  def _matmul(self, x2, precision=None):  # f32 at every level
    # x (B, d_1) contracted with the first axis: the tensor as a (d_1, d_2·…·d_k) matrix.
    return jnp.matmul(x2, self._dense().reshape(self.shape[0], -1), precision=_HI)


def tensor_bytes_per_cut(shape: tuple[int, ...]) -> int:
  """Bytes one cut of a tensor of ``shape`` stores: ``4·Σ_a ceil(d_a/32) + 4``."""
  return 4 * sum(_packing.num_words(d) for d in shape) + 4


def _sgn(x):
  return jnp.where(x < 0, -1.0, 1.0).astype(jnp.float32)


def _letters(k):
  return string.ascii_letters[:k]


def _contract_all_but(r, signs, a):
  """R_(a) · ⊗_{b≠a} s_b as one einsum, shape (d_a,)."""
  ix = _letters(r.ndim)
  ops = [ix] + [ix[b] for b in range(r.ndim) if b != a]
  args = [r] + [signs[b] for b in range(r.ndim) if b != a]
  return jnp.einsum(f"{','.join(ops)}->{ix[a]}", *args, precision=_HI)


def _outer(signs):
  ix = _letters(len(signs))
  return jnp.einsum(f"{','.join(ix)}->{ix}", *signs)


def start_signs(key: jax.Array, j, shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """Cut j's start signs (±1 f32) for every axis, from ``fold_in(fold_in(key, j), a)``."""
  kj = jax.random.fold_in(key, j)
  out = []
  for a, d in enumerate(shape):
    w = jax.random.bits(jax.random.fold_in(kj, a), (_packing.num_words(d),), jnp.uint32)
    w = w.at[-1].set(w[-1] & jnp.uint32(_packing.tail_mask(d)))
    out.append(_packing.unpack_signs(w, d))
  return tuple(out)


def one_tensor_cut(r: jax.Array, signs: tuple[jax.Array, ...]):
  """The greedy cut of remainder ``r`` from start ``signs``; returns (signs, γ)."""
  k = r.ndim

  def cond(st):
    sweeps, _, _, improved = st
    return improved & (sweeps < MAX_SWEEPS)

  def body(st):
    sweeps, gamma, signs, _ = st
    signs = list(signs)
    improved = jnp.bool_(False)
    for a in range(k):
      v = _contract_all_but(r, signs, a)
      val = jnp.sum(jnp.abs(v))
      take = val > gamma
      gamma = jnp.where(take, val, gamma)
      signs[a] = jnp.where(take, _sgn(v), signs[a])
      improved = improved | take
    return sweeps + 1, gamma, tuple(signs), improved

  init = (jnp.int32(0), jnp.float32(-jnp.inf), tuple(signs), jnp.bool_(True))
  _, gamma, signs, _ = jax.lax.while_loop(cond, body, init)
  return signs, gamma


@functools.partial(jax.jit, static_argnames=("width", "max_error"))
def _decompose_tensor(a, key, *, width, max_error):
  shape = a.shape
  a = a.astype(jnp.float32)
  n_total = jnp.float32(math.prod(shape))
  a2 = jnp.sum(jnp.square(a))
  target = 0.0 if max_error is None else jnp.float32(max_error) ** 2 * a2

  def cond(st):
    j, _, r2, _, _ = st
    keep = j < width
    if max_error is not None:
      keep = keep & (r2 > target)
    return keep

  def body(st):
    j, r, r2, bits, c = st
    signs, gamma = one_tensor_cut(r, start_signs(key, j, shape))
    cj = gamma / n_total
    r = r - cj * _outer(signs)
    if max_error is not None:
      r2 = jnp.sum(jnp.square(r))
    bits = tuple(b.at[j].set(_packing.pack_signs(s)) for b, s in zip(bits, signs))
    return j + 1, r, r2, bits, c.at[j].set(cj)

  bits0 = tuple(jnp.zeros((width, _packing.num_words(d)), jnp.uint32) for d in shape)
  init = (jnp.int32(0), a, a2, bits0, jnp.zeros((width,), jnp.float32))
  j, _, _, bits, c = jax.lax.while_loop(cond, body, init)
  finite = jnp.all(jnp.isfinite(a))   # under jit the NaN check cannot raise
  return SignedTensorCut(bits=bits, c=jnp.where(finite, c, jnp.nan),
                         num_cuts=jnp.where(finite, j, 0).astype(jnp.int32), shape=tuple(shape))


def _check_tensor(a):
  if not hasattr(a, "dtype") or not hasattr(a, "shape"):
    a = np.asarray(a)
  dtype = jnp.dtype(a.dtype)
  if not any(dtype == jnp.dtype(d) for d in _FLOAT_DTYPES):
    raise TypeError(f"a must be a float32, bfloat16, float16 or float64 array, got dtype {dtype}")
  if a.ndim < 3:
    raise ValueError(f"a must be a tensor of order >= 3 (use decompose for matrices), got shape "
                     f"{a.shape}")
  if any(d == 0 for d in a.shape):
    raise ValueError(f"a must not be empty, got shape {a.shape}")
  if not isinstance(a, jax.core.Tracer):
    finite = np.asarray(jnp.isfinite(jnp.asarray(a)))
    if not finite.all():
      bad = tuple(int(i) for i in np.argwhere(~finite)[0])
      raise ValueError(f"a has {int((~finite).sum())} non-finite entries (NaN/Inf), e.g. "
                       f"a{list(bad)} = {np.asarray(a[bad], np.float32)}")
  return a


def decompose_tensor(a: jax.Array, *, key: jax.Array, width: int,
                     max_error: float | None = None) -> SignedTensorCut:
  """Greedy signed cut decomposition ``A ≈ Σ_j c_j s_{1,j} ⊗ … ⊗ s_{k,j}`` of one tensor.

  The whole array is one tensor (no batch dims; use ``jax.vmap`` for a stack).
  See the module docstring for the sweep and the start-sign derivation.

  Args:
    a: float array of order ≥ 3 (float32/bfloat16/float16/float64, computed in float32).
    key: a ``jax.random.key`` of shape ().
    width: number of cuts w ≥ 1; storage is ``w · tensor_bytes_per_cut(a.shape)`` bytes.
    max_error: stop once ‖R‖_F ≤ max_error·‖A‖_F (``num_cuts`` records the count).

  Returns:
    A :class:`SignedTensorCut`.

  Raises:
    TypeError: non-float ``a``, a bad key, a non-int width.
    ValueError: order < 3, an empty axis, NaN/Inf entries (eager only: under
      ``jax.jit`` the scales come out NaN and ``num_cuts`` 0), width ≤ 0,
      max_error ≤ 0.

  Example:
    >>> import jax
    >>> a = jax.random.normal(jax.random.key(0), (3, 20, 30))
    >>> f = decompose_tensor(a, key=jax.random.key(1), width=16)
    >>> [b.shape for b in f.bits], f.c.shape, f.nbytes
    ([(16, 1), (16, 1), (16, 1)], (16,), 256)
    >>> reconstruct_tensor(f).shape
    (3, 20, 30)
  """
  a = _check_tensor(a)
  if isinstance(width, bool) or not isinstance(width, numbers.Integral):
    raise TypeError(f"width must be an int, got {width!r} of type {type(width).__name__}")
  if width < 1:
    raise ValueError(f"width must be >= 1, got {width}")
  max_error = _check_max_error(max_error)
  key = _start.as_key(key)
  if key.shape != ():
    raise ValueError(f"key must have shape () (one tensor), got key shape {key.shape}")
  return _decompose_tensor(jnp.asarray(a), key, width=int(width), max_error=max_error)


def reconstruct_tensor(f: SignedTensorCut, dtype=jnp.float32) -> jax.Array:
  """The dense tensor ``Σ_j c_j s_{1,j} ⊗ … ⊗ s_{k,j}`` of shape ``f.shape``."""
  if not isinstance(f, SignedTensorCut):
    raise TypeError(f"f must be a SignedTensorCut, got {type(f).__name__}")
  return _reconstruct_tensor(f, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _reconstruct_tensor(f, dtype):
  return _dense_tensor(f).astype(dtype)


def _dense_tensor(f):
  signs = [_packing.unpack_signs(b, d) for b, d in zip(f.bits, f.shape)]
  ix = _letters(len(f.shape))
  lead = "..." if f.c.ndim > 1 else ""
  ops = [f"{lead}Z{i}" for i in ix] + [f"{lead}Z"]
  return jnp.einsum(f"{','.join(ops)}->{lead}{ix}", *signs, f.c, precision=_HI)
