"""Per-input-channel scales and a transposed view: the parts calibrated compression adds.

``InputScaled(scale, inner)`` is ``A = diag(scale)⁻¹ · inner``: the inner matrix
compresses ``diag(scale) · W``, whose rows the scales weight by how much their
inputs matter (calibration), and a layer ``y = x A`` computes
``(x / scale) · inner``, so the scales fold into the layer's input.
``Transposed(inner)`` is ``A = innerᵀ`` (GPTQ quantizes a Flax (in, out)
kernel in the torch (out, in) layout so that a scale group runs along inputs).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jax_signedcut._core.protocol import Compressed

_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputScaled(Compressed):
  """``A = inner / scale[:, None]``: f32 scales (..., m) > 0 and a compressed (m, n) inner."""

  scale: jax.Array
  inner: Compressed

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.inner.shape)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.scale.shape[:-1])

  def _dense(self):
    return self.inner._dense() / self.scale[..., :, None]  # noqa: SLF001

  def stored_bytes(self):
    return self.inner.stored_bytes() + 4 * self.scale.shape[-1]

  def _matmul(self, x2, precision=None):
    return self.inner._matmul(x2 / self.scale[None, :], precision)  # noqa: SLF001


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Transposed(Compressed):
  """``A = innerᵀ`` for a compressed (n, m) inner."""

  inner: Compressed

  @property
  def shape(self) -> tuple[int, int]:
    n, m = self.inner.shape
    return (m, n)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.inner.batch_shape)

  def _dense(self):
    return jnp.swapaxes(self.inner._dense(), -1, -2)  # noqa: SLF001

  def stored_bytes(self):
    return self.inner.stored_bytes()

  def _matmul(self, x2, precision=None):  # f32 at every level
    return jnp.matmul(x2, self._dense(), precision=_HI)


del math
