"""The C++ hcut search (xla_ffi/hcut_search.cc) against the readable jnp search.

Both run the same algorithm (objective._cut_search_jnp is the reference); the
C++ one keeps its images incrementally and sums in another order, so the
factors are compared exactly on fixed problems, which is where they agree,
and the search's own invariants are checked on its output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_signedcut._calibration import objective
from jax_signedcut._kernels import extension

pytestmark = pytest.mark.skipif(not extension.has_target("signedcut_hcut_search"),
                                reason="the compiled extension (with the hcut search) is not built")


def _problem(m, n, seed, tokens=None):
  rng = np.random.default_rng(seed)
  tokens = tokens or 3 * m + 5
  x = rng.normal(size=(tokens, m)) * rng.gamma(1.0, size=m)     # uneven channels
  if m > 1:
    x[:, 1 % m] += 0.8 * x[:, 0]                                 # correlated inputs
  w = rng.normal(size=(m, n))
  return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x / tokens, jnp.float32)


# Odd shapes, both sides of n < m (the caller keeps Q = H⁻¹P only there), and
# the degenerate single row / column.
SHAPES = [(13, 9), (9, 13), (33, 65), (65, 33), (1, 7), (7, 1), (17, 17)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flips", [0, 16])
def test_decompose_and_backfit_match_the_jnp_search(shape, flips):
  m, n = shape
  for seed in range(2):
    w, h = _problem(m, n, seed)
    width = min(6, m * n)
    ref = objective._hcut(w, h, jax.random.key(seed), width=width, max_flips=flips,  # noqa: SLF001
                          max_rounds=50, impl="jnp", stats=True)
    got = objective._hcut(w, h, jax.random.key(seed), width=width, max_flips=flips,  # noqa: SLF001
                          max_rounds=50, impl="ffi", stats=True)
    for r, g in zip(ref[:2], got[:2]):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), rtol=1e-5, atol=1e-7)
    # The same path: as many rounds and flips (the third count is C++-only).
    np.testing.assert_array_equal(np.asarray(got[4])[:2], np.asarray(ref[4])[:2])
    s, t, c = ref[:3]
    ref_b = objective.hcut_backfit(w, h, s, t, c, passes=2, max_flips=flips, impl="jnp")
    got_b = objective.hcut_backfit(w, h, s, t, c, passes=2, max_flips=flips, impl="ffi")
    for r, g in zip(ref_b[:2], got_b[:2]):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    np.testing.assert_allclose(np.asarray(got_b[2]), np.asarray(ref_b[2]), rtol=1e-5,
                               atol=1e-7)


def _search(p, h, s, t, *, impl, keep_q, max_flips=64, max_rounds=50):
  h = (h + h.T) / 2
  m = h.shape[0]
  h_inv = jnp.linalg.inv(h + 1e-6 * jnp.mean(jnp.diagonal(h)) * jnp.eye(m))
  q = h_inv @ p if keep_q else jnp.zeros((0, p.shape[1]), jnp.float32)
  hs = jnp.matmul(h, s, precision=jax.lax.Precision.HIGHEST)
  fn = jax.jit(lambda *a: objective._cut_search(  # noqa: SLF001
      *a, keep_q=keep_q, max_flips=max_flips, max_rounds=max_rounds, impl=impl))
  return fn(p, q, h, h_inv, jnp.diagonal(h), s, hs, t), h


def _ratio(p, h, s, t):
  p, h, s, t = (np.asarray(v, np.float64) for v in (p, h, s, t))
  return (s @ p @ t) ** 2 / (s @ h @ s)


@pytest.mark.parametrize("keep_q", [False, True])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (5, 3)])
def test_one_search_keeps_its_invariants(shape, keep_q):
  m, n = shape
  w, h = _problem(m, n, 3)
  p = jnp.matmul(h, w, precision=jax.lax.Precision.HIGHEST)
  rng = np.random.default_rng(4)
  s0 = jnp.asarray(np.where(rng.normal(size=m) >= 0, 1.0, -1.0), jnp.float32)
  t0 = jnp.asarray(np.where(rng.normal(size=n) >= 0, 1.0, -1.0), jnp.float32)
  (s, hs, t, counts), hh = _search(p, h, s0, t0, impl="ffi", keep_q=keep_q)
  s, hs, t = np.asarray(s), np.asarray(hs), np.asarray(t)
  assert set(np.unique(s)) <= {-1.0, 1.0} and set(np.unique(t)) <= {-1.0, 1.0}
  # hs is H s of the returned s (kept by row updates), t the exact best for s.
  np.testing.assert_allclose(hs, np.asarray(hh, np.float64) @ s, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(t, np.where(np.asarray(p, np.float64).T @ s >= 0, 1.0, -1.0))
  # Never below the start; at least one round, at most max_rounds.
  assert _ratio(p, hh, s, t) >= _ratio(p, hh, s0, t0) * (1 - 1e-6)
  assert 1 <= int(counts[0]) <= 50 and int(counts[1]) >= 0
  # A search started at its own end stays there (a fixed point of the rounds).
  (s2, _, t2, _), _ = _search(p, h, jnp.asarray(s), jnp.asarray(t), impl="ffi", keep_q=keep_q,
                              max_flips=0)
  assert _ratio(p, hh, s2, t2) >= _ratio(p, hh, s, t) * (1 - 1e-6)


def test_zero_rounds_returns_the_start_and_vmap_runs_per_matrix():
  w, h = _problem(9, 13, 5)
  key = jax.random.key(0)
  ref = objective.hcut_decompose(w, h, key=key, width=3, max_rounds=0, impl="jnp")
  got = objective.hcut_decompose(w, h, key=key, width=3, max_rounds=0, impl="ffi")
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
  stack = jnp.stack([w, 2 * w[::-1], -w])
  run = jax.vmap(lambda x: objective._hcut(x, h, key, width=3, max_flips=8,  # noqa: SLF001
                                           max_rounds=50, impl="ffi"))
  batched = run(stack)
  for b in range(3):
    one = objective._hcut(stack[b], h, key, width=3, max_flips=8, max_rounds=50,  # noqa: SLF001
                          impl="ffi")
    for x, y in zip(batched, one):
      np.testing.assert_array_equal(np.asarray(x[b]), np.asarray(y))


def test_non_finite_input_ends_the_search_instead_of_looping():
  w, h = _problem(12, 8, 6)
  p = jnp.matmul(h, w).at[3, 2].set(jnp.nan)
  ones = jnp.ones((12,), jnp.float32)
  (s, _, t, counts), _ = _search(p, h, ones, jnp.ones((8,), jnp.float32), impl="ffi",
                                 keep_q=False)
  assert set(np.unique(np.asarray(s))) <= {-1.0, 1.0}
  assert int(counts[0]) <= 50


def test_environment_variable_chooses_the_implementation(monkeypatch):
  w, h = _problem(11, 5, 7)       # a shape no other test traces (the choice is made at trace)
  monkeypatch.setenv("JAX_SIGNEDCUT_HCUT_IMPL", "fast")
  with pytest.raises(ValueError, match="JAX_SIGNEDCUT_HCUT_IMPL must be one of"):
    objective.hcut_decompose(w, h, key=jax.random.key(0), width=2)
  monkeypatch.setenv("JAX_SIGNEDCUT_HCUT_IMPL", "jnp")
  lowered = objective._hcut.lower(w, h, jax.random.key(0), width=2, max_flips=4,  # noqa: SLF001
                                  max_rounds=5).as_text()
  assert "signedcut_hcut_search" not in lowered
  monkeypatch.setenv("JAX_SIGNEDCUT_HCUT_IMPL", "ffi")
  lowered = objective._hcut.lower(w, h, jax.random.key(0), width=2, max_flips=4,  # noqa: SLF001
                                  max_rounds=6).as_text()   # another trace
  assert "signedcut_hcut_search" in lowered


def test_bad_arguments_name_themselves():
  w, h = _problem(6, 4, 0)
  with pytest.raises(ValueError, match="impl must be one of"):
    objective.hcut_decompose(w, h, key=jax.random.key(0), width=2, impl="cuda")
  with pytest.raises(ValueError, match="impl must be one of"):
    objective.hcut_backfit(w, h, jnp.ones((1, 6)), jnp.ones((1, 4)), jnp.ones((1,)),
                           impl="fast")
  # The handler checks its buffers itself (a wrong h_inv here): an error, not a crash.
  f32 = jnp.float32
  args = (jnp.zeros((6, 4), f32), jnp.zeros((0, 4), f32), h, jnp.zeros((5, 5), f32),
          jnp.diagonal(h), jnp.ones((6,), f32), jnp.ones((6,), f32), jnp.ones((4,), f32))
  with pytest.raises(Exception, match=r"h and h_inv must have shape \(6, 6\)"):
    jax.block_until_ready(objective._cut_search_ffi(*args, max_flips=4, max_rounds=3))  # noqa: SLF001
  with pytest.raises(Exception, match="max_rounds >= 1"):
    good = args[:3] + (h,) + args[4:]
    jax.block_until_ready(objective._cut_search_ffi(*good, max_flips=4, max_rounds=0))  # noqa: SLF001
