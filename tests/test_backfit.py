"""sc.backfit: every cut re-optimised against all the others (opt-in post-processing)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax_signedcut as sc
from conftest import cuts, part
from jax_signedcut._signedcut import packing as _packing


rel_error = jax.jit(sc.relative_error)   # eager, it would trace op by op on every call


def gaussian(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def low_rank(m, n, rank=3, seed=2):
  """A smooth-ish low-rank matrix plus a little noise: where the greedy is weakest."""
  u = gaussian((m, rank), seed)
  v = gaussian((rank, n), seed + 1)
  return u @ v + 0.05 * gaussian((m, n), seed + 2)


def dense_cuts(f):
  """(s (k, m), t (k, n), c (k,)) float64 of the used cuts of an unbatched f."""
  m, n = f.shape
  k = int(cuts(f).num_cuts)
  s = _packing.unpack_signs_np(cuts(f).s_bits, m)[:k].astype(np.float64)
  t = _packing.unpack_signs_np(cuts(f).t_bits, n)[:k].astype(np.float64)
  return s, t, np.asarray(cuts(f).c, np.float64)[:k]


def sparse_dense(f):
  m, n = f.shape
  out = np.zeros(m * n)
  if part(f, sc.Sparse) is not None:
    k = int(part(f, sc.Sparse).count)
    out[np.asarray(part(f, sc.Sparse).idx)[:k]] = np.asarray(part(f, sc.Sparse).val, np.float64)[:k]
  return out.reshape(m, n)


def check_one_pass(a, f, g, rtol=2e-4):
  """Oracle for one pass, replayed in float64: cut k of g is a fixed point of the
  alternation on R_k = A − sparse − (new cuts < k) − (old cuts > k), its scale is the
  exact projection s_kᵀ R_k t_k / (mn) ≥ 0, and it fits R_k at least as well as the
  old cut k did."""
  a = np.asarray(a, np.float64) - sparse_dense(f)
  m, n = a.shape
  s0, t0, c0 = dense_cuts(f)
  s1, t1, c1 = dense_cuts(g)
  scale = np.abs(a).max()
  for k in range(len(c0)):
    r = (a - np.einsum("j,jm,jn->mn", c1[:k], s1[:k], t1[:k])
         - np.einsum("j,jm,jn->mn", c0[k + 1:], s0[k + 1:], t0[k + 1:]))
    gamma = s1[k] @ r @ t1[k]
    np.testing.assert_allclose(c1[k], gamma / (m * n), rtol=rtol, atol=1e-6 * scale)
    assert c1[k] >= 0
    u, v = r @ t1[k], s1[k] @ r
    tol = 1e-4 * np.abs(r).sum(axis=1).max()
    assert np.all((np.sign(u) == s1[k]) | (np.abs(u) <= tol)), k
    tol = 1e-4 * np.abs(r).sum(axis=0).max()
    assert np.all((np.sign(v) == t1[k]) | (np.abs(v) <= tol)), k
    new = np.linalg.norm(r - c1[k] * np.outer(s1[k], t1[k]))
    old = np.linalg.norm(r - c0[k] * np.outer(s0[k], t0[k]))
    assert new <= old * (1 + 1e-5) + 1e-6 * scale, (k, new, old)


@pytest.fixture(scope="module")
def with_sparse():
  """A low-rank matrix with a sparse part, its greedy factors and one backfit pass."""
  a = low_rank(64, 33)
  f = sc.decompose(a, key=jax.random.key(3), width=30, outliers=0.02, backend="jnp")
  return a, f, sc.backfit(f, a)


def test_one_pass_matches_float64_oracle(with_sparse):
  check_one_pass(*with_sparse)


@pytest.mark.parametrize("shape,width", [((37, 50), 20), ((1, 9), 3)])
def test_one_pass_matches_float64_oracle_odd_shapes(shape, width):
  a = low_rank(*shape) if min(shape) > 1 else gaussian(shape)
  f = sc.decompose(a, key=jax.random.key(0), width=width, outliers=0, backend="jnp")
  check_one_pass(a, f, sc.backfit(f, a))


def test_format_and_sparse_part_are_kept(with_sparse):
  _, f, g = with_sparse
  assert int(part(f, sc.Sparse).count) > 0
  assert jax.tree.structure(g) == jax.tree.structure(f) and g.shape == f.shape
  chex.assert_trees_all_equal_shapes_and_dtypes(g, f)
  np.testing.assert_array_equal(cuts(g).num_cuts, cuts(f).num_cuts)
  chex.assert_trees_all_equal(part(g, sc.Sparse), part(f, sc.Sparse))
  assert sc.nbytes(g) == sc.nbytes(f)
  assert np.all(np.asarray(cuts(g).c) >= 0)


def test_two_passes_equal_one_pass_twice(with_sparse):
  a, f, g = with_sparse
  chex.assert_trees_all_close(sc.backfit(f, a, passes=2), sc.backfit(g, a), rtol=1e-5, atol=1e-6)


def test_unused_slots_stay_empty():
  a = gaussian((30, 20))
  f = sc.decompose(a, key=jax.random.key(0), width=40, max_error=0.5, backend="jnp")
  k = int(cuts(f).num_cuts)
  assert 0 < k < 40
  g = sc.backfit(f, a)
  np.testing.assert_array_equal(np.asarray(cuts(g).c)[k:], 0)
  np.testing.assert_array_equal(np.asarray(cuts(g).s_bits)[k:], 0)
  np.testing.assert_array_equal(np.asarray(cuts(g).t_bits)[k:], 0)


@given(config=st.sampled_from([((23, 17), 9), ((8, 40), 25)]), seed=st.integers(0, 2**16),
       smooth=st.booleans())
@settings(derandomize=True, deadline=None, max_examples=12)
def test_error_never_increases(config, seed, smooth):
  # Few static configurations (each compiles once), many matrices.
  (m, n), width = config
  a = low_rank(m, n, seed=seed) if smooth else gaussian((m, n), seed)
  f = sc.decompose(a, key=jax.random.key(seed), width=width, backend="jnp")
  e0 = float(rel_error(a, f))
  g1 = sc.backfit(f, a)
  e1 = float(rel_error(a, g1))
  e2 = float(rel_error(a, sc.backfit(g1, a)))
  assert e1 <= e0 * (1 + 1e-5) + 1e-6
  assert e2 <= e1 * (1 + 1e-5) + 1e-6


def test_helps_where_the_greedy_is_weak():
  # A low-rank matrix: the greedy's early cuts are far from the best joint fit.
  a = low_rank(96, 64, rank=4)
  f = sc.decompose(a, key=jax.random.key(0), width=64, backend="jnp")
  e0 = float(rel_error(a, f))
  e3 = float(rel_error(a, sc.backfit(f, a, passes=3)))
  assert e3 < 0.97 * e0, (e0, e3)


def test_batch_vmap_and_jit():
  a = jnp.stack([low_rank(20, 30, seed=s) for s in (1, 5, 9)])
  f = sc.decompose(a, key=jax.random.key(5), width=9, backend="jnp")
  g = sc.backfit(f, a)
  for i in range(3):
    gi = sc.backfit(jax.tree.map(lambda x: x[i], f), a[i])
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], g), gi, rtol=1e-5, atol=1e-6)
  gv = jax.vmap(lambda fi, ai: sc.backfit(fi, ai))(f, a)
  chex.assert_trees_all_close(gv, g, rtol=1e-5, atol=1e-6)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(fi, ai):
    return sc.backfit(fi, ai, passes=2)

  chex.assert_trees_all_close(run(f, a), sc.backfit(f, a, passes=2), rtol=1e-5, atol=1e-6)
  run(f, a + 1.0)      # same shapes: no retrace
  chex.clear_trace_counter()


def test_bad_input():
  a = gaussian((8, 6))
  f = sc.decompose(a, key=jax.random.key(0), width=3, backend="jnp")
  with pytest.raises(TypeError, match="f must be a SignedCut"):
    sc.backfit(a, a)
  with pytest.raises(ValueError, match=r"a has shape \(6, 8\) but f decomposes .*\(8, 6\)"):
    sc.backfit(f, a.T)
  with pytest.raises(TypeError, match="float32, bfloat16"):
    sc.backfit(f, jnp.ones((8, 6), jnp.int32))
  with pytest.raises(ValueError, match="non-finite"):
    sc.backfit(f, a.at[1, 2].set(jnp.inf))
  for bad in (0, -1, 1.5, True, "2"):
    with pytest.raises(ValueError, match=f"passes must be an int >= 1, got {bad!r}"):
      sc.backfit(f, a, passes=bad)
