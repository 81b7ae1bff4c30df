"""The C++ greedy decomposition as an XLA FFI custom call (CPU).

Needs the compiled extension (:mod:`jax_signedcut._kernels.extension` loads it). The
kernel (``xla_ffi/``) follows the algorithm contract of ``_signedcut/oracle.py``; it is
just faster. Which instruction set it uses is chosen once per process (the
``JAX_SIGNEDCUT_KERNEL`` environment variable, ``scalar`` or ``avx512``,
overrides the CPU check); the ``impl`` argument of :func:`greedy` pins one per
call, which is how the tests run every implementation in one process.
Threads: ``JAX_SIGNEDCUT_THREADS=N`` (or ``num_threads``) sets the count; see
:func:`greedy`.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_signedcut._kernels import extension as _extension
from jax_signedcut._core import sharding as _sharding
from jax_signedcut._signedcut import oracle as _oracle
from jax_signedcut._signedcut import packing as _packing

TARGET = "signedcut_greedy"
IMPLS = {"auto": 0, "scalar": 1, "avx512": 2}

# Importing this module needs the extension (callers check _extension.available() first).
_signedcut_ffi = _extension.module()
if _signedcut_ffi is None:
  raise ImportError(_extension.MISSING_HINT)


def kernel_name(impl: str = "auto") -> str:
  """The implementation ``impl`` resolves to on this machine ("scalar" or "avx512").

  Raises:
    ValueError: if ``impl`` is unknown or not supported by this CPU.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
  return _signedcut_ffi.kernel_name(IMPLS[impl])


def avx512_supported() -> bool:
  """Whether this CPU can run the AVX-512 kernel."""
  return bool(_signedcut_ffi.avx512_supported())


def greedy(a, words, *, max_error: float | None = None, impl: str = "auto",
           num_threads: int = 0, target: str = TARGET):
  """Greedy signed cut decomposition of a batch of matrices by the C++ kernel.

  The contract of ``jax.vmap(oracle.greedy)``: cut j starts from the signs
  ``words[j]``; unused slots after a ``max_error`` stop hold zero bits and c = 0.
  Works under ``jax.jit`` and ``jax.vmap`` (the kernel receives the whole
  batch at once and spreads it over threads).

  Args:
    a: float32 (N, m, n).
    words: uint32 (w, ceil(n/32)) shared by all matrices, or (N, w, ceil(n/32)).
    max_error: optional relative Frobenius error at which to stop.
    impl: "auto", "scalar" or "avx512".
    num_threads: threads to use, which may then also share one matrix. 0:
      the ``JAX_SIGNEDCUT_THREADS`` environment variable if set (same
      meaning), else all hardware threads, each taking whole matrices of
      the batch (a single matrix then runs on one thread: on a machine
      shared with other jobs, threads sharing a matrix were measured ~20 %
      slower than one).
    target: the registered FFI target name (tests register other builds).

  Returns:
    (s_bits uint32 (N, w, ceil(m/32)), t_bits uint32 (N, w, ceil(n/32)),
    c float32 (N, w), num_cuts int32 (N,)).

  Raises:
    TypeError: wrong dtypes.
    ValueError: wrong shapes or options.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
  if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) \
      or not 0 <= num_threads <= 256:
    raise ValueError(f"num_threads must be an int in 0..256, got {num_threads!r}")
  if max_error is not None and not (isinstance(max_error, numbers.Real) and max_error > 0):
    raise ValueError(f"max_error must be a number > 0, got {max_error!r}")
  a = jnp.asarray(a)
  words = jnp.asarray(words)
  if a.dtype != jnp.float32:
    raise TypeError(f"a must be float32, got {a.dtype}")
  if words.dtype != jnp.uint32:
    raise TypeError(f"words must be uint32, got {words.dtype}")
  if a.ndim != 3 or 0 in a.shape:
    raise ValueError(f"a must have shape (N, m, n) with no empty dim, got {a.shape}")
  count, m, n = a.shape
  nw = _packing.num_words(n)
  if words.ndim == 2:
    words = words[None]
  if words.ndim != 3 or words.shape[0] not in (1, count) or words.shape[2] != nw \
      or words.shape[1] < 1:
    raise ValueError(
        f"words must have shape (w, {nw}) or ({count}, w, {nw}) for a of shape {a.shape}, "
        f"got {words.shape}")
  # The kernel relies on clear tail bits (the _packing layout).
  mask = np.full((nw,), 0xFFFFFFFF, np.uint32)
  mask[-1] = _packing.tail_mask(n)
  words = words & jnp.asarray(mask)[None, None, :]

  # Partitioned over the batch axis when it is sharded (see _core/sharding.py); the start
  # words shared by all matrices are broadcast so that both operands split alike.
  if words.shape[0] != count:
    words = jnp.broadcast_to(words, (count,) + words.shape[1:])
  return _sharding.per_matrix(_plain(target, float(max_error or 0.0), IMPLS[impl],
                                     int(num_threads)), a, words)


@functools.cache
def _plain(target, max_error, impl, num_threads):
  return functools.partial(_ffi, target=target, max_error=max_error, impl=impl,
                           num_threads=num_threads)


def _ffi(a, words, target, max_error, impl, num_threads):
  """The plain FFI call on whatever arrays it is given (one device's shard, or all)."""
  count, m, _ = a.shape
  _, w, nw = words.shape
  out = (
      jax.ShapeDtypeStruct((count, w, _packing.num_words(m)), jnp.uint32),
      jax.ShapeDtypeStruct((count, w, nw), jnp.uint32),
      jax.ShapeDtypeStruct((count, w), jnp.float32),
      jax.ShapeDtypeStruct((count,), jnp.int32),
  )
  # "expand_dims": under vmap the kernel gets the whole batch in one call,
  # unbatched operands with size-1 dims that it broadcasts itself.
  call = jax.ffi.ffi_call(target, out, vmap_method="expand_dims")
  res = call(a, words, max_error=np.float64(max_error), impl=np.int32(impl),
             num_threads=np.int32(num_threads))
  # Inside shard_map the results vary with the shard like the inputs (the FFI
  # call's declared result types do not say so).
  return _oracle.vary_like(res, a, words)
