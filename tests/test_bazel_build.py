"""The library BUILD.bazel builds gives the same results as the pip-built one.

CI builds it first with `.ci/bazel.sh` and exports its path as
JAX_SIGNEDCUT_BAZEL_LIB; without it the default bazel-bin/ location is tried,
and the test is skipped only when no library exists there.
"""

import ctypes
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_signedcut._kernels import apply as _apply
from jax_signedcut._kernels import greedy as _ffi
from jax_signedcut._signedcut import start as _start

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIB = os.environ.get("JAX_SIGNEDCUT_BAZEL_LIB", str(ROOT / "bazel-bin" / "libsignedcut_ffi.so"))
TARGET = "signedcut_greedy_bazel"
APPLY_TARGET = "signedcut_apply_bazel"


@pytest.fixture(scope="module")
def bazel_lib():
  if not os.path.exists(LIB):
    pytest.skip(f"no Bazel-built library at {LIB} (build it with .ci/bazel.sh and set "
                "JAX_SIGNEDCUT_BAZEL_LIB)")
  lib = ctypes.cdll.LoadLibrary(LIB)
  # Their own target names: the pip build's handlers are registered as
  # "signedcut_greedy" / "signedcut_apply", and one name may only ever map to
  # one handler.
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SignedCutGreedy), platform="cpu")
  jax.ffi.register_ffi_target(APPLY_TARGET, jax.ffi.pycapsule(lib.SignedCutApply),
                              platform="cpu")
  return lib


@pytest.fixture(scope="module")
def bazel_target(bazel_lib):
  return TARGET


@pytest.mark.parametrize("shape,width", [((33, 97), 40), ((1, 1), 3), ((2, 64, 70), 35)])
@pytest.mark.parametrize("impl", ["scalar", "auto"])
def test_bazel_library_gives_the_same_factors(bazel_target, shape, width, impl):
  a = jax.random.normal(jax.random.key(1), shape)
  a = a if a.ndim == 3 else a[None]
  words = _start.start_words(jax.random.key(0), width, shape[-1])
  want = _ffi.greedy(a, words, impl=impl)
  got = _ffi.greedy(a, words, impl=impl, target=bazel_target)
  for x, y in zip(got, want):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _apply_cores():
  out = []
  for core in ("scalar", "avx512", "avx512_bf16", "amx"):
    try:
      _apply.apply_core(core)
    except ValueError as e:
      out.append(pytest.param(core, marks=pytest.mark.skip(reason=str(e))))
    else:
      out.append(core)
  return out


@pytest.mark.parametrize("core", _apply_cores())
def test_bazel_library_applies_the_same(bazel_lib, core):
  rng = np.random.default_rng(0)
  m, n, w, rows = 70, 45, 300, 19
  s = rng.integers(0, 2 ** 32, (w, 3), dtype=np.uint32)
  t = rng.integers(0, 2 ** 32, (w, 2), dtype=np.uint32)
  c = rng.uniform(0.1, 1.0, (w,)).astype(np.float32)
  x = rng.standard_normal((rows, m), np.float32)
  impl = np.int32(_apply.APPLY_IMPLS[core])
  outs = []
  for target in (APPLY_TARGET, "signedcut_apply"):
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    outs.append(np.asarray(call(x, s, t, c, impl=impl, precision=np.int32(0))))
  np.testing.assert_array_equal(outs[0], outs[1])
