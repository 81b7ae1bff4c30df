"""Row blocks (``sc.RowBlocks``) and the calibrated block search (``options={"blocks": k}``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc
from jax_signedcut._calibration import allocate, api, blocks, objective
from jax_signedcut.nnx import SignedCutDense

KEY = jax.random.key(0)
# One problem and option set throughout (each new shape compiles the cut search again).
OPTS = {"search": "diag", "fallback": False}


def _problem(m=128, n=48, tokens=2000, rank=8, seed=0, token_seed=1):
  """Inputs near a rank-8 subspace (as a Linear layer's inputs often are) and a random kernel.

  ``token_seed`` draws other tokens of the same distribution (held-out statistics).
  """
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(rank, m))
  scale = np.exp(rng.normal(scale=0.5, size=m))
  w = rng.normal(size=(m, n))
  tk = np.random.default_rng(token_seed)
  x = (tk.normal(size=(tokens, rank)) @ basis + 0.1 * tk.normal(size=(tokens, m))) * scale
  return jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x / tokens, jnp.float32), x


def _err(w, f, h):
  return float(objective.relative_output_error(w, f.reconstruct(), h))


def _reference(w, h, nb, bits, key, options):
  """The block search written the other way round: GPTQ's inverse-Hessian (OBS) form.

  For the rows still to do, with G = (H restricted to them)⁻¹: block B is compressed
  under (G_BB)⁻¹ and the rows after it move by −G_RB (G_BB)⁻¹ · error_B.
  """
  w = np.asarray(w, np.float64)
  h = np.asarray(h, np.float64)
  m, n = w.shape
  order = np.argsort(-np.diag(h), kind="stable")
  hp = h[np.ix_(order, order)]
  hp = (hp + hp.T) / 2 + blocks.DAMP * np.mean(np.diag(hp)) * np.eye(m)
  target = w[order]
  left = bits * m * n / 8 - 4 * m
  parts = []
  edges = [b * m // nb for b in range(nb + 1)]
  for b in range(nb):
    lo, hi = edges[b], edges[b + 1]
    g = np.linalg.inv(hp[lo:, lo:])
    gbb = g[:hi - lo, :hi - lo]
    metric = np.linalg.inv(gbb)
    metric = (metric + metric.T) / 2
    part = api.signed_cut(jnp.asarray(target[lo:hi], jnp.float32),
                          jnp.asarray(metric, jnp.float32), key=jax.random.fold_in(key, b),
                          bits_per_weight=left / (m - lo) * 8 / n,
                          options={**options, "blocks": 1})
    left -= part.nbytes
    err = target[lo:hi] - np.asarray(part.reconstruct(), np.float64)
    target[hi:] -= g[hi - lo:, :hi - lo] @ np.linalg.solve(gbb, err)
    parts.append(part)
  return order, parts


def test_the_block_split_of_the_output_error_is_exact():
  """tr(EᵀHE) = block B under its Schur complement + the rest against the moved target."""
  rng = np.random.default_rng(3)
  m, n, lo = 12, 5, 4
  x = rng.normal(size=(40, m))
  h = x.T @ x
  w, q = rng.normal(size=(m, n)), rng.normal(size=(m, n))   # any approximation q
  b, r = slice(0, lo), slice(lo, m)
  e_b = w[b] - q[b]
  schur = np.linalg.inv(np.linalg.inv(h)[b, b])
  moved = w[r] + np.linalg.solve(h[r, r], h[r, b] @ e_b)
  e = w - q
  total = np.trace(e.T @ h @ e)
  split = np.trace(e_b.T @ schur @ e_b) + np.trace((moved - q[r]).T @ h[r, r] @ (moved - q[r]))
  np.testing.assert_allclose(split, total, rtol=1e-10)


def test_blocks_match_the_inverse_hessian_reference_and_fit_the_budget():
  w, h, _ = _problem()
  f = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h, options={**OPTS, "blocks": 4})
  assert isinstance(f, sc.RowBlocks) and f.sizes == (32, 32, 32, 32)
  assert sc.nbytes(f) <= 3 * w.size / 8
  order, parts = _reference(w, h, 4, 3, KEY, OPTS)
  np.testing.assert_array_equal(np.asarray(f.perm), order)
  want = sc.RowBlocks(jnp.asarray(order, jnp.int32), tuple(parts))
  # The same cuts up to float rounding of the moved targets (a sign may differ, not the error).
  assert abs(_err(w, f, h) - _err(w, want, h)) < 1e-3
  assert [sc.nbytes(p) for p in f.parts] == [sc.nbytes(p) for p in parts]


def test_blocks_lower_the_output_error_on_correlated_inputs():
  # The feedback alone (no backfitting, which narrows the gap: checked below).
  w, h, x = _problem()
  plain = {**OPTS, "backfit": 0}
  one = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h, options=plain)
  four = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h, options={**plain, "blocks": 4})
  assert _err(w, four, h) < 0.75 * _err(w, one, h)
  # ... on held-out inputs from the same distribution too.
  _, h2, _ = _problem(token_seed=2)
  assert _err(w, four, h2) < 0.8 * _err(w, one, h2)
  # With the default backfitting both are better, and the blocks still ahead.
  one_bf = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h, options=OPTS)
  four_bf = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h,
                         options={**OPTS, "blocks": 4})
  assert _err(w, one_bf, h) < _err(w, one, h) and _err(w, four_bf, h) < _err(w, four, h)
  assert _err(w, four_bf, h) < 0.9 * _err(w, one_bf, h)
  # The layer's product is the reconstruction's (each part on its gathered inputs).
  xs = jnp.asarray(x[:5], jnp.float32)
  np.testing.assert_allclose(np.asarray(four.matmul(xs, precision="highest")),
                             np.asarray(xs @ four.reconstruct()), rtol=1e-4, atol=1e-4)


def test_same_key_same_factors_and_fallback_keeps_the_better():
  w, h, _ = _problem()
  a = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h,
                   options={"search": "diag", "blocks": 2})
  b = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h,
                   options={"search": "diag", "blocks": 2})
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Under H = I the blocks have nothing to feed back: plain cuts of the whole kernel win.
  plain = sc.decompose(w, key=KEY, bits_per_weight=3, calibration=jnp.eye(w.shape[0]),
                       options={"search": "diag", "blocks": 4})
  assert not isinstance(plain, sc.RowBlocks)


def test_budget_curves_with_blocks_are_the_kept_parts():
  w, h, _ = _problem()
  opts = {"search": "diag", "blocks": 2}
  curves, kept = allocate.budget_curves({"k": w}, {"k": h}, key=KEY, budgets=(2.0, 3.0),
                                        options=opts, keep=(2.0, 3.0))
  for i, b in enumerate((2.0, 3.0)):
    f = sc.decompose(w, key=KEY, bits_per_weight=b, calibration=h, options=opts)
    np.testing.assert_allclose(curves["k"][1][i], _err(w, f, h) ** 2, rtol=2e-3)
    np.testing.assert_allclose(kept[("k", b)], np.asarray(f.reconstruct()), atol=1e-6)


@pytest.mark.parametrize("blocks,match", [
    (0, "blocks must be an int >= 1, got 0"),
    (-2, "blocks must be an int >= 1"),
    (True, "blocks must be an int >= 1, got True"),
    (2.5, "blocks must be an int >= 1, got 2.5"),
    (129, "blocks=129 exceeds the 128 input rows"),
    (128, r"blocks=128 on shape \(128, 48\): block 0 \(rows 0:1 in act order\) cannot be "
          r"compressed: .*pays for no calibrated cut"),
])
def test_bad_blocks_are_named(blocks, match):
  w, h, _ = _problem()
  with pytest.raises(ValueError, match=match):
    sc.decompose(w, key=KEY, bits_per_weight=3, calibration=h, options={**OPTS, "blocks": blocks})


def _row_blocks():
  a = jax.random.normal(jax.random.key(1), (10, 7))
  perm = jnp.asarray([3, 9, 0, 5, 1, 8, 2, 7, 6, 4], jnp.int32)
  top = sc.decompose(a[perm[:4]], key=KEY, width=5, outliers=0)
  rest = sc.InputScaled(jnp.linspace(0.5, 2.0, 6, dtype=jnp.float32),
                        sc.rtn(a[perm[4:]] * jnp.linspace(0.5, 2.0, 6)[:, None], bits=8))
  return a, sc.RowBlocks(perm, (top, rest))


def test_row_blocks_follow_the_protocol():
  a, f = _row_blocks()
  assert f.shape == (10, 7) and f.batch_shape == () and f.sizes == (4, 6)
  dense = np.zeros((10, 7), np.float32)
  dense[np.asarray(f.perm)] = np.concatenate([np.asarray(p.reconstruct()) for p in f.parts])
  np.testing.assert_array_equal(np.asarray(f.reconstruct()), dense)
  assert f.nbytes == 4 * 10 + sum(p.nbytes for p in f.parts)
  x = jax.random.normal(jax.random.key(2), (3, 10))
  np.testing.assert_allclose(np.asarray(sc.matmul(x, f)), np.asarray(x) @ dense, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda g, x: g.matmul(x))(f, x)),
                             np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)
  layer = SignedCutDense.from_factors(f, jnp.zeros((7,)))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x) @ dense, rtol=1e-4, atol=1e-4)


def test_row_blocks_refuse_what_is_not_a_permutation():
  _, f = _row_blocks()
  bad = sc.RowBlocks(f.perm.at[0].set(9), f.parts)
  with pytest.raises(ValueError, match=r"f.perm must be a permutation of 0..9"):
    bad.reconstruct()
  with pytest.raises(ValueError, match=r"perm must be int32 of shape \(10,\)"):
    sc.RowBlocks(f.perm[:9], f.parts).reconstruct()
  with pytest.raises(ValueError, match="every part must have 7 columns"):
    sc.RowBlocks(f.perm, (f.parts[0], sc.rtn(jnp.ones((6, 5)), bits=4)))
