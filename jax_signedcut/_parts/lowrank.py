"""The optional low-rank part: ``A ≈ U·Vᵀ + S·diag(c)·Tᵀ (+ sparse)``.

Signed cuts spread every cut over all entries with one magnitude, so a smooth,
nearly low-rank matrix (e.g. a learned position-embedding table) is fitted
better by a few singular directions than by the same bytes of cuts. With
``decompose(..., lowrank=r)`` the remainder after the outlier split (if any)
is approximated by its rank-r truncated SVD ``U_r Σ_r V_rᵀ``; the factors
``U = U_r Σ_r^½`` (m, r) and ``V = V_r Σ_r^½`` (n, r) are rounded to bfloat16
and stored (2 bytes per entry, ``r·(m+n)·2`` bytes paid from a rate/bits
budget like the sparse part), and the cuts are made on
``remainder − bf16(U)·bf16(V)ᵀ`` (the product computed in float32).

``lowrank="auto"`` (eager only: the rank is a static shape) decomposes with
each rank of ``AUTO_CANDIDATES`` = 0, 4, 8, 16, 32 that the shape and budget
allow and keeps the one with the smallest ‖A − Â‖_F (summed over a batch; ties
go to the lower rank): the decomposition's own objective, at up to five
decompositions' cost.

The SVD is ``jnp.linalg.svd`` (deterministic, works under ``jit`` and
``vmap``); it costs about ``m·n·min(m, n)`` flops per matrix, small next to
the greedy's cuts for the shapes of a transformer layer.

Measured (all-MiniLM-L6-v2, 2 bits per weight, outliers "auto",
``examples/compare_minilm.py --lowrank --layers 1 --bits 2``): the 512×384
position-embedding table goes from 0.150 relative error (cuts only) to 0.098
with rank 16 (truncated SVD with bf16 factors: 0.122, LPLR: 0.111); measured
before with numpy: rank 8 → 0.134, 12 → 0.130, 20 → 0.101. On well-behaved
(full-rank) kernels a low-rank part costs accuracy (query kernel: rank 4 →
0.406 vs 0.369 without), so it is opt-in per leaf.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core import protocol as _protocol
from jax_signedcut._core.protocol import Compressed

BYTES_PER_ENTRY = 2            # bfloat16
DTYPE = jnp.bfloat16
#: The ranks ``lowrank="auto"`` tries (those the shape and budget allow).
AUTO_CANDIDATES = (0, 4, 8, 16, 32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankPart(Compressed):
  """A bfloat16 low-rank part ``U·Vᵀ`` of a sum of parts, possibly batched.

  Attributes:
    u: bfloat16 (..., m, r), the left factor.
    v: bfloat16 (..., n, r), the right factor.
    shape: static (m, n).
  """

  u: jax.Array
  v: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def rank(self) -> int:
    """r (static)."""
    return self.u.shape[-1]

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.u.shape[:-2])

  def check(self, name: str = "f") -> LowRankPart:
    """That u is (..., m, r) and v (..., n, r) with one batch shape and rank."""
    m, n = _protocol.check_shape(name, self.shape)
    u = self.u
    if not hasattr(u, "shape") or u.ndim < 2:
      raise ValueError(f"{name}.u must have shape (..., {m}, r), got "
                       f"{getattr(u, 'shape', u)!r}")
    batch, r = tuple(u.shape[:-2]), u.shape[-1]
    _protocol.check_field(name, "u", u, batch + (m, r), "float")
    _protocol.check_field(name, "v", self.v, batch + (n, r), "float")
    return self

  def _dense(self):
    return product(self.u, self.v)

  def stored_bytes(self):
    m, n = self.shape
    # A constant (numpy, not traced): the shape fixes it, so budgets can use it statically.
    return np.full(self.batch_shape, nbytes_for(self.rank, m, n), np.int64)

  def _matmul(self, x2, precision=None):  # f32 at every level
    hi = jax.lax.Precision.HIGHEST
    p = jnp.matmul(x2, self.u.astype(jnp.float32), precision=hi)            # (B, r)
    return jnp.matmul(p, self.v.astype(jnp.float32).T, precision=hi)


def check_rank(lowrank, shape=None):
  """Validates ``lowrank``: ``"auto"`` or an int >= 0 (at most ``min(m, n)`` given a shape)."""
  if isinstance(lowrank, str) and lowrank == "auto":
    return "auto"
  if isinstance(lowrank, bool) or not isinstance(lowrank, numbers.Integral) or lowrank < 0:
    raise ValueError(f"lowrank must be an int >= 0 or 'auto', got {lowrank!r}")
  r = int(lowrank)
  if shape is not None and r > min(shape):
    raise ValueError(f"lowrank={r} exceeds min(m, n) = {min(shape)} for matrices of shape "
                     f"{tuple(shape)}")
  return r


def candidates(m: int, n: int, budget: float | None) -> tuple[int, ...]:
  """The ranks of ``AUTO_CANDIDATES`` that fit (m, n) and a byte budget (or None)."""
  return tuple(r for r in AUTO_CANDIDATES
               if r <= min(m, n) and (budget is None or nbytes_for(r, m, n) <= budget))


def nbytes_for(r: int, m: int, n: int) -> int:
  """Bytes of a rank-r part of an (m, n) matrix: ``r·(m+n)`` bf16 entries."""
  return r * (m + n) * BYTES_PER_ENTRY


def product(u: jax.Array, v: jax.Array) -> jax.Array:
  """``U·Vᵀ`` in float32, shape (..., m, n), from (..., m, r) and (..., n, r)."""
  return jnp.matmul(u.astype(jnp.float32), jnp.swapaxes(v.astype(jnp.float32), -1, -2),
                    precision=jax.lax.Precision.HIGHEST)


def extract(a: jax.Array, r: int):
  """Splits one f32 matrix (m, n) into ``(a − U·Vᵀ, U, V)`` with bf16 U (m, r), V (n, r)."""
  u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  root = jnp.sqrt(s[:r])
  lr_u = (u[:, :r] * root[None, :]).astype(DTYPE)
  lr_v = (vt[:r, :].T * root[None, :]).astype(DTYPE)
  return a - product(lr_u, lr_v), lr_u, lr_v
