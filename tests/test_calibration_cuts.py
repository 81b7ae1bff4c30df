"""Calibrated cuts, the least-squares refit, the sparse part and GPTQ against readable references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc
from jax_signedcut._calibration import allocate, cuts, gptq, objective
from jax_signedcut._calibration.parts import InputScaled, Transposed


def _problem(m=13, n=9, tokens=40, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, m)) * rng.uniform(0.2, 3.0, size=m)   # uneven channels
  x[:, 1] += 0.8 * x[:, 0]                                           # correlated inputs
  w = rng.normal(size=(m, n))
  return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x / tokens, jnp.float32), x


def test_output_error_is_the_error_on_the_inputs():
  w, h, x = _problem()
  w_hat = w + 0.1
  direct = np.sum((x @ (np.asarray(w) - np.asarray(w_hat)))**2) / len(x)
  np.testing.assert_allclose(float(objective.output_error(w, w_hat, h)), direct, rtol=1e-4)


def test_refit_matches_lstsq_on_the_explicit_design_matrix():
  w, h, x = _problem()
  rng = np.random.default_rng(1)
  s = np.where(rng.normal(size=(6, 13)) >= 0, 1.0, -1.0)
  t = np.where(rng.normal(size=(6, 9)) >= 0, 1.0, -1.0)
  c = objective.refit_scales(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), w, h,
                             ridge=0.0)
  # Column j of the design: X (s_j t_jᵀ), flattened; the target X W.
  design = np.stack([(x @ np.outer(s[j], t[j])).ravel() for j in range(6)], axis=1)
  ref = np.linalg.lstsq(design, (x @ np.asarray(w, np.float64)).ravel(), rcond=None)[0]
  np.testing.assert_allclose(np.asarray(c), ref, rtol=2e-3, atol=1e-4)


def _dense(s, t, c):
  return np.asarray(s).T @ (np.asarray(c)[:, None] * np.asarray(t))


@pytest.mark.parametrize("flips", [0, 8])
def test_hcut_gains_are_the_error_drops_and_prefixes_are_consistent(flips):
  w, h, _ = _problem()
  s, t, c, g = objective.hcut_decompose(w, h, key=jax.random.key(0), width=10, max_flips=flips)
  before = float(objective.output_error(w, jnp.zeros_like(w), h))
  after = float(objective.output_error(w, jnp.asarray(_dense(s, t, c), jnp.float32), h))
  np.testing.assert_allclose(before - float(jnp.sum(g)), after, rtol=1e-3, atol=1e-4)
  assert np.all(np.asarray(g) >= -1e-6)
  s5, t5, c5, _ = objective.hcut_decompose(w, h, key=jax.random.key(0), width=5, max_flips=flips)
  np.testing.assert_array_equal(np.asarray(s5), np.asarray(s)[:5])
  np.testing.assert_array_equal(np.asarray(t5), np.asarray(t)[:5])
  np.testing.assert_allclose(np.asarray(c5), np.asarray(c)[:5], rtol=1e-6)


def test_hcut_first_cut_is_optimal_on_a_tiny_matrix():
  # Brute force over every s (the best t for a given s is sgn(Pᵀs)): the greedy's
  # first gain must be close to the best gain (it is a local search).
  w, h, _ = _problem(m=6, n=5)
  p = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  best = 0.0
  for bits in itertools.product((-1.0, 1.0), repeat=6):
    s = np.array(bits)
    best = max(best, np.sum(np.abs(p.T @ s))**2 / (5 * s @ np.asarray(h, np.float64) @ s))
  _, _, _, g = objective.hcut_decompose(w, h, key=jax.random.key(0), width=1, max_flips=16)
  assert float(g[0]) >= 0.95 * best


def test_hcut_with_identity_h_ends_at_a_plain_alternation_fixed_point():
  # With H = I the search is the plain cut's alternation: the cut it returns has
  # s = sgn(W t), t = sgn(Wᵀ s) and c = sᵀWt / (mn), as sc.decompose's cuts do.
  w, _, _ = _problem()
  eye = jnp.eye(13, dtype=jnp.float32)
  s, t, c, _ = objective.hcut_decompose(w, eye, key=jax.random.key(0), width=1, max_flips=0)
  s, t, a = np.asarray(s[0]), np.asarray(t[0]), np.asarray(w, np.float64)
  np.testing.assert_array_equal(s, np.where(a @ t >= 0, 1.0, -1.0))
  np.testing.assert_array_equal(t, np.where(a.T @ s >= 0, 1.0, -1.0))
  np.testing.assert_allclose(float(c[0]), s @ a @ t / (13 * 9), rtol=1e-5)


def test_sparse_by_impact_picks_the_best_single_entry():
  w, h, _ = _problem(m=7, n=4)
  hh = np.asarray(h, np.float64)
  e = np.asarray(w, np.float64)
  idx, val = objective.sparse_by_impact(w, h, 1)
  best, where = -1.0, None
  for i, o in itertools.product(range(7), range(4)):
    delta = (hh @ e)[i, o] / hh[i, i]
    p = np.zeros_like(e)
    p[i, o] = delta
    drop = np.trace(e.T @ hh @ e) - np.trace((e - p).T @ hh @ (e - p))
    if drop > best:
      best, where = drop, (i * 4 + o, delta)
  assert int(idx[0]) == where[0]
  np.testing.assert_allclose(float(val[0]), where[1], rtol=1e-4)


def test_refit_sparse_is_the_per_column_least_squares():
  w, h, _ = _problem(m=7, n=4)
  idx = np.array([1, 5, 9, 13])          # two entries in column 1 (rows 0, 1 … 3)
  vals = objective.refit_sparse(idx, w, h)
  hh, e = np.asarray(h, np.float64), np.asarray(w, np.float64)
  for o in range(4):
    sel = [k for k, f in enumerate(idx) if f % 4 == o]
    if not sel:
      continue
    rows = [int(idx[k] // 4) for k in sel]
    basis = np.zeros((7, len(rows)))
    basis[rows, range(len(rows))] = 1
    chol = np.linalg.cholesky(hh)
    ref = np.linalg.lstsq(chol.T @ basis, chol.T @ e[:, o], rcond=None)[0]
    np.testing.assert_allclose(vals[sel], ref, rtol=1e-4, atol=1e-5)


def test_calibrated_cuts_budget_parts_and_matmul():
  w, h, _ = _problem(m=40, n=24, tokens=200)
  part, gains = cuts.calibrated_cuts(w, h, key=jax.random.key(0), width=60)
  assert isinstance(part, InputScaled) and part.shape == (40, 24) and gains.shape == (60,)
  curve = cuts.error_curve(gains, w, h, part)
  assert np.all(np.diff(curve) <= 1e-6)
  for sparse in (0.0, 0.02):
    got = cuts.fit_budget(part, w, h, bits_per_weight=4, sparse_fraction=sparse)
    assert got.nbytes <= 4 * 40 * 24 / 8
    x = jax.random.normal(jax.random.key(1), (3, 40))
    np.testing.assert_allclose(np.asarray(got.matmul(x)), np.asarray(x @ got.reconstruct()),
                               rtol=1e-4, atol=1e-4)
    # The precomputed system of all cuts gives the same refit as forming it per budget.
    fast = cuts.fit_budget(part, w, h, bits_per_weight=4, sparse_fraction=sparse,
                           system=cuts.gram(part, w, h))
    np.testing.assert_allclose(np.asarray(fast.reconstruct()), np.asarray(got.reconstruct()),
                               rtol=1e-3, atol=1e-4)
  # The refit never loses to the greedy scales under the metric it solves in (same signs:
  # no backfitting, which would start each from other scales).
  same = cuts.CutOptions(backfit=0)
  greedy = cuts.fit_budget(part, w, h, bits_per_weight=4, refit=False, options=same)
  refit = cuts.fit_budget(part, w, h, bits_per_weight=4, options=same)
  hp = h / part.scale[:, None] / part.scale[None, :]
  metric = cuts.search_metric(hp, cuts.CutOptions())
  target = part.scale[:, None] * w
  e_greedy = objective.output_error(target, sc.reconstruct(greedy.inner), metric)
  e_refit = objective.output_error(target, sc.reconstruct(refit.inner), metric)
  assert float(e_refit) <= float(e_greedy) * (1 + 1e-5)


def test_diag_search_is_the_plain_cuts_of_the_scaled_kernel_with_their_error_drops():
  # search="diag": the C++ greedy cuts of D·W (bit for bit), gains = the drop of
  # tr(RᵀH_sR) per cut with the greedy scales (a readable residual loop).
  w, h, _ = _problem(m=40, n=24, tokens=200)
  opts = cuts.CutOptions(search="diag")
  part, gains = cuts.calibrated_cuts(w, h, key=jax.random.key(0), width=60, options=opts)
  d = part.scale
  plain = sc.decompose(d[:, None] * w, key=jax.random.key(0), width=60, outliers=0)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(part.inner)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  metric = np.asarray(cuts.search_metric(h / d[:, None] / d[None, :], opts), np.float64)
  s = np.asarray(sc.unpack_signs(part.inner.s_bits, 40), np.float64)
  t = np.asarray(sc.unpack_signs(part.inner.t_bits, 24), np.float64)
  r = np.asarray(d[:, None] * w, np.float64)
  drops = []
  for j in range(60):
    before = np.sum(r * (metric @ r))
    r = r - float(part.inner.c[j]) * np.outer(s[j], t[j])
    drops.append(before - np.sum(r * (metric @ r)))
  np.testing.assert_allclose(np.asarray(gains), drops, rtol=1e-3, atol=1e-4 * abs(drops[0]))
  none, no_gains = cuts.calibrated_cuts(w, h, key=jax.random.key(0), width=60, options=opts,
                                        with_gains=False)
  assert no_gains is None
  np.testing.assert_array_equal(np.asarray(none.inner.s_bits), np.asarray(part.inner.s_bits))
  with pytest.raises(ValueError, match="search must be one of"):
    cuts.CutOptions(search="exact")


def test_calibrated_cuts_beat_plain_cuts_on_the_output_error():
  # Large enough that the 4m bytes of scales are a small part of the budget.
  w, h, _ = _problem(m=64, n=128, tokens=300)
  part, _ = cuts.calibrated_cuts(w, h, key=jax.random.key(0), width=200)
  ours = cuts.fit_budget(part, w, h, bits_per_weight=4).reconstruct()
  plain = sc.reconstruct(sc.decompose(w, key=jax.random.key(0), bits_per_weight=4))
  assert float(objective.output_error(w, ours, h)) < float(objective.output_error(w, plain, h))


def _err(w, h, s, t, c):
  e = np.asarray(w, np.float64) - _dense(s, t, c)
  return float(np.sum(e * (np.asarray(h, np.float64) @ e)))


@pytest.mark.parametrize("shape", [(13, 9), (9, 13)])   # with and without Q = H⁻¹P kept
def test_hcut_backfit_lowers_the_error_and_ends_each_cut_at_its_exact_optimum(shape):
  w, h, _ = _problem(*shape, tokens=60)
  s, t, c, _ = objective.hcut_decompose(w, h, key=jax.random.key(0), width=6, max_flips=8)
  errors = [_err(w, h, s, t, c)]
  for passes in (1, 2, 3):
    sb, tb, cb = objective.hcut_backfit(w, h, s, t, c, passes=passes, max_flips=8)
    errors.append(_err(w, h, sb, tb, cb))
  assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0] * 0.999, errors
  assert set(np.unique(np.asarray(sb))) <= {-1.0, 1.0}
  # The last cut visited, against the dense remainder of all the others: its scale is the
  # exact optimum sᵀHRt / (n sᵀHs) and its column signs are sgn((HR)ᵀ s) (what t can do
  # best for that s).
  sb, tb, cb = (np.asarray(v, np.float64) for v in (sb, tb, cb))
  hh = np.asarray(h, np.float64)
  k = len(cb) - 1
  others = [j for j in range(len(cb)) if j != k]
  r = np.asarray(w, np.float64) - _dense(sb[others], tb[others], cb[others])
  n = r.shape[1]
  np.testing.assert_allclose(cb[k], sb[k] @ hh @ r @ tb[k] / (n * sb[k] @ hh @ sb[k]),
                             rtol=1e-3)
  u = (hh @ r).T @ sb[k]
  assert np.all(np.where(np.abs(u) > 1e-4 * np.max(np.abs(u)), np.sign(u) == tb[k], True))
  # No passes: the input back; bad arguments name themselves.
  s0, t0, c0 = objective.hcut_backfit(w, h, s, t, c, passes=0)
  np.testing.assert_array_equal(np.asarray(s0), np.asarray(s))
  with pytest.raises(ValueError, match="passes must be an int >= 0"):
    objective.hcut_backfit(w, h, s, t, c, passes=-1)
  with pytest.raises(ValueError, match="s, t, c must have shapes"):
    objective.hcut_backfit(w, h, s[:, :3], t, c)


@pytest.mark.parametrize("search", ["hcut", "diag"])
def test_fit_budget_with_backfit_keeps_the_budget_and_lowers_the_output_error(search):
  w, h, _ = _problem(m=40, n=24, tokens=200)
  plain_opts = cuts.CutOptions(search=search, backfit=0)
  part, _ = cuts.calibrated_cuts(w, h, key=jax.random.key(0), width=60, options=plain_opts)
  base = cuts.fit_budget(part, w, h, bits_per_weight=4, options=plain_opts)
  bf_opts = cuts.CutOptions(search=search, backfit=2)
  got = cuts.fit_budget(part, w, h, bits_per_weight=4, options=bf_opts)
  assert got.inner.num_cuts == base.inner.num_cuts and got.nbytes == base.nbytes
  hp = h / part.scale[:, None] / part.scale[None, :]
  metric = cuts.search_metric(hp, plain_opts)
  target = part.scale[:, None] * w
  e_base = objective.output_error(target, sc.reconstruct(base.inner), metric)
  e_bf = objective.output_error(target, sc.reconstruct(got.inner), metric)
  assert float(e_bf) < float(e_base)
  # Through decompose: the option is checked and used.
  via = sc.decompose(w, key=jax.random.key(0), bits_per_weight=4, calibration=h,
                     options={"search": search, "backfit": 1, "fallback": False})
  assert via.nbytes <= 4 * 40 * 24 / 8
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="backfit must be an int >= 0"):
      sc.decompose(w, key=jax.random.key(0), bits_per_weight=4, calibration=h,
                   options={"backfit": bad})


def test_bad_arguments():
  w, h, _ = _problem()
  with pytest.raises(ValueError, match="h must have shape"):
    cuts.calibrated_cuts(w, h[:5, :5], key=jax.random.key(0), width=3)
  with pytest.raises(ValueError, match="width"):
    objective.hcut_decompose(w, h, key=jax.random.key(0), width=0)
  with pytest.raises(ValueError, match="shrink"):
    cuts.CutOptions(shrink=2.0)
  part, _ = cuts.calibrated_cuts(w, h, key=jax.random.key(0), width=3)
  with pytest.raises(ValueError, match="pays for no cut"):
    cuts.fit_budget(part, w, h, bits_per_weight=0.5)
  with pytest.raises(ValueError, match="sparse_fraction"):
    cuts.fit_budget(part, w, h, bits_per_weight=4, sparse_fraction=1.5)


# --- GPTQ -----------------------------------------------------------------------------------


def _gptq_reference(w_t, h, bits, damp=0.01):
  """The optimal-brain-quantizer form: round input i, update the rest with the inverse of the
  Hessian restricted to the inputs not yet rounded (no Cholesky trick), per-row scales."""
  w = np.array(w_t, np.float64)
  hh = np.array(h, np.float64) + damp * np.mean(np.diag(h)) * np.eye(len(h))
  h_inv = np.linalg.inv(hh)
  scale = np.max(np.abs(w), axis=1)
  levels = 2**(bits - 1) - 1
  step = scale / levels
  for i in range(w.shape[1]):
    q = np.clip(np.round(w[:, i] / step), -levels, levels) * step
    err = (w[:, i] - q) / h_inv[i, i]
    w[:, i + 1:] -= np.outer(err, h_inv[i, i + 1:])
    w[:, i] = q
    h_inv = h_inv - np.outer(h_inv[:, i], h_inv[i, :]) / h_inv[i, i]
  return w


def test_gptq_matches_the_reference():
  w, h, _ = _problem(m=12, n=5, tokens=60)
  got = gptq.gptq(w, h, bits=3)
  assert isinstance(got, Transposed) and got.shape == (12, 5)
  ref = _gptq_reference(np.asarray(w).T, np.asarray(h), bits=3)
  np.testing.assert_allclose(np.asarray(got.reconstruct()).T, ref, rtol=1e-3, atol=1e-4)
  assert got.nbytes == sc.rtn(w.T, bits=3).nbytes


def test_gptq_with_identity_h_is_rtn_and_beats_it_otherwise():
  w, h, _ = _problem(m=16, n=6, tokens=200)
  eye = jnp.eye(16, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(gptq.gptq(w, eye, bits=4, damp=0.0).reconstruct()),
                             np.asarray(sc.dequantize_matrix(sc.rtn(w.T, bits=4)).T), atol=1e-6)
  g = gptq.gptq(w, h, bits=3, group_size=8).reconstruct()
  r = sc.dequantize_matrix(sc.rtn(w.T, bits=3, group_size=8)).T
  assert float(objective.output_error(w, g, h)) < float(objective.output_error(w, r, h))


def test_gptq_bad_arguments():
  w, h, _ = _problem()
  with pytest.raises(ValueError, match="bits"):
    gptq.gptq(w, h, bits=1)
  with pytest.raises(ValueError, match="h must have shape"):
    gptq.gptq(w, h[:3, :3], bits=4)
  with pytest.raises(ValueError, match="group_size"):
    gptq.gptq(w, h, bits=4, group_size=0)


# --- allocation -----------------------------------------------------------------------------


def test_allocation_matches_brute_force_on_convex_curves():
  rng = np.random.default_rng(0)
  curves = {}
  for name in "abc":
    b = np.cumsum(rng.integers(1, 4, size=5)).astype(float)
    e = np.cumsum(-np.sort(rng.uniform(0.1, 2, size=5))[::-1]) + 10   # falling, convex
    curves[name] = (b, e)
  sens = {"a": 1.0, "b": 0.3, "c": 2.0}
  for budget in (8.0, 14.0, 25.0):
    got = allocate.allocate(curves, budget, sensitivity=sens)
    best = min((sum(sens[k] * curves[k][1][i] for k, i in zip("abc", pick)), pick)
               for pick in itertools.product(range(5), repeat=3)
               if sum(curves[k][0][i] for k, i in zip("abc", pick)) <= budget)
    cost = sum(curves[k][0][got[k]] for k in "abc")
    value = sum(sens[k] * curves[k][1][got[k]] for k in "abc")
    assert cost <= budget
    # Lagrangian greedy: optimal up to the one hull step it could not afford.
    worst_step = max(np.max(-np.diff(sens[k] * curves[k][1])) for k in "abc")
    assert value <= best[0] + worst_step


def test_allocation_errors():
  curves = {"a": (np.array([1.0, 2.0]), np.array([2.0, 1.0]))}
  with pytest.raises(ValueError, match="below the cheapest"):
    allocate.allocate(curves, 0.5)
  with pytest.raises(ValueError, match="strictly increasing"):
    allocate.allocate({"a": (np.array([2.0, 1.0]), np.array([2.0, 1.0]))}, 5)
  with pytest.raises(ValueError, match="sensitivity"):
    allocate.allocate(curves, 5, sensitivity={"a": -1.0})


def test_padded_refit_and_backfit_are_the_unpadded_ones():
  """The bucket-padded steps of ``search="plain"``: the same scales and signs, padding kept 0."""
  w, h, _ = _problem(m=40, n=24, tokens=200)
  rng = np.random.default_rng(3)
  k, width = 13, 16
  s = jnp.asarray(np.where(rng.normal(size=(k, 40)) >= 0, 1.0, -1.0), jnp.float32)
  t = jnp.asarray(np.where(rng.normal(size=(k, 24)) >= 0, 1.0, -1.0), jnp.float32)
  pad = lambda a: jnp.pad(a, [(0, width - k)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
  c = objective.refit_scales(s, t, w, h)
  cp = objective.refit_scales_padded(pad(s), pad(t), w, h, k)
  np.testing.assert_allclose(np.asarray(cp[:k]), np.asarray(c), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(cp[k:]) == 0)
  sb, tb, cb = objective.hcut_backfit(w, h, s, t, c, passes=2, max_flips=16, max_rounds=10)
  sp, tp, cpb = objective.hcut_backfit_padded(w, h, pad(s), pad(t), pad(c), k, passes=2,
                                              max_flips=16, max_rounds=10)
  np.testing.assert_array_equal(np.asarray(sp[:k]), np.asarray(sb))
  np.testing.assert_array_equal(np.asarray(tp[:k]), np.asarray(tb))
  np.testing.assert_allclose(np.asarray(cpb[:k]), np.asarray(cb), rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(cpb[k:]) == 0) and np.all(np.asarray(sp[k:]) == 0)


def _ls_scales(w, h, s, t):
  """Least-squares c of fixed cuts under h, from the explicit design matrix (the reference)."""
  x = np.linalg.cholesky(np.asarray(h, np.float64) + 1e-12 * np.eye(h.shape[0])).T   # XᵀX = h
  design = np.stack([(x @ np.outer(s[j], t[j])).ravel() for j in range(len(s))], axis=1)
  return np.linalg.lstsq(design, (x @ np.asarray(w, np.float64)).ravel(), rcond=None)[0]


def test_plain_search_starts_from_the_plain_decomposition_and_lowers_its_error():
  w, h, _ = _problem(m=40, n=24, tokens=200)
  w = w.at[3, 5].set(25.0)                                   # an outlier for "auto" to keep
  key = jax.random.key(0)
  plain = sc.decompose(w, key=key, bits_per_weight=4)
  pc, psp = plain.parts
  k = int(pc.num_cuts)
  s = np.asarray(sc.unpack_signs(pc.s_bits[:k], 40))
  t = np.asarray(sc.unpack_signs(pc.t_bits[:k], 24))
  # No backfit, alpha 0: the plain cuts and outliers, c the least squares under the metric.
  opts = cuts.CutOptions(search="plain", alpha=0.0, backfit=0)
  got = cuts.fit_plain_start(w, h, key=key, bits_per_weight=4, options=opts)
  assert isinstance(got, sc.Sum) and got.nbytes == plain.nbytes <= 4 * 40 * 24 / 8
  gc, gsp = got.parts
  np.testing.assert_array_equal(np.asarray(gc.s_bits), np.asarray(pc.s_bits[:k]))
  np.testing.assert_array_equal(np.asarray(gsp.idx), np.asarray(psp.idx))
  assert int(psp.count) >= 1 and 3 * 24 + 5 in np.asarray(psp.idx)[:int(psp.count)]
  metric = cuts.search_metric(h, opts)
  rest = np.asarray(w - psp.reconstruct(), np.float64)
  np.testing.assert_allclose(np.asarray(gc.c), _ls_scales(rest, metric, s, t), rtol=2e-3,
                             atol=1e-4)
  e = lambda f: float(objective.output_error(w, sc.reconstruct(f), metric))  # noqa: E731
  assert e(got) < e(plain)
  # Backfitting lowers it further, in the same bytes; the start passed in is used as is.
  bf = cuts.fit_plain_start(w, h, key=key, bits_per_weight=4, start=plain,
                            options=cuts.CutOptions(search="plain", alpha=0.0, backfit=2))
  assert bf.nbytes == plain.nbytes and e(bf) < e(got)
  # With input scales: an InputScaled whose inner pays for the scales' 4m bytes first.
  sc_opts = cuts.CutOptions(search="plain", alpha=0.5, backfit=1)
  scaled = cuts.fit_plain_start(w, h, key=key, bits_per_weight=4, options=sc_opts)
  assert isinstance(scaled, InputScaled) and scaled.nbytes <= 4 * 40 * 24 / 8
  # Through decompose (with the fallback, which is the start here): the same result.
  via = sc.decompose(w, key=key, bits_per_weight=4, calibration=h,
                     options={"search": "plain", "alpha": 0.0, "backfit": 2})
  for x, y in zip(jax.tree.leaves(via), jax.tree.leaves(bf)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="search='plain' keeps the weight outliers"):
    sc.decompose(w, key=key, bits_per_weight=4, calibration=h,
                 options={"search": "plain", "sparse_fraction": 0.01})
  with pytest.raises(ValueError, match="pays for no cut"):
    cuts.fit_plain_start(w, h, key=key, bits_per_weight=0.01, options=sc_opts)
