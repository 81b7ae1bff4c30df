"""The numeric contract (docs/numerics.md): finite factors for every finite input,
exact power-of-two scaling, and where the backends agree bit for bit."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cuts, part

import jax_signedcut as sc
from jax_signedcut._kernels import extension as _extension
from jax_signedcut._core import scaling
from jax_signedcut._signedcut import oracle, start

BACKENDS = ["jnp"] + (["ffi"] if _extension.available() else [])
KEY = jax.random.key(0)
F32_MAX = float(np.finfo(np.float32).max)


def _rng(seed=0):
  return np.random.default_rng(seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value,shape", [(1e37, (8, 6)), (4e33, (300, 300)), (F32_MAX, (5, 7))])
def test_huge_constant_matrix_gives_finite_exact_factors(backend, value, shape):
  a = np.full(shape, value, np.float32)
  f = cuts(sc.decompose(a, key=KEY, width=2, backend=backend))
  c = np.asarray(f.c)
  assert np.all(np.isfinite(c))
  # A constant matrix is one cut: c_0 is its value (up to float32 rounding of the sums).
  np.testing.assert_allclose(c[0], np.float32(value), rtol=1e-5)
  assert float(sc.relative_error(a, f)) < 1e-5


@pytest.mark.parametrize("scale", [2.0**40, 2.0**-40, 2.0**100, 2.0**-100])
@pytest.mark.parametrize("backend", BACKENDS)
def test_power_of_two_scaling_is_exact(backend, scale):
  """decompose(2^p·A) is decompose(A) with c·2^p, bit for bit (the greedy is equivariant)."""
  a = _rng(1).standard_normal((33, 17)).astype(np.float32)
  f = cuts(sc.decompose(a, key=KEY, width=12, backend=backend, outliers=0))
  g = cuts(sc.decompose(a * np.float32(scale), key=KEY, width=12, backend=backend, outliers=0))
  np.testing.assert_array_equal(np.asarray(g.s_bits), np.asarray(f.s_bits))
  np.testing.assert_array_equal(np.asarray(g.t_bits), np.asarray(f.t_bits))
  np.testing.assert_array_equal(np.asarray(g.c), np.asarray(f.c) * np.float32(scale))


def test_max_error_with_huge_entries_backends_agree():
  if "ffi" not in BACKENDS:
    pytest.skip("needs the compiled extension")
  a = _rng(0).standard_normal((64, 48)).astype(np.float32) * np.float32(1e20)
  got = [int(cuts(sc.decompose(a, key=KEY, width=8, max_error=0.01, backend=b,
                               outliers=0)).num_cuts) for b in ("ffi", "jnp")]
  assert got == [8, 8]
  # With a sparse part the accounting uses ‖A·2⁻ᵏ‖², which cannot overflow either.
  a.reshape(-1)[:3] = 3e38
  for b in BACKENDS:
    f = sc.decompose(a, key=KEY, width=8, max_error=0.5, backend=b)
    assert np.all(np.isfinite(np.asarray(cuts(f).c)))
    assert float(sc.relative_error(a, f)) <= 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_huge_entry_sparse_values_exact(backend):
  a = _rng(2).standard_normal((40, 30)).astype(np.float32)
  a[3, 4] = 3e38
  f = sc.decompose(a, key=KEY, width=16, backend=backend)
  sp = part(f, sc.Sparse)
  assert int(sp.count) == 1
  assert int(sp.idx[0]) == 3 * 30 + 4
  assert np.asarray(sp.val)[0] == np.float32(3e38)        # the value itself, unscaled
  # The cuts are those of the remainder, untouched by the scaling (k = 0 there).
  rem = a.copy()
  rem[3, 4] = 0
  g = sc.decompose(rem, key=KEY, width=16, backend=backend, outliers=0)
  np.testing.assert_array_equal(np.asarray(cuts(f).c), np.asarray(g.c))


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_matrix_warns(backend):
  a = (_rng(3).standard_normal((16, 12)) * 1e-39).astype(np.float32)
  with pytest.warns(UserWarning, match="normal range"):
    f = cuts(sc.decompose(a, key=KEY, width=4, backend=backend, outliers=0))
  assert np.all(np.asarray(f.c) == 0)
  # Just above the normal range the scaling recovers full precision.
  b = a * np.float32(2.0**60)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    g = cuts(sc.decompose(b, key=KEY, width=4, backend=backend, outliers=0))
  assert np.all(np.asarray(g.c) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_lowrank_is_finite(backend):
  a = (_rng(4).standard_normal((24, 20)) * 1e36).astype(np.float32)
  f = sc.decompose(a, key=KEY, width=8, lowrank=2, outliers=0, backend=backend)
  lr = part(f, sc.LowRankPart)
  assert np.all(np.isfinite(np.asarray(lr.u, np.float32)))
  assert np.all(np.isfinite(np.asarray(cuts(f).c)))
  assert float(sc.relative_error(a, f)) < 1.0


@pytest.mark.parametrize("shape", [(6, 5), (7, 9), (33, 17), (100, 70), (8, 8)])
def test_integer_inputs_first_cut_kernel_equals_oracle(shape):
  """c = γ/(mn) is a true division in both, so any m·n agrees (not just powers of two)."""
  if "ffi" not in BACKENDS:
    pytest.skip("needs the compiled extension")
  a = _rng(5).integers(-8, 9, shape).astype(np.float32)
  f = sc.decompose(a, key=KEY, width=1, backend="ffi", outliers=0)
  g = sc.decompose(a, key=KEY, width=1, backend="jnp", outliers=0)
  np.testing.assert_array_equal(np.asarray(f.c).view(np.uint32), np.asarray(g.c).view(np.uint32))
  np.testing.assert_array_equal(np.asarray(f.s_bits), np.asarray(g.s_bits))


def test_oracle_vmap_matches_per_matrix():
  a = _rng(6).standard_normal((3, 45, 31)).astype(np.float32)
  words = start.start_words(KEY, 10, 31)
  batched = jax.jit(jax.vmap(oracle.greedy, in_axes=(0, None)))(a, words)
  for i in range(3):
    one = jax.jit(oracle.greedy)(a[i], words)
    for x, y in zip(batched, one):
      np.testing.assert_array_equal(np.asarray(x[i]), np.asarray(y))


def test_ldexp_exact_and_flushes():
  x = np.array([1.0, -3.5, 1e-40, -1e-45, 0.0, F32_MAX, np.inf, np.nan], np.float32)
  up = np.asarray(scaling.ldexp(x, jnp.int32(10)))
  np.testing.assert_array_equal(up[:3], (x[:3].astype(np.float64) * 1024).astype(np.float32))
  assert up[3] == 0 and np.signbit(up[3]) and up[4] == 0  # still subnormal: flushed, sign kept
  assert up[5] == np.float32(F32_MAX)                     # saturates instead of inf
  assert np.isinf(up[6]) and np.isnan(up[7])              # non-finite passes through
  down = np.asarray(scaling.ldexp(x, jnp.int32(-140)))
  assert down[2] == 0 and down[0] == 0 and np.signbit(down[1])  # flushed, sign kept
  assert int(scaling.max_exponent(np.array([[1e-40, 0.0]], np.float32), (0, 1))) == -133
  assert int(scaling.exponent(np.ones((1, 2, 2), np.float32))[0]) == 0
