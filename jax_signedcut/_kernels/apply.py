"""Applying packed factors to activations: ``y = ((x·S) ∘ c)·Tᵀ + b``.

For a :class:`SignedCut` of an (m, n) kernel in the Flax layout (in, out), the
cut j contributes ``c_j (x·s_j) t_jᵀ`` to ``y = x·W``. Two implementations:

* pure JAX (any platform): a ``lax.scan`` over blocks of ``BLOCK`` cuts that
  unpacks one block of ±1 rows of S and T at a time, so the dense ±1 matrices
  (w×m and w×n floats) are never materialised whole — XLA on CPU would
  otherwise expand them before the GEMM at batch ≥ 8 (docs/figures.md, section 6);
* on CPU, the ``signedcut_apply`` XLA FFI kernel (``xla_ffi/apply_*.cc``),
  which reads the sign bits directly: ``x·s_j = Σx − 2·Σ_{bit i set} x_i``
  (for up to 4 rows by table lookup: a 16-entry table of partial sums per four
  entries of x, indexed by the sign nibbles of 16 cuts at once with one
  vpermps; for more rows with AVX-512 masked adds), then ``y += c_j p_j t_j``
  with masked adds. The cuts are split into a fixed number of partitions that
  the caller and XLA's intra-op threads claim one at a time, so the result does
  not depend on the schedule. ``impl="auto"`` picks it with
  ``jax.lax.platform_dependent`` for fewer than ``FFI_MAX_ROWS`` rows when the
  extension provides it. It is differentiable in x and c (``jax.custom_vjp``:
  the x-cotangent is the same kernel on the transposed factors).

Activations may be f32, bf16 or f16: everything accumulates in f32 and the
result has ``x.dtype``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._core.protocol import check_compressed
from jax_signedcut._kernels import extension as _extension
from jax_signedcut._parts.sum import Sum
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut.factors import SignedCut

#: Cuts unpacked per step of the pure-JAX path.
BLOCK = 256
#: From this many rows ``impl="auto"`` uses the pure-JAX path on CPU too. On a
#: 4096² layer (2-core AVX-512 machine) the kernel took 0.8× the CPU time of the
#: blocked-GEMM path at 64 rows (rate ½) and 1.1× at 256 rows (rate ¼): the
#: GEMMs amortise their per-call unpacking of the signs over the batch.
FFI_MAX_ROWS = 128

_HI = jax.lax.Precision.HIGHEST
_APPLY_TARGET = "signedcut_apply"


def _check(x, f, bias):
  check_compressed(f)
  if f.batch_shape != ():
    raise ValueError(
        f"f must hold one matrix (batch shape ()), got batch shape {f.batch_shape}; "
        "map over stacked factors with jax.vmap / nn.scan / nnx.scan")
  if not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a float array (f32, bf16 or f16), got dtype {x.dtype}")
  m, n = f.shape
  if x.ndim < 1 or x.shape[-1] != m:
    raise ValueError(
        f"x must have shape (..., {m}) to match factors of shape (in, out) = {f.shape}, "
        f"got x shape {tuple(x.shape)}")
  if bias is not None and tuple(jnp.shape(bias)) != (n,):
    raise ValueError(f"bias must have shape ({n},), got {tuple(jnp.shape(bias))}")
  return x


def apply_jnp(x2: jax.Array, f: SignedCut, *, block: int = BLOCK) -> jax.Array:
  """Pure-JAX ``((x·S) ∘ c)·Tᵀ`` for f32 x2 of shape (B, m) → (B, n) f32."""
  m, n = f.shape
  w = f.width
  blk = min(block, w)
  nb = -(-w // blk)
  pad = nb * blk - w
  s_bits, t_bits, c = f.s_bits, f.t_bits, f.c
  if pad:  # zero bits and c = 0: padded cuts add nothing.
    s_bits = jnp.pad(s_bits, ((0, pad), (0, 0)))
    t_bits = jnp.pad(t_bits, ((0, pad), (0, 0)))
    c = jnp.pad(c, (0, pad))
  xs = (s_bits.reshape(nb, blk, -1), t_bits.reshape(nb, blk, -1), c.reshape(nb, blk))

  def step(y, blk_):
    sb, tb, cb = blk_
    s = _packing.unpack_signs(sb, m)                       # (blk, m)
    t = _packing.unpack_signs(tb, n)                       # (blk, n)
    p = jnp.matmul(x2, s.T, precision=_HI) * cb[None, :]   # (B, blk)
    return y + jnp.matmul(p, t, precision=_HI), None

  y, _ = jax.lax.scan(step, jnp.zeros((x2.shape[0], n), jnp.float32), xs)
  return y


def _has_ffi_kernel() -> bool:
  return _extension.has_target(_APPLY_TARGET)


def _ffi_raw(x2, s_bits, t_bits, c, n, force_scalar):
  if not _has_ffi_kernel():  # also registers the targets (imports _ffi) on first use
    raise ValueError("the signedcut_apply kernel is not built into this jax_signedcut")
  call = jax.ffi.ffi_call(_APPLY_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                          vmap_method="expand_dims")
  return call(x2, s_bits, t_bits, c.astype(jnp.float32), force_scalar=np.int32(force_scalar))


# The kernel has no autodiff rule of its own: the x-cotangent is the same
# kernel on the transposed factors (Wᵀ = T·diag(c)·Sᵀ), the c-cotangent comes
# from the pure-JAX path, and the sign bits get float0 (they are integers).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ffi_apply(x2, s_bits, t_bits, c, shape, force_scalar):
  return _ffi_raw(x2, s_bits, t_bits, c, shape[1], force_scalar)


def _ffi_apply_fwd(x2, s_bits, t_bits, c, shape, force_scalar):
  return _ffi_apply(x2, s_bits, t_bits, c, shape, force_scalar), (x2, s_bits, t_bits, c)


def _ffi_apply_bwd(shape, force_scalar, res, g):
  x2, s_bits, t_bits, c = res
  gx = _ffi_raw(g, t_bits, s_bits, c, shape[0], force_scalar)
  _, vjp_c = jax.vjp(
      lambda c: apply_jnp(x2, SignedCut(s_bits, t_bits, c, jnp.int32(0), shape=shape)), c)
  (gc,) = vjp_c(g)
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
  return gx, zero(s_bits), zero(t_bits), gc


_ffi_apply.defvjp(_ffi_apply_fwd, _ffi_apply_bwd)


def apply_ffi(x2: jax.Array, f: SignedCut, *, force_scalar: bool = False) -> jax.Array:
  """The CPU FFI kernel: f32 x2 (B, m) → (B, n) f32 (differentiable in x2 and c).

  Args:
    x2: f32 activations (B, m).
    f: factors of one (m, n) matrix.
    force_scalar: use the portable core even where AVX-512 is available
      (the environment variable ``JAX_SIGNEDCUT_APPLY_IMPL=scalar``, read once
      by the extension, does the same for every call).
  """
  return _ffi_apply(x2, f.s_bits, f.t_bits, f.c, tuple(f.shape), int(bool(force_scalar)))


def apply_signed_cut(x: jax.Array, f, bias: jax.Array | None = None, *,
                     dense: bool = False, impl: str = "auto") -> jax.Array:
  """``y = x·W + b`` with ``W = S·diag(c)·Tᵀ`` (m, n) = (in, out) given as factors.

  Args:
    x: activations (..., m), any leading batch shape; f32, bf16 or f16.
    f: a compressed (m, n) kernel in the Flax (in, out) layout: a
      :class:`SignedCut`, a :class:`Sum` of parts holding one, or any other
      compressed matrix (its own ``matmul`` is used).
    bias: optional (n,) bias, added in f32.
    dense: expand the factors to a dense f32 kernel (``reconstruct``) and use
      one GEMM. The expansion costs w·m·n multiply-adds on every call, the
      factored product B·w·(m+n), the dense one B·m·n: expanding pays from
      B ≈ w·m·n / (w·(m+n) − m·n) rows (≈ 2300 for 4096² at rate ½; measured
      ≈ 1300–2600 on the 2-core CPU, see ``benchmarks/DENSE_RESULTS.md``).
      To expand once and reuse, reconstruct outside the jitted step
      (``SignedCutDense.to_linear``).
    impl: ``"auto"`` (on CPU the FFI kernel when built and fewer than
      ``FFI_MAX_ROWS`` rows, else pure JAX), ``"jnp"`` or ``"ffi"`` (CPU only).

  Returns:
    (..., n) in ``x.dtype``, accumulated in f32.

  Raises:
    TypeError: non-float x or f not a compressed matrix.
    ValueError: x's last dim is not m, batched factors, a bias not of shape (n,).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax_signedcut import decompose, reconstruct
    >>> w = jax.random.normal(jax.random.key(0), (40, 24))
    >>> f = decompose(w, key=jax.random.key(1), width=64)
    >>> x = jnp.ones((3, 40))
    >>> bool(jnp.allclose(apply_signed_cut(x, f), x @ reconstruct(f), atol=1e-3))
    True
  """
  x = _check(x, f, bias)
  if impl not in ("auto", "jnp", "ffi"):
    raise ValueError(f"impl must be 'auto', 'jnp' or 'ffi', got {impl!r}")
  if impl == "ffi" and not _has_ffi_kernel():
    raise ValueError("impl='ffi' needs the compiled signedcut_apply kernel, which this "
                     "build of jax_signedcut does not provide")
  m, n = f.shape
  batch = x.shape[:-1]
  x2 = x.reshape(-1, m).astype(jnp.float32)
  if dense:
    y = jnp.matmul(x2, f.reconstruct(), precision=_HI)
  else:
    parts = f.parts if isinstance(f, Sum) else (f,)
    y = None
    for p in parts:
      # The cuts take the implementation asked for; every other part its own product.
      yp = cuts_matmul(x2, p, impl=impl) if isinstance(p, SignedCut) \
          else p._matmul(x2)  # noqa: SLF001
      y = yp if y is None else y + yp
  if bias is not None:
    y = y + jnp.asarray(bias).astype(jnp.float32)[None, :]
  return y.reshape(*batch, n).astype(x.dtype)


def cuts_matmul(x2: jax.Array, f: SignedCut, *, impl: str = "auto") -> jax.Array:
  """``x2 · S·diag(c)·Tᵀ`` (B, n) f32 for f32 x2 (B, m), by ``impl`` (see apply_signed_cut)."""
  if impl == "jnp" or (impl == "auto" and (not _has_ffi_kernel()
                                           or x2.shape[0] >= FFI_MAX_ROWS)):
    return apply_jnp(x2, f)
  if impl == "ffi":
    return apply_ffi(x2, f)
  return _extension.on_platform(x2, f, cpu=apply_ffi, default=apply_jnp)
