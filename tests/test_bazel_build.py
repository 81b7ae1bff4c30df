"""The library BUILD.bazel builds gives the same factors as the pip-built one.

CI builds it first with `.ci/bazel.sh` and exports its path as
JAX_SIGNEDCUT_BAZEL_LIB; without it the default bazel-bin/ location is tried,
and the test is skipped only when no library exists there.
"""

import ctypes
import os
import pathlib

import jax
import numpy as np
import pytest

from jax_signedcut._kernels import greedy as _ffi
from jax_signedcut._signedcut import start as _start

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIB = os.environ.get("JAX_SIGNEDCUT_BAZEL_LIB", str(ROOT / "bazel-bin" / "libsignedcut_ffi.so"))
TARGET = "signedcut_greedy_bazel"


@pytest.fixture(scope="module")
def bazel_target():
  if not os.path.exists(LIB):
    pytest.skip(f"no Bazel-built library at {LIB} (build it with .ci/bazel.sh and set "
                "JAX_SIGNEDCUT_BAZEL_LIB)")
  lib = ctypes.cdll.LoadLibrary(LIB)
  # Its own target name: the pip build's handler is registered as
  # "signedcut_greedy", and one name may only ever map to one handler.
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SignedCutGreedy), platform="cpu")
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
