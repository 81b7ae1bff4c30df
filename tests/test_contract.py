"""One contract for every compression method and every compressed type.

A new method is one line in ``METHODS``; it then gets every check below: jit,
vmap over a stack, nbytes within the budget, save/load bit-exact, matmul ==
x @ reconstruct(), a second call compiles nothing, and clear errors for bad
budgets.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc

# (id, decompose keyword arguments). Bits per weight is the common currency.
METHODS = [
    ("signed_cut", dict()),
    ("signed_cut+parts", dict(outliers=0.01, lowrank=2)),
    ("signed_cut-no-outliers", dict(outliers=0)),
    ("rtn", dict(method="rtn")),
    ("rtn-groups", dict(method="rtn", options={"group_size": 16})),
    ("lplr", dict(method="lplr", options={"bits": (4, 4)})),
    ("dsvd", dict(method="dsvd")),
    ("lp_lowrank", dict(method="lp_lowrank", options={"p": 1.5, "iters": 3})),
]
BITS = 6.0
SHAPE = (40, 33)     # neither a multiple of 32 nor of 64


def _matrix(shape=SHAPE, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _run(a, kw, key=jax.random.key(7)):
  return sc.decompose(a, key=key, bits_per_weight=BITS, **kw)


def _leaves_equal(f, g):
  fa, fd = jax.tree.flatten(f)
  ga, gd = jax.tree.flatten(g)
  assert fd == gd
  for x, y in zip(fa, ga):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(params=METHODS, ids=[m[0] for m in METHODS])
def method(request):
  return request.param[1]


def test_is_compressed_with_the_protocol(method):
  a = _matrix()
  f = _run(a, method)
  assert sc.is_compressed(f)
  assert f.shape == SHAPE and f.batch_shape == ()
  dense = sc.reconstruct(f)
  assert dense.shape == SHAPE and dense.dtype == jnp.float32
  assert sc.reconstruct(f, jnp.bfloat16).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(f.reconstruct()), np.asarray(dense))
  err = float(sc.relative_error(a, f))
  assert 0 <= err < 1


def test_nbytes_within_budget(method):
  f = _run(_matrix(), method)
  m, n = SHAPE
  assert 0 < sc.nbytes(f) == f.nbytes <= BITS * m * n / 8


def test_jit_equals_eager(method):
  a = _matrix()
  eager = _run(a, method)
  jitted = jax.jit(lambda a, k: sc.decompose(a, key=k, bits_per_weight=BITS, **method))(
      a, jax.random.key(7))
  _leaves_equal(eager, jitted)


def test_vmap_over_a_stack_equals_per_matrix(method):
  stack = jnp.stack([_matrix(seed=1), _matrix(seed=2)])
  f = jax.vmap(lambda a: _run(a, method))(stack)
  assert f.batch_shape == (2,)
  for i in range(2):
    one = _run(stack[i], method)
    np.testing.assert_allclose(np.asarray(sc.reconstruct(f)[i]), np.asarray(sc.reconstruct(one)),
                               rtol=1e-5, atol=1e-5)


def test_matmul_equals_x_at_reconstruct(method):
  f = _run(_matrix(), method)
  x = jax.random.normal(jax.random.key(3), (5, SHAPE[0]))
  want = np.asarray(x) @ np.asarray(f.reconstruct(), np.float64)
  np.testing.assert_allclose(np.asarray(f.matmul(x)), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(sc.matmul(x[0], f)), want[0], rtol=1e-4, atol=1e-4)


def test_matmul_of_a_stack(method):
  stack = jnp.stack([_matrix(seed=1), _matrix(seed=2)])
  f = jax.vmap(lambda a: _run(a, method))(stack)
  x = jax.random.normal(jax.random.key(3), (2, 4, SHAPE[0]))
  np.testing.assert_allclose(np.asarray(f.matmul(x)), np.asarray(x @ f.reconstruct()),
                             rtol=1e-4, atol=1e-4)


def test_save_load_bit_exact(method, tmp_path):
  f = _run(_matrix(), method)
  tree = {"layer": {"kernel": f, "bias": jnp.arange(3.0)}}
  sc.save(tmp_path / "f.safetensors", tree)
  back = sc.load(tmp_path / "f.safetensors")
  assert type(back["layer"]["kernel"]) is type(f)
  _leaves_equal(f, back["layer"]["kernel"])
  np.testing.assert_array_equal(np.asarray(back["layer"]["bias"]), np.arange(3.0))


def test_second_call_compiles_nothing(method, caplog):
  a, b = _matrix(seed=0), _matrix(seed=1)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  run = jax.jit(lambda a, k: sc.decompose(a, key=k, bits_per_weight=BITS, **method))
  jax.block_until_ready(run(a, k0))
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    caplog.clear()
    jax.block_until_ready(run(b, k1))
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "4", True])
def test_bad_budget_is_named(method, bad):
  with pytest.raises((ValueError, TypeError), match="bits_per_weight"):
    _run_bits(method, bad)


def _run_bits(method, bits):
  return sc.decompose(_matrix(), key=jax.random.key(0), bits_per_weight=bits, **method)


def test_mixed_pytree_roundtrip(tmp_path):
  """An RTN, an LPLR and a signed-cut leaf in one pytree: reconstruct, nbytes, save, load."""
  a, b, c = _matrix(seed=1), _matrix(seed=2), _matrix(seed=3)
  params = {"q": a, "k": b, "v": c, "bias": jnp.ones(4)}
  f = sc.decompose(params, key=jax.random.key(0), bits_per_weight=4,
                   rules=[("^q$", sc.Budget(bits_per_weight=4, method="rtn")),
                          ("^k$", sc.Budget(bits_per_weight=4, method="lplr"))])
  assert isinstance(f["q"], sc.QuantizedMatrix)
  assert isinstance(f["k"], sc.LowRank)
  assert isinstance(f["v"], sc.Sum) and f["v"].part(sc.SignedCut) is not None
  assert sc.nbytes(f) == sum(f[k].nbytes for k in "qkv")
  dense = sc.reconstruct(f)
  for k, x in (("q", a), ("k", b), ("v", c)):
    assert dense[k].shape == x.shape
  sc.save(tmp_path / "mixed.safetensors", f)
  back = sc.load(tmp_path / "mixed.safetensors")
  _leaves_equal(f, back)
  errs = sc.relative_error(params, f)
  assert errs["bias"] is None and all(0 < float(errs[k]) < 1 for k in "qkv")


def test_tensor_cuts_implement_the_protocol():
  t = jax.random.normal(jax.random.key(0), (6, 5, 7))
  f = sc.decompose_tensor(t, key=jax.random.key(1), width=12)
  assert sc.is_compressed(f) and f.shape == (6, 5, 7)
  np.testing.assert_array_equal(np.asarray(sc.reconstruct(f)),
                                np.asarray(sc.reconstruct_tensor(f)))
  x = jax.random.normal(jax.random.key(2), (3, 6))
  np.testing.assert_allclose(np.asarray(f.matmul(x)),
                             np.asarray(x @ f.reconstruct().reshape(6, -1)), rtol=1e-5, atol=1e-5)
  assert f.nbytes == sc.nbytes(f) > 0


def test_parts_sum():
  a = _matrix()
  f = sc.decompose(a, key=jax.random.key(0), bits_per_weight=BITS, outliers=0.01, lowrank=2)
  assert [type(p) for p in f.parts] == [sc.LowRankPart, sc.SignedCut, sc.Sparse]
  total = sum(np.asarray(p.reconstruct(), np.float64) for p in f.parts)
  np.testing.assert_allclose(np.asarray(f.reconstruct()), total, rtol=1e-6, atol=1e-6)
  assert f.nbytes == sum(p.nbytes for p in f.parts)


def test_protocol_functions_reject_plain_arrays():
  with pytest.raises(TypeError, match="compressed"):
    sc.reconstruct(jnp.ones((3, 3)))
  with pytest.raises(TypeError, match="compressed"):
    sc.nbytes(np.ones((3, 3)))
  with pytest.raises(TypeError, match="compressed"):
    sc.matmul(jnp.ones(3), jnp.ones((3, 3)))


def test_unknown_method_and_options_are_named():
  a = _matrix()
  with pytest.raises(ValueError, match="method must be one of"):
    sc.decompose(a, key=jax.random.key(0), bits_per_weight=4, method="int4")
  with pytest.raises(ValueError, match="unknown"):
    sc.decompose(a, key=jax.random.key(0), bits_per_weight=4, method="rtn",
                 options={"groupsize": 8})
  with pytest.raises(ValueError, match="width"):
    sc.decompose(a, key=jax.random.key(0), width=4, method="rtn")
  with pytest.raises(ValueError, match="rules\\[0\\]"):
    sc.decompose({"w": a}, key=jax.random.key(0), bits_per_weight=4,
                 rules=[("w", sc.Budget(bits_per_weight=4, method="nope"))])


@pytest.mark.parametrize("precision", [None, "bf16_bf16_f32", "highest"])
def test_matmul_takes_a_precision(method, precision):
  """Every type takes matmul's precision (f32 types ignore it; bad values are refused)."""
  f = _run(_matrix(), method)
  x = jax.random.normal(jax.random.key(3), (5, SHAPE[0]))
  want = np.asarray(x) @ np.asarray(f.reconstruct(), np.float64)
  np.testing.assert_allclose(np.asarray(f.matmul(x, precision=precision)), want, rtol=1e-4,
                             atol=1e-4)
  with pytest.raises(ValueError, match="precision must be"):
    sc.matmul(x, f, precision="bf16")
