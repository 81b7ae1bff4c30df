"""The optional low-rank part: A ≈ U·Vᵀ (bf16) + S·diag(c)·Tᵀ (+ sparse)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import jax_signedcut as sc
from conftest import cuts, part
from jax_signedcut import _cli
from jax_signedcut._signedcut import budget as _budget
from jax_signedcut._signedcut import decompose as _decompose
from jax_signedcut._parts import lowrank as _lowrank
from jax_signedcut._signedcut import oracle as _oracle
from jax_signedcut._signedcut import start as _start
from jax_signedcut.linen import SignedCutDense as LinenDense
from jax_signedcut.linen import convert_params
from jax_signedcut.nnx import SignedCutDense, swap_linears

_HI = jax.lax.Precision.HIGHEST


def rank(f):
  """The rank of ``f``'s low-rank part (0 when it has none)."""
  p = part(f, sc.LowRankPart)
  return 0 if p is None else p.rank


def smooth(shape, seed, heavy=0):
  """A nearly low-rank matrix (like a position-embedding table) plus noise and planted entries."""
  m, n = shape
  k = jax.random.key(seed)
  i = jnp.arange(m, dtype=jnp.float32)[:, None] / m
  j = jnp.arange(n, dtype=jnp.float32)[None, :]
  a = jnp.sin(3 * i + 0.1 * j) + 0.5 * jnp.cos(7 * i * (1 + 0.01 * j)) \
      + 0.05 * jax.random.normal(k, shape)
  if heavy:
    idx = jax.random.choice(jax.random.fold_in(k, 1), m * n, (heavy,), replace=False)
    a = a.reshape(-1).at[idx].set(40.0).reshape(shape)
  return np.asarray(a, np.float32)


def oracle(a, r, sparse):
  """(A − P, the rank-r truncated SVD of A − P (float64), number of sparse entries)."""
  m, n = a.shape
  rem = np.array(a, np.float32)
  num_sparse = 0
  if sparse is not None:
    idx, val, num_sparse = (np.asarray(x) for x in sparse)
    rem.reshape(-1)[idx[:num_sparse]] -= val[:num_sparse]
  u, s, vt = np.linalg.svd(rem.astype(np.float64), full_matrices=False)
  low = (u[:, :r] * s[:r]) @ vt[:r]                       # the rank-r truncated SVD
  return rem, low, num_sparse


@pytest.mark.parametrize("shape,r,bits,heavy", [
    ((33, 70), 3, 3, 0), ((64, 48), 4, 3, 4), ((37, 37), 1, 2, 0)])
def test_matches_the_oracle(shape, r, bits, heavy):
  m, n = shape
  a = smooth(shape, 1, heavy)
  key = jax.random.key(7)
  f = sc.decompose(a, key=key, bits_per_weight=bits, lowrank=r, backend="jnp")
  assert part(f, sc.LowRankPart).u.dtype == jnp.bfloat16 and part(f, sc.LowRankPart).u.shape == (m, r) and part(f, sc.LowRankPart).v.shape == (n, r)
  assert rank(f) == r
  sp = part(f, sc.Sparse)
  sparse = None if sp is None else (sp.idx, sp.val, sp.count)
  assert (sp is not None and int(sp.count) > 0) == bool(heavy)
  rem, low, k_sparse = oracle(a, r, sparse)
  uv = np.asarray(part(f, sc.LowRankPart).u, np.float32) @ np.asarray(part(f, sc.LowRankPart).v, np.float32).T
  # The stored part is the bf16 rounding of the rank-r SVD of A − P.
  assert np.linalg.norm(uv - low) <= 1e-2 * np.linalg.norm(low)
  # The columns are U·√σ and V·√σ (up to a sign per column).
  _, s, _ = np.linalg.svd(rem.astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(np.sum(np.square(np.asarray(part(f, sc.LowRankPart).u, np.float64)), 0), s[:r],
                             rtol=2e-2)
  np.testing.assert_allclose(np.sum(np.square(np.asarray(part(f, sc.LowRankPart).v, np.float64)), 0), s[:r],
                             rtol=2e-2)
  # Then the plain greedy on A − P − bf16(U)·bf16(V)ᵀ (product in f32).
  r_cuts = jnp.asarray(rem) - jnp.matmul(part(f, sc.LowRankPart).u.astype(jnp.float32),
                                         part(f, sc.LowRankPart).v.astype(jnp.float32).T, precision=_HI)
  w = cuts(f).width
  s_bits, t_bits, c, _ = jax.jit(_oracle.greedy)(r_cuts, _start.start_words(key, w, n))
  # Budget: r·(m+n)·2 bytes and 8 per sparse entry come off the rate/bits budget.
  budget = bits * m * n / 8 - 2 * r * (m + n) - 8 * k_sparse
  k = min(w, int(np.floor(budget / _budget.bytes_per_cut(m, n))))
  assert int(cuts(f).num_cuts) == k
  np.testing.assert_array_equal(np.asarray(cuts(f).s_bits[:k]), np.asarray(s_bits[:k]))
  np.testing.assert_array_equal(np.asarray(cuts(f).t_bits[:k]), np.asarray(t_bits[:k]))
  np.testing.assert_allclose(np.asarray(cuts(f).c[:k]), np.asarray(c[:k]), rtol=1e-6)
  assert not np.any(np.asarray(cuts(f).c[k:])) and not np.any(np.asarray(cuts(f).s_bits[k:]))
  # The C++ kernel gives the same cuts; the total bytes stay in the budget.
  g = sc.decompose(a, key=key, bits_per_weight=bits, lowrank=r)
  chex.assert_trees_all_close(g, f, rtol=1e-5)
  per_cut = 4 * (-(-m // 32) - (-n // 32)) + 4
  assert sc.nbytes(f) == k * per_cut + 2 * r * (m + n) + 8 * k_sparse
  want = np.asarray(a) - rem + uv
  for j in range(k):
    want = want + float(c[j]) * np.outer(_unpack(s_bits[j], m), _unpack(t_bits[j], n))
  np.testing.assert_allclose(np.asarray(sc.reconstruct(f)), want, rtol=1e-4, atol=1e-4)


def _unpack(bits, size):
  from jax_signedcut._signedcut import packing as _packing  # noqa: PLC0415
  return np.asarray(_packing.unpack_signs(bits, size))


def test_nbytes_counts_two_bytes_per_factor_entry():
  a = smooth((40, 30), 2)
  f = sc.decompose(a, key=jax.random.key(0), width=5, lowrank=3, outliers=0)
  g = sc.decompose(a, key=jax.random.key(0), width=5, outliers=0)
  assert sc.nbytes(f) == sc.nbytes(g) + 2 * 3 * (40 + 30)   # with width, on top of the cuts
  assert int(cuts(f).num_cuts) == 5


def test_lowrank_zero_is_the_plain_decomposition():
  a = smooth((40, 30), 3, heavy=2)
  for kw in (dict(bits_per_weight=3), dict(width=12, max_error=0.2)):
    f = sc.decompose(a, key=jax.random.key(0), lowrank=0, **kw)
    g = sc.decompose(a, key=jax.random.key(0), **kw)
    assert part(f, sc.LowRankPart) is None and rank(f) == 0
    chex.assert_trees_all_equal(f, g)


def test_low_rank_helps_a_smooth_matrix():
  a = smooth((128, 96), 4)
  errs = [float(sc.relative_error(a, sc.decompose(a, key=jax.random.key(0), bits_per_weight=2,
                                                  lowrank=r))) for r in (0, 4)]
  assert errs[1] < 0.8 * errs[0]


def test_truncate_keeps_the_low_rank_part_and_matches_decompose():
  a = smooth((48, 40), 5, heavy=3)
  key = jax.random.key(1)
  f = sc.decompose(a, key=key, bits_per_weight=6, lowrank=4)
  for kw in (dict(bits_per_weight=3), dict(rate=3 / 16)):
    chex.assert_trees_all_equal(sc.truncate(f, **kw), sc.decompose(a, key=key, lowrank=4, **kw))
  g = sc.truncate(f, 3)
  assert int(cuts(g).num_cuts) == 3 and rank(g) == 4
  np.testing.assert_array_equal(np.asarray(part(g, sc.LowRankPart).u), np.asarray(part(f, sc.LowRankPart).u))
  with pytest.raises(ValueError, match="704 bytes: LowRankPart"):
    sc.truncate(f, bits_per_weight=0.25)


def test_max_error_counts_the_low_rank_part():
  a = smooth((64, 48), 6)
  f = sc.decompose(a, key=jax.random.key(0), width=500, max_error=0.02, lowrank=2)
  k = int(cuts(f).num_cuts)
  assert 0 < k < 500
  assert float(sc.relative_error(a, f)) <= 0.02 * 1.001
  assert float(sc.relative_error(a, sc.truncate(f, k - 1))) > 0.02 * 0.999
  # A low-rank part that already meets the target needs no cut.
  g = sc.decompose(a, key=jax.random.key(0), width=50, max_error=0.9, lowrank=2)
  assert int(cuts(g).num_cuts) == 0 and float(sc.relative_error(a, g)) <= 0.9


def test_batch_jit_vmap_and_leafwise():
  a = np.stack([smooth((40, 30), s, heavy=2 * (s % 2)) for s in range(3)])
  key = jax.random.key(4)
  fb = sc.decompose(a, key=key, bits_per_weight=4, lowrank=3)
  assert part(fb, sc.LowRankPart).u.shape == (3, 40, 3) and part(fb, sc.LowRankPart).v.shape == (3, 30, 3)
  for i in range(3):
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], fb),
                                sc.decompose(a[i], key=key, bits_per_weight=4, lowrank=3))
  fj = jax.jit(lambda x: sc.decompose(x, key=key, bits_per_weight=4, lowrank=3))(a)
  chex.assert_trees_all_equal(fj, fb)
  fv = jax.vmap(lambda x: sc.decompose(x, key=key, bits_per_weight=4, lowrank=3))(a)
  chex.assert_trees_all_equal(fv, fb)
  # The leaf-by-leaf path (host outlier split) and the per-rule budget field.
  fl = _decompose._decompose_leaf(a, key=key, bits_per_weight=4, lowrank=3)  # noqa: SLF001
  chex.assert_trees_all_equal(fl, fb)
  tree = {"pos": a[0], "q": a[1]}
  ft = sc.decompose_leafwise(tree, key=key, rules=[("pos", {"bits_per_weight": 4, "lowrank": 3})],
                             bits_per_weight=4, progress=False)
  assert rank(ft["pos"]) == 3 and part(ft["q"], sc.LowRankPart) is None
  chex.assert_trees_all_equal(ft, sc.decompose(tree, key=key, bits_per_weight=4, rules=[
      ("pos", sc.Budget(bits_per_weight=4, lowrank=3))]))


def test_backfit_keeps_the_low_rank_part():
  a = smooth((48, 40), 8)
  f = sc.decompose(a, key=jax.random.key(0), bits_per_weight=3, lowrank=3)
  g = sc.backfit(f, a, passes=2)
  np.testing.assert_array_equal(np.asarray(part(g, sc.LowRankPart).u), np.asarray(part(f, sc.LowRankPart).u))
  assert float(sc.relative_error(a, g)) <= float(sc.relative_error(a, f)) * (1 + 1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(lowrank=-1), "lowrank must be an int >= 0 or .auto., got -1"),
    (dict(lowrank=1.5), "lowrank must be an int >= 0 or .auto., got 1.5"),
    (dict(lowrank=True), "lowrank must be an int >= 0 or .auto., got True"),
    (dict(lowrank="2"), "lowrank must be an int >= 0"),
    (dict(lowrank="Auto"), "lowrank must be an int >= 0"),
    (dict(lowrank=31), r"lowrank=31 exceeds min\(m, n\) = 30"),
    (dict(lowrank=30, bits_per_weight=2), r"lowrank=30 needs 4200 bytes .* budget is 300 bytes"),
])
def test_bad_lowrank(bad, match):
  kw = {"rate": 0.5, **bad} if "bits_per_weight" not in bad else bad
  with pytest.raises(ValueError, match=match):
    sc.decompose(np.ones((40, 30), np.float32), key=jax.random.key(0), **kw)


def test_bad_lowrank_in_rules_and_cli():
  with pytest.raises(ValueError, match="rule.*lowrank must be an int >= 0"):
    sc.decompose({"w": np.ones((40, 30), np.float32)}, key=jax.random.key(0),
                 rules=[("w", {"rate": 0.5, "lowrank": -2})])
  with pytest.raises(ValueError, match=r"leaf 'w' of shape \(40, 30\): lowrank=20 needs"):
    sc.decompose({"w": np.ones((40, 30), np.float32)}, key=jax.random.key(0),
                 rules=[("w", {"bits_per_weight": 2, "lowrank": 20})])
  assert _cli.parse_budget("bits=2,lowrank=16") == sc.Budget(bits_per_weight=2.0, lowrank=16)
  with pytest.raises(Exception, match="lowrank must be an int >= 0"):
    _cli.parse_budget("bits=2,lowrank=x")


def test_checkpoint_round_trip_and_corruption(tmp_path):
  a = smooth((40, 70), 9, heavy=3)
  f = sc.decompose(a, key=jax.random.key(0), bits_per_weight=4, lowrank=5)
  tree = {"pos": f, "plain": sc.decompose(a, key=jax.random.key(0), bits_per_weight=4),
          "stack": sc.decompose(np.stack([a, -a]), key=jax.random.key(1), width=9, lowrank=2)}
  path = tmp_path / "f.safetensors"
  sc.save(path, tree)
  with safe_open(str(path), framework="numpy") as fh:
    assert fh.metadata()["format_version"] == str(sc.checkpoint.VERSION)
  back = sc.load(path)
  for k in tree:
    chex.assert_trees_all_equal(back[k], tree[k])
  assert part(back["plain"], sc.LowRankPart) is None
  np.testing.assert_array_equal(np.asarray(sc.expand(back)["pos"], np.float32),
                                np.asarray(sc.reconstruct(f, jnp.bfloat16), np.float32))
  chex.assert_trees_all_equal(sc.load(path, truncate_bits=3.5)["pos"],
                              sc.truncate(f, bits_per_weight=3.5))
  # orbax
  sc.save_orbax(tmp_path / "orbax", tree)
  chex.assert_trees_all_equal(sc.load_orbax(tmp_path / "orbax"), tree)

  from test_checkpoint import node, rewrite  # noqa: PLC0415
  def nan(ts):
    ts["pos/parts/0/u"] = np.full_like(ts["pos/parts/0/u"], np.nan)
  rewrite(path, tensors=nan)
  with pytest.raises(ValueError, match="low-rank factor u contains NaN"):
    sc.load(path)
  sc.save(path, tree)
  rewrite(path, body=lambda b: node(b, "pos", 0)["static"].update(shape=[40, 71]))
  with pytest.raises(ValueError, match="v has shape"):
    sc.load(path)


@pytest.mark.parametrize("impl,batch", [("jnp", ()), ("ffi", (5,)), ("auto", (2, 3))])
def test_apply_equals_reconstruct(impl, batch):
  a = smooth((40, 70), 10, heavy=2)
  f = sc.decompose(a, key=jax.random.key(0), bits_per_weight=3, lowrank=4)
  x = jax.random.normal(jax.random.key(1), (*batch, 40))
  ref = np.asarray(jnp.matmul(x, sc.reconstruct(f), precision=_HI))
  for y in (sc.apply_signed_cut(x, f, impl=impl),
            jax.jit(lambda x, f: sc.apply_signed_cut(x, f, impl=impl))(x, f),
            sc.apply_signed_cut(x, f, dense=True)):
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_nnx_layers():
  class Two(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(40, 32, rngs=rngs)
      self.b = nnx.Linear(32, 24, rngs=rngs)

    def __call__(self, x):
      return self.b(self.a(x))

  model = Two(nnx.Rngs(0))
  model.a.kernel = nnx.Param(jnp.asarray(smooth((40, 32), 11)))
  x = jax.random.normal(jax.random.key(2), (3, 40))
  f = sc.decompose(nnx.state(model, nnx.Param), key=jax.random.key(0),
                   rules=[("a/kernel", {"bits_per_weight": 4, "lowrank": 3}),
                          ("b/kernel", {"bits_per_weight": 3})])
  ref = nnx.clone(model)
  nnx.update(ref, sc.reconstruct(f))
  swap_linears(model, f)
  assert isinstance(model.a, SignedCutDense) and rank(model.a.factors) == 3
  assert rank(model.b.factors) == 0
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(ref(x)), atol=1e-4)
  lin = model.a.to_linear()
  np.testing.assert_allclose(np.asarray(lin.kernel[...]), np.asarray(ref.a.kernel[...]),
                             atol=1e-6)


def test_linen_convert_params():
  class One(nn.Module):
    compressed: bool
    rank: int = 0

    @nn.compact
    def __call__(self, x):
      if self.compressed:
        return LinenDense(24, width=sc.width_for_bits(40, 24, 3), lowrank=self.rank,
                          in_features=40, name="fc")(x)
      return nn.Dense(24, name="fc")(x)

  x = jax.random.normal(jax.random.key(1), (3, 40))
  variables = One(False).init(jax.random.key(0), x)
  kernel = jnp.asarray(smooth((40, 24), 12))
  variables = {"params": {"fc": {"kernel": kernel, "bias": variables["params"]["fc"]["bias"]}}}
  f = sc.decompose(variables, key=jax.random.key(0), bits_per_weight=3, lowrank=2, outliers=0)
  with pytest.raises(ValueError, match=r"converted Sum\(LowRankPart, SignedCut\)"):
    convert_params(variables, f, module=One(True), inputs=x)
  new = convert_params(variables, f, module=One(True, 2), inputs=x)
  ref = x @ sc.reconstruct(f)["params"]["fc"]["kernel"] + variables["params"]["fc"]["bias"][None]
  np.testing.assert_allclose(np.asarray(One(True, 2).apply(new, x)), np.asarray(ref), atol=1e-4)


def test_cli_lowrank_rule(tmp_path):
  from safetensors.numpy import save_file  # noqa: PLC0415
  src = tmp_path / "in.safetensors"
  save_file({"pos": smooth((64, 48), 13), "q": smooth((48, 48), 14)}, str(src))
  out = tmp_path / "out.safetensors"
  assert _cli.main(["compress", str(src), str(out), "--bits", "2", "--rule", "pos=bits=4,lowrank=4",
                    "-q"]) == 0
  back = sc.load(out)
  assert rank(back["pos"]) == 4 and part(back["q"], sc.LowRankPart) is None
  ref = sc.decompose({"pos": smooth((64, 48), 13)}, key=jax.random.key(0), bits_per_weight=4,
                     lowrank=4)
  chex.assert_trees_all_equal(back["pos"], ref["pos"])
  assert _cli.main(["compress", str(src), str(tmp_path / "o2.safetensors"), "--bits", "4",
                    "--lowrank", "2", "-q"]) == 0
  assert all(rank(f) == 2 for f in sc.load(tmp_path / "o2.safetensors").values())


def test_auto_picks_the_rank_of_least_error():
  key = jax.random.key(3)
  a = smooth((128, 96), 15)
  f = sc.decompose(a, key=key, bits_per_weight=4, lowrank="auto")
  assert _lowrank.candidates(128, 96, 4 * 128 * 96 / 8) == (0, 4, 8)   # 16·224·2 > 6144
  errs = {r: float(sc.relative_error(a, sc.decompose(a, key=key, bits_per_weight=4, lowrank=r)))
          for r in (0, 4, 8)}
  best = min(errs, key=errs.get)
  assert best > 0 and rank(f) == best
  chex.assert_trees_all_equal(f, sc.decompose(a, key=key, bits_per_weight=4, lowrank=best))
  # A Gaussian matrix keeps no low-rank part; the leaf path and the CLI's rule agree.
  g = np.asarray(jax.random.normal(jax.random.key(5), (64, 48)))
  assert part(sc.decompose(g, key=key, bits_per_weight=2, lowrank="auto"), sc.LowRankPart) is None
  fl = _decompose._decompose_leaf(a, key=key, bits_per_weight=4, lowrank="auto")  # noqa: SLF001
  chex.assert_trees_all_equal(fl, f)
  assert _cli.parse_budget("bits=2,lowrank=auto").lowrank == "auto"
  with pytest.raises(ValueError, match="cannot run under jax.jit"):
    jax.jit(lambda x: sc.decompose(x, key=key, bits_per_weight=2, lowrank="auto"))(a)
