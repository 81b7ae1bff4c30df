"""The C++ FFI kernel against the jnp oracle, and every kernel implementation
against every other (scalar, AVX-512; one thread or several)."""

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax_signedcut as sc
from conftest import cuts
from jax_signedcut._kernels import greedy as _ffi
from jax_signedcut._signedcut import oracle as _oracle
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut import start as _start

needs_avx512 = pytest.mark.skipif(not _ffi.avx512_supported(),
                                  reason="this CPU lacks AVX-512 (F/BW/VL/DQ/VPOPCNTDQ)")
IMPLS = ["scalar", pytest.param("avx512", marks=needs_avx512)]


def gaussian(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def run_kernel(a, width, *, key=0, impl="auto", num_threads=0, max_error=None):
  """The kernel on one matrix (m, n) or a batch (N, m, n), start words from `key`."""
  a = jnp.asarray(a, jnp.float32)
  batched = a.ndim == 3
  a3 = a if batched else a[None]
  words = _start.start_words(jax.random.key(key), width, a.shape[-1])
  out = _ffi.greedy(a3, words, max_error=max_error, impl=impl, num_threads=num_threads)
  out = tuple(np.asarray(x) for x in out)
  return out if batched else tuple(x[0] for x in out)


def run_oracle(a, width, *, key=0, max_error=None):
  words = _start.start_words(jax.random.key(key), width, a.shape[-1])
  out = jax.jit(_oracle.greedy, static_argnames="max_error")(
      jnp.asarray(a, jnp.float32), words, max_error=max_error)
  return tuple(np.asarray(x) for x in out)


def fixed_point_check(a, s_bits, t_bits, c, num_cuts, rtol=2e-4):
  """Every cut is a fixed point of the alternation on its own remainder R_{j-1}
  (rebuilt in float64 from the earlier cuts) and c_j = s_jᵀ R_{j-1} t_j / (mn)."""
  a = np.asarray(a, np.float64)
  m, n = a.shape
  s = _packing.unpack_signs_np(s_bits, m).astype(np.float64)
  t = _packing.unpack_signs_np(t_bits, n).astype(np.float64)
  c = np.asarray(c, np.float64)
  r = a.copy()
  scale = np.abs(a).max() + 1e-30
  for j in range(int(num_cuts)):
    u, v = r @ t[j], s[j] @ r
    gamma = s[j] @ r @ t[j]
    np.testing.assert_allclose(c[j], gamma / (m * n), rtol=rtol, atol=1e-6 * scale,
                               err_msg=f"cut {j}")
    tol = 1e-4 * (np.abs(r).sum(axis=1).max() + 1e-30)   # near-ties: |u_i| ~ f32 noise
    assert np.all((np.sign(u) == s[j]) | (np.abs(u) <= tol) | ((u == 0) & (s[j] == 1))), j
    tol = 1e-4 * (np.abs(r).sum(axis=0).max() + 1e-30)
    assert np.all((np.sign(v) == t[j]) | (np.abs(v) <= tol) | ((v == 0) & (t[j] == 1))), j
    r = r - c[j] * np.outer(s[j], t[j])
  return np.sqrt((r ** 2).sum() / max((a ** 2).sum(), 1e-300))


def rel_err(a, out):
  m, n = a.shape
  f = sc.SignedCut(*(jnp.asarray(x) for x in out), shape=(m, n))
  return float(sc.relative_error(jnp.asarray(a), f))


# ------------------------------------------------------------ the extension


def test_extension_matches_installed_jaxlib_and_runs():
  import jaxlib.version

  from jax_signedcut import _signedcut_ffi

  # Built against the headers of exactly this jaxlib (pyproject pins both).
  assert _signedcut_ffi.built_with_jaxlib == jaxlib.version.__version__
  with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
    header = f.read()
  major = int(re.search(r"#define XLA_FFI_API_MAJOR (\d+)", header).group(1))
  minor = int(re.search(r"#define XLA_FFI_API_MINOR (\d+)", header).group(1))
  assert tuple(_signedcut_ffi.ffi_api_version) == (major, minor)
  # And XLA accepts the handler: a computation runs and gives a real cut.
  s_bits, t_bits, c, k = run_kernel(np.eye(3, dtype=np.float32), 2)
  assert int(k) == 2 and c[0] > 0
  assert _ffi.kernel_name() in ("scalar", "avx512")
  assert _ffi.kernel_name("scalar") == "scalar"


def test_env_override_and_bad_value():
  code = ("import jax, jax.numpy as jnp; from jax_signedcut._kernels import greedy as _ffi; from jax_signedcut._signedcut import start as _start;"
          "print(_ffi.kernel_name());"
          "_ffi.greedy(jnp.ones((1, 4, 4)), _start.start_words(jax.random.key(0), 2, 4))")
  env = dict(os.environ, JAX_SIGNEDCUT_KERNEL="scalar")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "scalar"
  env["JAX_SIGNEDCUT_KERNEL"] = "sse9"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode != 0
  assert "JAX_SIGNEDCUT_KERNEL must be 'scalar', 'avx512' or 'auto', got 'sse9'" in out.stderr


# ------------------------------------------------------------ exactness


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_matrix_first_cut_bit_identical_to_oracle(impl):
  # Entries in -8..8: every sum of the first cut is exact in f32.
  a = np.random.default_rng(0).integers(-8, 9, size=(64, 128)).astype(np.float32)
  got = run_kernel(a, 5, impl=impl)
  want = run_oracle(a, 5)
  for x, y in zip(got[:3], want[:3]):
    np.testing.assert_array_equal(x[:1], y[:1])
  assert int(got[3]) == int(want[3]) == 5


@needs_avx512
@pytest.mark.parametrize("shape,width", [((1, 1), 3), ((33, 97), 40), ((1000, 7), 70),
                                         ((17, 513), 35), ((300, 257), 70), ((3, 64, 48), 33)])
def test_avx512_bit_identical_to_scalar(shape, width):
  # Both tables use the same summation order (kernel.h), so every factor of
  # every cut matches, across pending-block flushes too (width > 32).
  a = gaussian(shape, seed=3)
  want = run_kernel(a, width, impl="scalar")
  got = run_kernel(a, width, impl="avx512")
  for x, y in zip(got, want):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("impl", IMPLS)
def test_threads_do_not_change_results(impl):
  # 300×257 is big enough for two threads to share one matrix; a batch of
  # three spreads whole matrices over threads instead.
  a = gaussian((300, 257), seed=4)
  one = run_kernel(a, 40, impl=impl, num_threads=1)
  two = run_kernel(a, 40, impl=impl, num_threads=2)
  three = run_kernel(a, 40, impl=impl, num_threads=3)
  for x, y, z in zip(one, two, three):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, z)
  b = gaussian((3, 40, 70), seed=5)
  batch = run_kernel(b, 20, impl=impl, num_threads=2)
  for i in range(3):
    single = run_kernel(b[i], 20, impl=impl, num_threads=1)
    for x, y in zip(batch, single):
      np.testing.assert_array_equal(x[i], y)


@given(m=st.integers(1, 70), n=st.integers(1, 90), width=st.integers(1, 45),
       seed=st.integers(0, 2**16), impl=st.sampled_from(["scalar", "auto"]))
@settings(derandomize=True, deadline=None, max_examples=20)
def test_every_cut_is_a_fixed_point(m, n, width, seed, impl):
  a = np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)
  s_bits, t_bits, c, k = run_kernel(a, width, key=seed, impl=impl)
  assert int(k) == width
  fixed_point_check(a, s_bits, t_bits, c, k)


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (50, 1), (33, 97), (1000, 7), (17, 513)])
def test_odd_shapes_match_oracle(shape):
  a = np.asarray(gaussian(shape, seed=6))
  width = 12
  got = run_kernel(a, width)
  want = run_oracle(a, width)
  fixed_point_check(a, *got)
  # The first cut is the same search from the same start; later cuts may part
  # ways on f32 near-ties, so only the error is compared.
  np.testing.assert_allclose(got[2][0], want[2][0], rtol=1e-5)
  np.testing.assert_allclose(rel_err(a, got), rel_err(a, want), rtol=1e-2, atol=1e-6)


@pytest.fixture(scope="module")
def gauss512():
  a = np.asarray(gaussian((512, 512), seed=1))
  return a, run_kernel(a, 3072), run_oracle(a, 1024)


def test_gaussian_512_error_figures(gauss512):
  a, f, _ = gauss512
  for w, bound in ((1024, 0.155), (2048, 0.025), (3072, 0.005)):
    err = rel_err(a, tuple(x[:w] for x in f[:3]) + (np.int32(w),))
    assert err <= bound, (w, err)
  assert int(f[3]) == 3072 and np.all(f[2] > 0)


def test_gaussian_512_error_within_one_percent_of_oracle(gauss512):
  a, f, o = gauss512
  for w in (256, 1024):
    got = rel_err(a, tuple(x[:w] for x in f[:3]) + (np.int32(w),))
    want = rel_err(a, tuple(x[:w] for x in o[:3]) + (np.int32(w),))
    assert abs(got - want) <= 0.01 * want, (w, got, want)


def test_prefix_property():
  a = gaussian((90, 110), seed=7)
  long = run_kernel(a, 100)
  short = run_kernel(a, 37)
  for x, y in zip(long[:3], short[:3]):
    np.testing.assert_array_equal(x[:37], y)


# ------------------------------------------------------------ through decompose


def test_auto_uses_the_kernel_on_cpu():
  a = gaussian((8, 9))
  text = jax.jit(lambda x: sc.decompose(x, key=jax.random.key(0), width=3)).lower(a).as_text()
  assert "signedcut_greedy" in text
  text = jax.jit(lambda x: sc.decompose(x, key=jax.random.key(0), width=3,
                                        backend="jnp")).lower(a).as_text()
  assert "signedcut_greedy" not in text


@pytest.mark.parametrize("backend", ["ffi", "auto"])
def test_jit_and_vmap_match_per_matrix_calls(backend):
  a = gaussian((3, 20, 45), seed=8)
  key = jax.random.key(0)
  each = [sc.decompose(a[i], key=key, width=9, backend=backend) for i in range(3)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *each)
  chex.assert_trees_all_equal(sc.decompose(a, key=key, width=9, backend=backend), stacked)
  run = jax.jit(jax.vmap(lambda x: sc.decompose(x, key=key, width=9, backend=backend)))
  chex.assert_trees_all_equal(run(a), stacked)
  # vmap over keys: the matrix is not batched (a size-1 batch dim for the kernel).
  keys = jax.random.split(key, 4)
  by_key = jax.vmap(lambda k: sc.decompose(a[0], key=k, width=9, backend=backend))(keys)
  for i in range(4):
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], by_key),
                                sc.decompose(a[0], key=keys[i], width=9, backend=backend))
  # Nested vmap, matrices outside and keys inside.
  nested = jax.vmap(lambda x: jax.vmap(
      lambda k: sc.decompose(x, key=k, width=9, backend=backend))(keys[:2]))(a)
  assert cuts(nested).s_bits.shape == (3, 2, 9, 1)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[2, 1], nested),
                              sc.decompose(a[2], key=keys[1], width=9, backend=backend))


def test_vmap_batched_key_and_matrix_with_batch_dims():
  a = gaussian((2, 3, 16, 40), seed=9)
  keys = jax.random.split(jax.random.key(1), 6).reshape(2, 3)
  f = jax.vmap(lambda x, k: sc.decompose(x, key=k, width=5, backend="ffi"))(a, keys)
  g = sc.decompose(a, key=keys, width=5, backend="ffi")
  chex.assert_trees_all_equal(f, g)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1, 2], g),
                              sc.decompose(a[1, 2], key=keys[1, 2], width=5, backend="ffi"))


def test_ffi_close_to_jnp_backend_through_decompose():
  a = gaussian((4, 40, 60), seed=10)
  f = sc.decompose(a, key=jax.random.key(2), width=50, backend="ffi")
  g = sc.decompose(a, key=jax.random.key(2), width=50, backend="jnp")
  np.testing.assert_allclose(sc.relative_error(a, f), sc.relative_error(a, g), rtol=1e-2)
  np.testing.assert_array_equal(cuts(f).s_bits[:, 0], cuts(g).s_bits[:, 0])


def test_max_error_early_stop_matches_oracle():
  a = np.asarray(gaussian((40, 70), seed=11))
  got = run_kernel(a, 300, max_error=0.3)
  want = run_oracle(a, 300, max_error=0.3)
  k = int(got[3])
  assert abs(k - int(want[3])) <= 1 and 0 < k < 300
  assert rel_err(a, got) <= 0.3 < rel_err(a, tuple(x[:k - 1] for x in got[:3]) + (k - 1,))
  # Unused slots: zero bits and c = 0.
  assert not got[0][k:].any() and not got[1][k:].any() and not got[2][k:].any()
  # A target met before any cut: no cut at all.
  f = sc.decompose(a, key=jax.random.key(0), width=10, max_error=1.0, backend="ffi")
  assert int(cuts(f).num_cuts) == 0 and not np.asarray(cuts(f).c).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_matrix_gives_zero_cuts_not_nan(impl):
  words = _start.start_words(jax.random.key(0), 40, 9)
  s_bits, t_bits, c, k = (np.asarray(x) for x in _ffi.greedy(jnp.zeros((1, 5, 9)), words,
                                                              impl=impl))
  assert int(k[0]) == 40 and np.all(c == 0) and not np.isnan(c).any()
  assert not s_bits.any()
  np.testing.assert_array_equal(t_bits[0], np.asarray(words))   # the start is kept, as in the oracle


def test_determinism():
  a = gaussian((64, 80), seed=12)
  chex.assert_trees_all_equal(sc.decompose(a, key=jax.random.key(3), width=40, backend="ffi"),
                              sc.decompose(a, key=jax.random.key(3), width=40, backend="ffi"))


# Bad input and non-finite matrices: test_core.py runs those tests on every backend.


def test_greedy_rejects_bad_operands_before_the_call():
  words = _start.start_words(jax.random.key(0), 3, 40)
  with pytest.raises(TypeError, match="a must be float32, got float64|a must be float32"):
    _ffi.greedy(np.ones((1, 4, 40), np.float16), words)
  with pytest.raises(TypeError, match="words must be uint32, got int32"):
    _ffi.greedy(jnp.ones((1, 4, 40)), jnp.zeros((3, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"a must have shape \(N, m, n\)"):
    _ffi.greedy(jnp.ones((4, 40)), words)
  with pytest.raises(ValueError, match=r"words must have shape \(w, 2\) or \(2, w, 2\)"):
    _ffi.greedy(jnp.ones((2, 4, 40)), jnp.zeros((3, 3), jnp.uint32))
  with pytest.raises(ValueError, match=r"words must have shape"):
    _ffi.greedy(jnp.ones((2, 4, 40)), jnp.zeros((3, 3, 2), jnp.uint32))
  with pytest.raises(ValueError, match="impl must be one of"):
    _ffi.greedy(jnp.ones((1, 4, 40)), words, impl="neon")
  with pytest.raises(ValueError, match="num_threads must be an int in 0..256, got -1"):
    _ffi.greedy(jnp.ones((1, 4, 40)), words, num_threads=-1)


def test_threads_env_var_gives_the_same_factors():
  # JAX_SIGNEDCUT_THREADS=2 lets two threads share this single matrix.
  code = ("import hashlib, jax, numpy as np; from jax_signedcut._kernels import greedy as _ffi; from jax_signedcut._signedcut import start as _start;"
          "a = jax.random.normal(jax.random.key(4), (1, 300, 257));"
          "out = _ffi.greedy(a, _start.start_words(jax.random.key(0), 40, 257));"
          "print(hashlib.sha256(b''.join(np.asarray(x).tobytes() for x in out)).hexdigest())")
  env = dict(os.environ, JAX_SIGNEDCUT_THREADS="2")
  got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert got.returncode == 0, got.stderr
  a = jax.random.normal(jax.random.key(4), (1, 300, 257))
  out = _ffi.greedy(a, _start.start_words(jax.random.key(0), 40, 257), num_threads=1)
  import hashlib
  want = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in out)).hexdigest()
  assert got.stdout.strip() == want


# sha256 (first 16 hex digits) of (s_bits, t_bits, c, num_cuts) from the release
# kernel (commit 6afb051), scalar and AVX-512 alike: faster kernels must give the
# same bits for the same key. (Widths past 32 cross flushes of the pending block.)
RELEASE_FACTORS = [
    ((1, 1), 3, 0, "2ea83602240d86db"),
    ((33, 97), 40, 1, "fa61b6b92c8a669e"),
    ((97, 33), 70, 2, "039d5b92ad0934ea"),
    ((300, 257), 100, 3, "24bd83074549123d"),
    ((2, 64, 70), 35, 4, "bbb5667526ce4790"),
    ((520, 1030), 80, 5, "44a0d3e486bddf19"),
    ((300, 4100), 100, 6, "447b36869b7bc915"),
    ((1000, 7), 70, 7, "d511c0e02de18ff2"),
]


@pytest.mark.parametrize("shape,width,seed,digest", RELEASE_FACTORS)
@pytest.mark.parametrize("impl", ["scalar", pytest.param("avx512", marks=needs_avx512)])
def test_factors_bit_identical_to_the_release(shape, width, seed, digest, impl):
  import hashlib  # noqa: PLC0415
  a = jax.random.normal(jax.random.key(seed + 10), shape, jnp.float32)
  a = a if a.ndim == 3 else a[None]
  words = _start.start_words(jax.random.key(seed), width, shape[-1])
  h = hashlib.sha256()
  for x in _ffi.greedy(a, words, impl=impl):
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  assert h.hexdigest()[:16] == digest
