"""Core API: budgets, packing, the jnp oracle's contract, jit/vmap, bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax_signedcut as sc
from conftest import cuts, part
from jax_signedcut._signedcut import oracle as _oracle
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut import start as _start


def gaussian(shape, seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def cut_check(a, f, rtol=2e-4):
  """Every cut is a fixed point of the alternation on its own remainder, with
  c_j = s_jᵀ R t_j / (mn); the remainder is rebuilt in float64 from earlier cuts."""
  a = np.asarray(a, np.float64)
  m, n = a.shape
  s = _packing.unpack_signs_np(cuts(f).s_bits, m).astype(np.float64)
  t = _packing.unpack_signs_np(cuts(f).t_bits, n).astype(np.float64)
  c = np.asarray(cuts(f).c, np.float64)
  r = a.copy()
  scale = np.abs(a).max()
  for j in range(int(cuts(f).num_cuts)):
    u, v = r @ t[j], s[j] @ r
    gamma = s[j] @ r @ t[j]
    np.testing.assert_allclose(c[j], gamma / (m * n), rtol=rtol, atol=1e-6 * scale)
    # sgn(u) == s up to near-ties (entries of u within f32 noise of 0).
    tol = 1e-4 * (np.abs(r).sum(axis=1).max() + 1e-30)
    assert np.all((np.sign(u) == s[j]) | (np.abs(u) <= tol) | ((u == 0) & (s[j] == 1))), j
    tol = 1e-4 * (np.abs(r).sum(axis=0).max() + 1e-30)
    assert np.all((np.sign(v) == t[j]) | (np.abs(v) <= tol) | ((v == 0) & (t[j] == 1))), j
    r = r - c[j] * np.outer(s[j], t[j])


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("m,n,rate,expected", [(4096, 4096, 0.5, 16320),
                                               (14336, 4096, 0.5, 25442)])
def test_width_for_rate_reference_figures(m, n, rate, expected):
  assert sc.width_for_rate(m, n, rate) == expected
  # Rate r of bf16 is 16 r bits per weight.
  assert sc.width_for_bits(m, n, 16 * rate) == expected


@given(m=st.integers(1, 5000), n=st.integers(1, 5000), bits=st.floats(0.01, 32))
@settings(derandomize=True, deadline=None, max_examples=200)
def test_width_for_bits_fits_budget(m, n, bits):
  budget = bits * m * n / 8
  try:
    w = sc.width_for_bits(m, n, bits)
  except ValueError as e:
    assert "does not pay for one cut" in str(e)
    assert budget < sc.bytes_per_cut(m, n)
    return
  assert w * sc.bytes_per_cut(m, n) <= budget < (w + 1) * sc.bytes_per_cut(m, n)
  # Our uint32 packing never stores more than the accounting charges.
  assert 4 * (math.ceil(m / 32) + math.ceil(n / 32)) + 4 <= sc.bytes_per_cut(m, n)


@pytest.mark.parametrize("fn,arg,bad", [
    (sc.width_for_rate, "rate", 0), (sc.width_for_rate, "rate", -1.0),
    (sc.width_for_rate, "rate", float("nan")), (sc.width_for_bits, "bits_per_weight", 0),
    (sc.width_for_bits, "bits_per_weight", float("inf"))])
def test_budget_bad_values(fn, arg, bad):
  with pytest.raises(ValueError, match=arg):
    fn(64, 64, bad)


# ---------------------------------------------------------------- packing


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 130)), seed=st.integers(0, 2**16))
@settings(derandomize=True, deadline=None, max_examples=20)
def test_pack_unpack_roundtrip(shape, seed):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  x[x > 1.5] = 0.0                                    # sgn(0) = +1
  words = np.asarray(sc.pack_signs(jnp.asarray(x)))
  assert words.dtype == np.uint32 and words.shape == (shape[0], math.ceil(shape[1] / 32))
  expected = np.where(x < 0, -1, 1)
  np.testing.assert_array_equal(np.asarray(sc.unpack_signs(jnp.asarray(words), shape[1])),
                                expected)
  # Layout: element i is bit i % 32 of word i // 32; bit 1 means -1; tail bits 0.
  for i in range(shape[1]):
    bit = (words[:, i // 32] >> np.uint32(i % 32)) & 1
    np.testing.assert_array_equal(bit, (x[:, i] < 0).astype(np.uint32))
  tail = shape[1] % 32
  if tail:
    assert np.all(words[:, -1] >> np.uint32(tail) == 0)
  # The NumPy twins (used by eager pipelines of changing shapes) give the same words / signs.
  from jax_signedcut._signedcut import packing  # noqa: PLC0415
  np.testing.assert_array_equal(packing.pack_signs_np(x), words)
  np.testing.assert_array_equal(packing.unpack_signs_np(words, shape[1]), expected)


def test_start_words_prefix_and_tail():
  k = jax.random.key(3)
  w10 = np.asarray(sc.start_words(k, 10, 70))
  w4 = np.asarray(sc.start_words(k, 4, 70))
  np.testing.assert_array_equal(w10[:4], w4)
  assert np.all(w10[:, -1] >> np.uint32(70 % 32) == 0)
  # Documented derivation.
  expected = jax.random.bits(jax.random.fold_in(k, 7), (3,), jnp.uint32)
  np.testing.assert_array_equal(w10[7, :2], np.asarray(expected)[:2])


# ---------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def gauss512():
  a = gaussian((512, 512))
  return a, sc.decompose(a, key=jax.random.key(0), width=3072, backend="jnp")


def test_gaussian_512_error_figures(gauss512):
  a, f = gauss512
  # Reference implementation: 0.149 / 0.022 / 0.0033.
  for w, bound in ((1024, 0.155), (2048, 0.025), (3072, 0.005)):
    err = float(sc.relative_error(a, sc.truncate(f, w)))
    assert err <= bound, (w, err)
  assert int(cuts(f).num_cuts) == 3072
  assert np.all(np.asarray(cuts(f).c) > 0)


def test_prefix_property(gauss512):
  a, f = gauss512
  g = sc.decompose(a, key=jax.random.key(0), width=200, backend="jnp")
  chex.assert_trees_all_equal(sc.truncate(f, 200), g)


def test_cuts_are_fixed_points_with_exact_scale():
  a = gaussian((40, 70), seed=5)
  f = sc.decompose(a, key=jax.random.key(2), width=60, backend="jnp")
  cut_check(a, f)


def test_error_decreases_and_frobenius_identity():
  a = gaussian((64, 96), seed=7)
  f = sc.decompose(a, key=jax.random.key(2), width=64, backend="jnp")
  errs = [float(sc.relative_error(a, sc.truncate(f, k))) for k in range(1, 65, 7)]
  assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))
  # ‖R_w‖² = ‖A‖² − Σ γ_j²/(mn) = ‖A‖² − mn Σ c_j².
  c = np.asarray(cuts(f).c, np.float64)
  a64 = np.asarray(a, np.float64)
  r2 = (a64 ** 2).sum() - 64 * 96 * (c ** 2).sum()
  np.testing.assert_allclose(float(sc.relative_error(a, f)) ** 2,
                             r2 / (a64 ** 2).sum(), rtol=1e-3)


def test_determinism_and_key_dependence():
  a = gaussian((33, 97))
  f1 = sc.decompose(a, key=jax.random.key(11), width=12, backend="jnp")
  f2 = sc.decompose(a, key=jax.random.key(11), width=12, backend="jnp")
  f3 = sc.decompose(a, key=jax.random.key(12), width=12, backend="jnp")
  chex.assert_trees_all_equal(f1, f2)
  assert not np.array_equal(np.asarray(cuts(f1).t_bits), np.asarray(cuts(f3).t_bits))
  # Raw uint32 keys are accepted and mean the same key.
  f4 = sc.decompose(a, key=jax.random.key_data(jax.random.key(11)), width=12, backend="jnp")
  chex.assert_trees_all_equal(f1, f4)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (33, 97), (1000, 7)])
def test_odd_shapes(shape):
  a = gaussian(shape, seed=sum(shape))
  f = sc.decompose(a, key=jax.random.key(0), width=6, backend="jnp")
  assert f.shape == shape
  assert cuts(f).s_bits.shape == (6, math.ceil(shape[0] / 32))
  assert cuts(f).t_bits.shape == (6, math.ceil(shape[1] / 32))
  assert np.all(np.isfinite(np.asarray(cuts(f).c)))
  cut_check(a, f)
  err = float(sc.relative_error(a, f))
  assert err < 1.0
  if shape == (1, 1):
    assert err < 1e-6                  # one cut is exact for a scalar
  if 1 in shape:
    # A vector is one cut: s = sgn(a), c = mean |a|... and the remainder keeps shrinking.
    assert float(sc.relative_error(a, sc.truncate(f, 1))) < 1.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_inputs_compute_in_f32(dtype):
  a = gaussian((48, 40), seed=3)
  f = sc.decompose(a.astype(dtype), key=jax.random.key(0), width=30, backend="jnp")
  g = sc.decompose(a.astype(dtype).astype(jnp.float32), key=jax.random.key(0), width=30,
                   backend="jnp")
  chex.assert_trees_all_equal(f, g)
  assert cuts(f).c.dtype == jnp.float32
  assert sc.reconstruct(f, jnp.bfloat16).dtype == jnp.bfloat16


def test_zero_matrix_gives_zero_cuts_not_nan():
  f = sc.decompose(jnp.zeros((16, 24)), key=jax.random.key(0), width=4, backend="jnp")
  assert np.all(np.asarray(cuts(f).c) == 0)
  assert float(sc.relative_error(jnp.zeros((16, 24)), f)) == 0.0
  g = sc.decompose(jnp.zeros((16, 24)), key=jax.random.key(0), width=4, max_error=0.1,
                   backend="jnp")
  assert int(cuts(g).num_cuts) == 0 and np.all(np.asarray(cuts(g).c) == 0)


def test_integer_valued_matrix_cut_is_exact():
  a = jax.random.randint(jax.random.key(4), (64, 128), -8, 9).astype(jnp.float32)
  f = sc.decompose(a, key=jax.random.key(1), width=1, backend="jnp")
  s = _packing.unpack_signs_np(cuts(f).s_bits[0], 64).astype(np.int64)
  t = _packing.unpack_signs_np(cuts(f).t_bits[0], 128).astype(np.int64)
  gamma = int(s @ np.asarray(a, np.int64) @ t)
  assert float(cuts(f).c[0]) == np.float32(np.float32(gamma) / np.float32(64 * 128))


def test_max_error_early_stop():
  a = gaussian((64, 64), seed=9)
  f = sc.decompose(a, key=jax.random.key(0), width=400, max_error=0.2, backend="jnp")
  k = int(cuts(f).num_cuts)
  assert 0 < k < 400
  assert float(sc.relative_error(a, f)) <= 0.2
  assert float(sc.relative_error(a, sc.truncate(f, k - 1))) > 0.2
  assert np.all(np.asarray(cuts(f).c)[k:] == 0) and np.all(np.asarray(cuts(f).s_bits)[k:] == 0)
  # The first k cuts are those of the plain run.
  g = sc.decompose(a, key=jax.random.key(0), width=k, backend="jnp")
  chex.assert_trees_all_equal(sc.truncate(f, k), g)
  # A max_error that A itself meets takes no cut.
  assert int(cuts(sc.decompose(a, key=jax.random.key(0), width=5, max_error=1.0,
                               backend="jnp")).num_cuts) == 0


# ---------------------------------------------------------------- transformations


def test_batch_equals_per_matrix_and_vmap():
  a = gaussian((3, 20, 30), seed=2)
  key = jax.random.key(5)
  fb = sc.decompose(a, key=key, width=9, backend="jnp")
  assert cuts(fb).c.shape == (3, 9) and cuts(fb).num_cuts.shape == (3,)
  for i in range(3):
    fi = sc.decompose(a[i], key=key, width=9, backend="jnp")
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], fb), fi)
  fv = jax.vmap(lambda x: sc.decompose(x, key=key, width=9, backend="jnp"))(a)
  chex.assert_trees_all_equal(fv, fb)
  # Batched keys: one key per matrix, also through vmap over keys.
  keys = jax.random.split(key, 3)
  fk = sc.decompose(a, key=keys, width=9, backend="jnp")
  fkv = jax.vmap(lambda x, k: sc.decompose(x, key=k, width=9, backend="jnp"))(a, keys)
  chex.assert_trees_all_equal(fk, fkv)
  f1 = sc.decompose(a[1], key=keys[1], width=9, backend="jnp")
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], fk), f1)
  # vmap over keys only, nested vmap over a (2, 3, m, n) stack.
  fks = jax.vmap(lambda k: sc.decompose(a[0], key=k, width=9, backend="jnp"))(keys)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[2], fks),
                              sc.decompose(a[0], key=keys[2], width=9, backend="jnp"))
  a4 = jnp.stack([a, a[::-1]])
  fn = jax.vmap(jax.vmap(lambda x: sc.decompose(x, key=key, width=9, backend="jnp")))(a4)
  chex.assert_trees_all_equal(fn, sc.decompose(a4, key=key, width=9, backend="jnp"))
  np.testing.assert_allclose(np.asarray(sc.reconstruct(fb))[2],
                             np.asarray(sc.reconstruct(jax.tree.map(lambda x: x[2], fb))))


@pytest.mark.parametrize("backend", ["jnp", "auto"])
def test_jit_matches_eager_and_compiles_once(backend):
  a = gaussian((30, 50), seed=8)
  eager = sc.decompose(a, key=jax.random.key(0), width=7, backend=backend)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x, k):
    return sc.decompose(x, key=k, width=7, backend=backend)

  chex.assert_trees_all_equal(run(a, jax.random.key(0)), eager)
  run(a + 1.0, jax.random.key(1))     # same shapes: no retrace (assert_max_traces)
  chex.clear_trace_counter()


def test_eager_calls_do_not_recompile():
  a = gaussian((20, 20), seed=1)
  b, k1 = a * 2, jax.random.key(1)
  sc.decompose(a, key=jax.random.key(0), width=3, backend="jnp")
  with jax.log_compiles(True):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
      sc.decompose(b, key=k1, width=3, backend="jnp")
    finally:
      logger.removeHandler(handler)
  compiles = [r for r in records if "Compiling" in r.getMessage()]
  assert not compiles, [r.getMessage() for r in compiles]


@pytest.mark.parametrize("backend", ["jnp", "ffi"])
def test_non_finite_under_jit_is_visible(backend):
  a = gaussian((8, 8)).at[2, 3].set(jnp.nan)
  f = jax.jit(lambda x: sc.decompose(x, key=jax.random.key(0), width=3, backend=backend))(a)
  assert np.all(np.isnan(np.asarray(cuts(f).c))) and int(cuts(f).num_cuts) == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("a,exc,match", [
    (np.ones((4, 4), np.int32), TypeError, "dtype int32"),
    (np.ones((4, 4), np.complex64), TypeError, "dtype complex64"),
    (np.ones((4, 4), bool), TypeError, "dtype bool"),
    (np.ones((4,), np.float32), ValueError, r"ndim >= 2, got shape \(4,\)"),
    (np.ones((0, 4), np.float32), ValueError, r"empty, got shape \(0, 4\)"),
    (np.ones((2, 3, 0), np.float32), ValueError, "empty"),
    (np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), ValueError, r"a\[0, 1\] = nan"),
    (np.array([[1.0, 2.0], [np.inf, 1.0]], np.float32), ValueError, "non-finite"),
])
@pytest.mark.parametrize("backend", ["jnp", "ffi", "auto"])
def test_bad_matrix(a, exc, match, backend):
  with pytest.raises(exc, match=match):
    sc.decompose(a, key=jax.random.key(0), width=2, backend=backend)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(), ValueError, "exactly one of width, rate, bits_per_weight must be given, got none"),
    (dict(width=3, rate=0.5), ValueError, "got width=3, rate=0.5"),
    (dict(width=0), ValueError, "width must be an int >= 1, got 0"),
    (dict(width=-4), ValueError, "width must be an int >= 1, got -4"),
    (dict(width=2.5), TypeError, "width must be an int"),
    (dict(rate=1e-6), ValueError, "rate=1e-06 gives width 0"),
    (dict(bits_per_weight=0.01), ValueError, "bits_per_weight=0.01 gives width 0"),
    (dict(width=3, max_error=0), ValueError, "max_error must be a finite number > 0, got 0"),
    (dict(width=3, max_error=-0.1), ValueError, "max_error"),
    (dict(max_error=0.1), ValueError, "got none"),
    (dict(width=3, backend="cuda"), ValueError, "backend must be one of"),
])
@pytest.mark.parametrize("backend", ["jnp", "ffi"])
def test_bad_config(kwargs, exc, match, backend):
  with pytest.raises(exc, match=match):
    sc.decompose(np.ones((16, 16), np.float32), key=jax.random.key(0),
                 **{"backend": backend, **kwargs})


def test_bad_key():
  with pytest.raises(TypeError, match="key must be a jax.random.key"):
    sc.decompose(np.ones((4, 4), np.float32), key=3, width=1)
  with pytest.raises(ValueError, match=r"key must have shape \(\) or the batch shape \(2,\)"):
    sc.decompose(np.ones((2, 4, 4), np.float32), key=jax.random.split(jax.random.key(0), 3),
                 width=1)


def test_factor_helpers_validate():
  f = sc.decompose(gaussian((8, 8)), key=jax.random.key(0), width=4, backend="jnp")
  with pytest.raises(ValueError, match="k must be an int in 1..4"):
    sc.truncate(f, 5)
  with pytest.raises(ValueError, match="k must be an int in 1..4"):
    sc.truncate(f, 0)
  with pytest.raises(ValueError, match=r"a has shape \(8, 9\)"):
    sc.relative_error(jnp.ones((8, 9)), f)
  with pytest.raises(TypeError, match="compressed matrix"):
    sc.reconstruct(np.ones((3, 3)))
  assert sc.nbytes(f) == 4 * (4 * (1 + 1) + 4)


def test_oracle_round_cap_is_documented():
  assert _oracle.MAX_ROUNDS >= 100
  assert "MAX_ROUNDS" in _oracle.__doc__
  assert _start.start_words.__doc__
