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


@pytest.mark.parametrize("shape", SHAPES)
def test_backfit_loop_handler_matches_the_xla_loop_and_leaves_the_padding(shape):
  # The one-call loop (BackfitLoop: the cut put back as the search's rank-one term, c from
  # ‖Pᵀs‖₁) against the XLA loop around one search per visit (P written twice per visit)
  # and the jnp reference: the same searches in another rounding, so equal signs on these
  # fixed problems and scales to rounding.
  m, n = shape
  w, h = _problem(m, n, 11)
  width = min(6, m * n)
  s, t, c, _ = objective.hcut_decompose(w, h, key=jax.random.key(1), width=width, max_flips=16,
                                        impl="jnp")
  kw = dict(passes=2, max_flips=16, max_rounds=50, stats=True)
  got = objective._hcut_backfit(w, h, s, t, c, impl="ffi", loop=True, **kw)  # noqa: SLF001
  for other in (dict(impl="ffi", loop=False), dict(impl="jnp")):
    ref = objective._hcut_backfit(w, h, s, t, c, **other, **kw)  # noqa: SLF001
    for r, g in zip(ref[:2], got[:2]):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got[3])[:2], np.asarray(ref[3])[:2])
  # Padded to a bucket (c = 0 after num): the first num as unpadded, the padding untouched.
  num = max(1, width - 2)
  pad = lambda x, v: jnp.concatenate([x[:num], jnp.full((3,) + x.shape[1:], v, x.dtype)])  # noqa: E731
  sp, tp, cp = pad(s, 1.0), pad(t, -1.0), pad(c, 0.0)
  gp = objective._hcut_backfit(w, h, sp, tp, cp, impl="ffi", num=jnp.int32(num), **kw)  # noqa: SLF001
  gu = objective._hcut_backfit(w, h, s[:num], t[:num], c[:num], impl="ffi", **kw)  # noqa: SLF001
  for x, y, p in zip(gp[:3], gu[:3], (sp, tp, cp)):
    np.testing.assert_allclose(np.asarray(x[:num]), np.asarray(y), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(x[num:]), np.asarray(p[num:]))


def test_backfit_loop_handler_checks_its_buffers():
  w, h = _problem(6, 4, 0)
  f32 = jnp.float32
  base = dict(p0=jnp.zeros((6, 4), f32), q0=jnp.zeros((0, 4), f32), h=h, h_inv=h,
              diag_h=jnp.diagonal(h), s_all=jnp.ones((3, 6), f32), t_all=jnp.ones((3, 4), f32),
              c_all=jnp.zeros((3,), f32), hs_all=jnp.ones((3, 6), f32), num=jnp.int32(2))
  run = lambda **kw: jax.block_until_ready(objective._backfit_ffi(  # noqa: E731, SLF001
      *{**base, **kw}.values(), passes=1, max_flips=4, max_rounds=3))
  run()
  with pytest.raises(Exception, match=r"t, c, hs must have shapes \(3, 4\), \(3,\), \(3, 6\)"):
    run(hs_all=jnp.ones((3, 5), f32))
  with pytest.raises(Exception, match=r"num must be in \[0, 3\], got 4"):
    run(num=jnp.int32(4))
  with pytest.raises(Exception, match=r"q must have shape \(6, 4\) or \(0, 4\)"):
    run(q0=jnp.zeros((2, 4), f32))


@pytest.mark.skipif(not extension.module().avx512_supported(),
                    reason="this CPU has no AVX-512: only the baseline build of the search runs")
@pytest.mark.parametrize("shape", [(13, 9), (9, 13), (65, 33), (33, 65), (1, 7), (7, 1)])
def test_avx512_build_of_the_search_is_bit_identical_to_the_baseline(shape):
  # One source, two instruction sets (xla_ffi/hcut_search_core.inc, no FMA contraction):
  # every factor, scale and count equal, for the greedy cuts and the backfit loop.
  m, n = shape
  w, h = _problem(m, n, 21)
  width = min(5, m * n)
  kw = dict(width=width, max_flips=16, max_rounds=50, impl="ffi", stats=True)
  base = objective._hcut(w, h, jax.random.key(3), kernel="scalar", **kw)  # noqa: SLF001
  wide = objective._hcut(w, h, jax.random.key(3), kernel="avx512", **kw)  # noqa: SLF001
  for x, y in zip(base, wide):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  s, t, c = base[:3]
  for loop in (True, False):
    kb = dict(passes=2, max_flips=16, max_rounds=50, impl="ffi", stats=True, loop=loop)
    xb = objective._hcut_backfit(w, h, s, t, c, kernel="scalar", **kb)  # noqa: SLF001
    yb = objective._hcut_backfit(w, h, s, t, c, kernel="avx512", **kb)  # noqa: SLF001
    for x, y in zip(xb, yb):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_the_search_kernel_choice_is_checked(monkeypatch):
  w, h = _problem(6, 4, 0)
  f32 = jnp.float32
  args = (jnp.zeros((6, 4), f32), jnp.zeros((0, 4), f32), h, h, jnp.diagonal(h),
          jnp.ones((6,), f32), jnp.ones((6,), f32), jnp.ones((4,), f32))
  call = lambda **kw: jax.block_until_ready(  # noqa: E731
      objective._cut_search_ffi(*args, max_flips=4, max_rounds=3, **kw))  # noqa: SLF001
  call(kernel="scalar")
  with pytest.raises(ValueError, match="kernel must be one of"):
    call(kernel="sse9")
  if not extension.module().avx512_supported():
    with pytest.raises(Exception, match="needs AVX-512"):
      call(kernel="avx512")
