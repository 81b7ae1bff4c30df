"""Result types of calibrated compression: an input-scaled matrix and a transposed one.

Both follow the contract of the library's compressed matrices: static
``shape`` (m, n), ``batch_shape``, ``reconstruct(dtype)`` (dense (..., m, n)),
``nbytes`` (bytes stored) and ``matmul(x)`` (``x @ A`` for x (..., m) without
materialising A).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

import jax_signedcut as sc


def _inner_dense(inner, dtype=jnp.float32):
  if isinstance(inner, sc.SignedCut):
    return sc.reconstruct(inner, dtype)
  if isinstance(inner, sc.QuantizedMatrix):
    return sc.dequantize_matrix(inner, dtype)
  return inner.reconstruct(dtype)


def _inner_nbytes(inner):
  if isinstance(inner, sc.SignedCut):
    return sc.nbytes(inner)
  return int(inner.nbytes)


def _inner_matmul(x, inner):
  if isinstance(inner, sc.SignedCut):
    return sc.apply_signed_cut(x, inner)
  if isinstance(inner, sc.QuantizedMatrix):
    return jnp.matmul(x, sc.dequantize_matrix(inner, x.dtype))
  return inner.matmul(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputScaled:
  """A matrix stored as per-input-channel scales and a compressed inner matrix.

  ``A = diag(scale)⁻¹ · inner``, i.e. ``A[i, :] = inner[i, :] / scale[i]``; a
  layer ``y = x A`` computes ``(x / scale) · inner``, so the scales fold into
  the layer's input and inference stays one call. The inner matrix is what
  was compressed: ``diag(scale) · W``, whose rows the scales weight by how
  much their inputs matter.

  Attributes:
    scale: float32 (..., m), > 0.
    inner: a ``SignedCut`` (or any part with the same contract) of shape (m, n).
  """

  scale: jax.Array
  inner: object

  @property
  def shape(self) -> tuple[int, int]:
    """Static (m, n)."""
    return tuple(self.inner.shape)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading batch dims (static)."""
    return tuple(self.scale.shape[:-1])

  def reconstruct(self, dtype=jnp.float32) -> jax.Array:
    """Dense (..., m, n) ``inner / scale[:, None]``."""
    dense = _inner_dense(self.inner, jnp.float32)
    return (dense / self.scale[..., :, None]).astype(dtype)

  @property
  def nbytes(self) -> int:
    """The inner part's bytes plus 4 per f32 scale."""
    return _inner_nbytes(self.inner) + 4 * math.prod(self.scale.shape)

  def matmul(self, x: jax.Array) -> jax.Array:
    """``x @ A`` for x (..., m): ``(x / scale) @ inner``, A never materialised."""
    x = jnp.asarray(x)
    if self.batch_shape:
      raise ValueError(f"matmul needs one matrix (batch shape ()), got {self.batch_shape}; "
                       "map over stacked parts with jax.vmap")
    scale = self.scale.reshape((1,) * (x.ndim - 1) + self.scale.shape)
    xs = (x.astype(jnp.float32) / scale).astype(x.dtype)
    return _inner_matmul(xs, self.inner)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Transposed:
  """A matrix stored transposed: ``A = inner.T``.

  GPTQ quantizes a Flax kernel (in, out) in the torch layout (out, in), so
  that a scale group runs along the inputs; this wraps the (out, in)
  ``QuantizedMatrix`` back into an (in, out) matrix.

  Attributes:
    inner: a part of shape (n, m) (e.g. ``sc.QuantizedMatrix``).
  """

  inner: object

  @property
  def shape(self) -> tuple[int, int]:
    n, m = self.inner.shape
    return (m, n)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.inner.batch_shape)

  def reconstruct(self, dtype=jnp.float32) -> jax.Array:
    """Dense (..., m, n)."""
    return jnp.swapaxes(_inner_dense(self.inner, dtype), -1, -2)

  @property
  def nbytes(self) -> int:
    return _inner_nbytes(self.inner)

  def matmul(self, x: jax.Array) -> jax.Array:
    """``x @ A`` = ``x @ inner.T`` (the inner matrix is expanded: codes are dense per row)."""
    x = jnp.asarray(x)
    return jnp.matmul(x, self.reconstruct(x.dtype))
