"""Applying packed factors to activations: ``y = ((x·S) ∘ c)·Tᵀ + b``.

For a :class:`SignedCut` of an (m, n) kernel in the Flax layout (in, out), the
cut j contributes ``c_j (x·s_j) t_jᵀ`` to ``y = x·W``. Two implementations:

* pure JAX (any platform): a ``lax.scan`` over blocks of ``BLOCK`` cuts that
  unpacks one block of ±1 rows of S and T at a time, so the dense ±1 matrices
  (w×m and w×n floats) are never materialised whole — XLA on CPU would
  otherwise expand them before the GEMM at batch ≥ 8 (docs/figures.md, section 6);
* on CPU, the ``signedcut_apply`` XLA FFI kernel (``xla_ffi/apply_*.cc``),
  which reads the sign bits directly. Its f32 cores (scalar, AVX-512) compute
  ``x·s_j = Σx − 2·Σ_{bit i set} x_i`` (for up to 4 rows by table lookup: a
  16-entry table of partial sums per four entries of x, indexed by the sign
  nibbles of 16 cuts at once with one vpermps; for more rows with AVX-512
  masked adds), then ``y += c_j p_j t_j`` with masked adds. Its bf16 cores
  (AMX tiles, or AVX512-BF16 ``vdpbf16ps`` on CPUs without AMX) expand the
  signs to ±1 bf16 tiles and run both products as tile GEMMs: x is rounded to
  bf16, products are exact and sums f32, and p enters the second product as
  two bf16 halves (≈ 16 mantissa bits), or with ``precision="bf16_bf16_f32"``
  as one (a single pass, a third fewer tile products; see
  :func:`check_precision`). The core is chosen once per process
  (``JAX_SIGNEDCUT_APPLY_IMPL`` = ``scalar``, ``avx512``, ``avx512_bf16`` or
  ``amx`` overrides the CPU check); bf16 cores only from ``BF16_MIN_ROWS``
  rows (per core) and ``BF16_MIN_WORK`` multiply-adds, never with
  ``precision="highest"``. The cuts are split into a fixed
  number of partitions that the caller and XLA's intra-op threads claim one at
  a time, so the result does not depend on the schedule. ``impl="auto"`` picks
  the kernel with ``jax.lax.platform_dependent`` when the extension provides
  it (in f32 only below ``FFI_MAX_ROWS`` rows). It is differentiable in x and
  c (``jax.custom_vjp``: the x-cotangent is the same kernel on the transposed
  factors).

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
#: The kernel's ``auto`` uses a bf16 core (AMX or AVX512-BF16) only from
#: ``BF16_MIN_ROWS[core]`` rows and ``BF16_MIN_WORK`` = rows·w·(m + n)
#: multiply-adds (smaller products gain nothing from it); the extension's
#: constants. AVX512-BF16 needs a full 16-row tile: at 8 rows it took 1.2× the
#: f32 core's time on a Zen 4 CPU (``benchmarks/KERNELS_RESULTS.md``).
BF16_MIN_ROWS = {"amx": 8, "avx512_bf16": 16}
BF16_MIN_WORK = 1 << 22
#: The kernel's cores (its ``impl`` attribute).
APPLY_IMPLS = {"auto": 0, "scalar": 1, "avx512": 2, "avx512_bf16": 3, "amx": 4}
#: The rounding levels of ``precision`` (the kernel's ``precision`` attribute,
#: ``ApplyPrecision`` in ``xla_ffi/apply_kernel.h``); see :func:`check_precision`.
PRECISIONS = {"default": 0, "highest": 1, "bf16_bf16_f32": 2}

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


def check_precision(precision) -> str:
  """The level (a key of ``PRECISIONS``) that a ``precision`` argument asks for.

  Named after ``jax.lax.Precision`` and ``jax.lax.DotAlgorithmPreset``; each
  level bounds what the CPU kernel's bf16 cores (AMX, AVX512-BF16) may round,
  and the f32 paths (the f32 cores, the pure-JAX path) satisfy every level:

  * ``None``, ``"default"``, ``Precision.DEFAULT``: ``"default"``. x is rounded
    to bf16, f32 accumulation, and p = c ∘ (x·S) enters the second product as
    two bf16 halves (relative error ≤ 2⁻¹⁶).
  * ``"bf16_bf16_f32"``, ``DotAlgorithmPreset.BF16_BF16_F32`` (bf16 operands,
    f32 accumulation, one pass): as ``"default"`` but p enters as one bf16
    (relative error ≤ 2⁻⁸, like x), a third fewer tile products. Opt-in only.
  * ``"highest"``, ``"high"``, ``Precision.HIGHEST``, ``Precision.HIGH``:
    ``"highest"``, f32 cores only (the kernel has no bf16×3 path, so HIGH,
    which asks for more than bf16 operands, gets f32).

  Raises:
    ValueError: any other value, naming the argument and the values accepted.
  """
  if precision is None:
    return "default"
  lax = jax.lax
  if isinstance(precision, str) and precision.lower() in PRECISIONS:
    return precision.lower()
  if isinstance(precision, str) and precision.lower() == "high":
    return "highest"
  if precision is lax.DotAlgorithmPreset.BF16_BF16_F32:
    return "bf16_bf16_f32"
  if isinstance(precision, lax.Precision):
    return "default" if precision == lax.Precision.DEFAULT else "highest"
  raise ValueError(
      "precision must be None, 'default', 'bf16_bf16_f32', 'high', 'highest', a "
      "jax.lax.Precision or jax.lax.DotAlgorithmPreset.BF16_BF16_F32, got "
      f"{precision!r}")


def _has_ffi_kernel() -> bool:
  return _extension.has_target(_APPLY_TARGET)


def apply_core(impl: str = "auto", *, exact: bool = False, rows: int = 64,
               work: int = 1 << 40) -> str:
  """The kernel core a call runs here ("scalar", "avx512", "avx512_bf16" or "amx").

  Args:
    impl: the requested core (see :func:`apply_ffi`).
    exact: f32 cores only.
    rows: rows of x.
    work: rows·w·(m + n) of the call.

  Raises:
    ValueError: unknown ``impl``, one this CPU cannot run, or no kernel built.
  """
  if impl not in APPLY_IMPLS:
    raise ValueError(f"impl must be one of {tuple(APPLY_IMPLS)}, got {impl!r}")
  if not _has_ffi_kernel():
    raise ValueError("the signedcut_apply kernel is not built into this jax_signedcut")
  ext = _extension.module()
  assert (ext.bf16_min_rows, ext.bf16_min_work) == (
      BF16_MIN_ROWS, BF16_MIN_WORK), "extension and package disagree"
  return ext.apply_core_name(APPLY_IMPLS[impl], bool(exact), int(rows), int(work))


@functools.cache
def _bf16_core() -> str | None:
  """The bf16 core ``auto`` takes on this CPU for large products, or None."""
  if not _has_ffi_kernel():
    return None
  core = apply_core("auto")
  return core if core in BF16_MIN_ROWS else None


def _ffi_raw(x2, s_bits, t_bits, c, n, impl, precision):
  if not _has_ffi_kernel():  # also registers the targets (imports _ffi) on first use
    raise ValueError("the signedcut_apply kernel is not built into this jax_signedcut")
  call = jax.ffi.ffi_call(_APPLY_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                          vmap_method="expand_dims")
  return call(x2, s_bits, t_bits, c.astype(jnp.float32), impl=np.int32(APPLY_IMPLS[impl]),
              precision=np.int32(PRECISIONS[precision]))


# The kernel has no autodiff rule of its own: the x-cotangent is the same
# kernel on the transposed factors (Wᵀ = T·diag(c)·Sᵀ), the c-cotangent comes
# from the pure-JAX path, and the sign bits get float0 (they are integers).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ffi_apply(x2, s_bits, t_bits, c, shape, impl, precision):
  return _ffi_raw(x2, s_bits, t_bits, c, shape[1], impl, precision)


def _ffi_apply_fwd(x2, s_bits, t_bits, c, shape, impl, precision):
  return _ffi_apply(x2, s_bits, t_bits, c, shape, impl, precision), (x2, s_bits, t_bits, c)


def _ffi_apply_bwd(shape, impl, precision, res, g):
  x2, s_bits, t_bits, c = res
  gx = _ffi_raw(g, t_bits, s_bits, c, shape[0], impl, precision)
  _, vjp_c = jax.vjp(
      lambda c: apply_jnp(x2, SignedCut(s_bits, t_bits, c, jnp.int32(0), shape=shape)), c)
  (gc,) = vjp_c(g)
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
  return gx, zero(s_bits), zero(t_bits), gc


_ffi_apply.defvjp(_ffi_apply_fwd, _ffi_apply_bwd)


def apply_ffi(x2: jax.Array, f: SignedCut, *, force_scalar: bool = False, core: str = "auto",
              precision=None) -> jax.Array:
  """The CPU FFI kernel: f32 x2 (B, m) → (B, n) f32 (differentiable in x2 and c).

  Args:
    x2: f32 activations (B, m).
    f: factors of one (m, n) matrix.
    force_scalar: use the portable core (same as ``core="scalar"``).
    core: ``"auto"`` (the environment variable ``JAX_SIGNEDCUT_APPLY_IMPL``,
      read once by the extension, else the best core of this CPU), or one of
      ``"scalar"``, ``"avx512"`` (f32), ``"avx512_bf16"``, ``"amx"`` (x
      rounded to bf16, f32 accumulation); an explicit core this CPU cannot
      run is an error at run time.
    precision: see :func:`check_precision`; ``"highest"`` with
      ``core="auto"`` uses the f32 cores only, ``"bf16_bf16_f32"`` makes a
      bf16 core take p as one bf16.
  """
  if core not in APPLY_IMPLS:
    raise ValueError(f"core must be one of {tuple(APPLY_IMPLS)}, got {core!r}")
  return _ffi_apply(x2, f.s_bits, f.t_bits, f.c, tuple(f.shape),
                    "scalar" if force_scalar else core, check_precision(precision))


def apply_signed_cut(x: jax.Array, f, bias: jax.Array | None = None, *,
                     dense: bool = False, impl: str = "auto",
                     precision=None) -> jax.Array:
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
    impl: ``"auto"`` (on CPU the FFI kernel when built, in f32 only for fewer
      than ``FFI_MAX_ROWS`` rows; else pure JAX), ``"jnp"`` or ``"ffi"`` (CPU
      only).
    precision: ``None`` (``"default"``) lets the CPU kernel round x to bf16
      (f32 accumulation, p in two bf16 halves) from ``BF16_MIN_ROWS`` rows
      (8 with AMX, 16 with AVX512-BF16 only) where the CPU has either;
      ``"bf16_bf16_f32"`` (or
      ``jax.lax.DotAlgorithmPreset.BF16_BF16_F32``) also rounds p to one bf16
      there (faster, ≤ 2⁻⁸ relative like x); ``"highest"`` (or
      ``jax.lax.Precision.HIGHEST`` / ``HIGH``) keeps every path in f32. The
      pure-JAX path is always f32. See :func:`check_precision`.

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
  precision = check_precision(precision)
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
      yp = cuts_matmul(x2, p, impl=impl, precision=precision) if isinstance(p, SignedCut) \
          else p._matmul(x2, precision)  # noqa: SLF001
      y = yp if y is None else y + yp
  if bias is not None:
    y = y + jnp.asarray(bias).astype(jnp.float32)[None, :]
  return y.reshape(*batch, n).astype(x.dtype)


def cuts_matmul(x2: jax.Array, f: SignedCut, *, impl: str = "auto",
                precision=None) -> jax.Array:
  """``x2 · S·diag(c)·Tᵀ`` (B, n) f32 for f32 x2 (B, m), by ``impl`` and ``precision``.

  See :func:`apply_signed_cut`; ``precision="highest"`` keeps the CPU kernel
  on its f32 cores.
  """
  precision = check_precision(precision)
  exact = precision == "highest"
  m, n = f.shape
  rows = x2.shape[0]
  # Where the kernel takes a bf16 core it beats the blocked GEMMs at every batch size.
  core = _bf16_core()
  bf16 = (not exact and core is not None and rows >= BF16_MIN_ROWS[core]
          and rows * f.width * (m + n) >= BF16_MIN_WORK)
  kernel_rows = bf16 or rows < FFI_MAX_ROWS
  if impl == "jnp" or (impl == "auto" and (not _has_ffi_kernel() or not kernel_rows)):
    return apply_jnp(x2, f)
  if impl == "ffi":
    return apply_ffi(x2, f, precision=precision)
  return _extension.on_platform(x2, f, cpu=functools.partial(apply_ffi, precision=precision),
                                default=apply_jnp)
