"""decompose / reconstruct over pytrees: rules, budgets, skips, keys, jit."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_signedcut as sc
from conftest import cuts, part
from jax_signedcut._core import tree as _tree

KEY = jax.random.key(7)


def _params():
  ks = jax.random.split(jax.random.key(0), 6)
  return {
      "embed": {"embedding": jax.random.normal(ks[0], (40, 24))},
      "blocks": [
          {"attn": {"kernel": jax.random.normal(ks[1], (24, 24)), "bias": jnp.zeros(24)},
           "mlp": {"kernel": jax.random.normal(ks[2], (24, 33))}},
      ],
      "stacked": {"kernel": jax.random.normal(ks[3], (3, 24, 20))},
      "norm": {"scale": jnp.ones(24)},
      "tiny": jax.random.normal(ks[4], (24, 8)),
      "step": jnp.int32(3),
      "head": jax.random.normal(ks[5], (24, 17)),
  }


def _kinds(tree):
  return jax.tree_util.tree_map(
      lambda x: ("cut", cuts(x).width, x.batch_shape) if sc.is_compressed(x) else "kept",
      tree, is_leaf=sc.is_compressed)


def _same(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rules_first_match_default_and_skips():
  rules = [("attn", sc.Budget(width=10)),
           ("blocks/.*/kernel", {"width": 12}),   # attn already matched: only mlp here
           ("head", None)]                         # keep the output head dense
  f = sc.decompose(_params(), key=KEY, width=5, rules=rules, skip=("embed",))
  k = _kinds(f)
  assert k["blocks"][0]["attn"]["kernel"] == ("cut", 10, ())
  assert k["blocks"][0]["mlp"]["kernel"] == ("cut", 12, ())
  assert k["stacked"]["kernel"] == ("cut", 5, (3,))          # default budget, as a batch
  assert k["embed"]["embedding"] == "kept"                   # skip regex
  assert k["head"] == "kept"                                 # rule budget None
  assert k["tiny"] == "kept"                                 # a dim < min_dim
  assert k["norm"]["scale"] == k["blocks"][0]["attn"]["bias"] == k["step"] == "kept"
  assert f["step"] is _params()["step"] or int(f["step"]) == 3


def test_rate_budget_resolves_per_leaf_and_min_dim():
  p = _params()
  p = {"tiny": p["tiny"], "blocks": p["blocks"], "head": p["head"]}
  f = sc.decompose(p, key=KEY, rate=0.5, min_dim=8, skip=("attn", "head"))
  assert cuts(f["tiny"]).width == sc.width_for_rate(24, 8, 0.5)
  assert cuts(f["blocks"][0]["mlp"]["kernel"]).width == sc.width_for_rate(24, 33, 0.5)


def test_no_default_means_only_rules():
  f = sc.decompose(_params(), key=KEY, rules=[("mlp", sc.Budget(bits_per_weight=4))])
  k = _kinds(f)
  assert k["blocks"][0]["mlp"]["kernel"][0] == "cut"
  assert k["blocks"][0]["attn"]["kernel"] == k["stacked"]["kernel"] == "kept"


def test_leaf_factors_depend_on_key_path_and_values_only():
  p = _params()
  f = sc.decompose(p, key=KEY, width=6)
  leaf = p["blocks"][0]["mlp"]["kernel"]
  want = sc.decompose(leaf, key=_tree.leaf_key(KEY, "blocks/0/mlp/kernel"), width=6)
  _same(f["blocks"][0]["mlp"]["kernel"], want)
  # Dropping other leaves does not change this one.
  alone = sc.decompose({"blocks": [{"mlp": {"kernel": leaf}}]}, key=KEY, width=6)
  _same(alone["blocks"][0]["mlp"]["kernel"], want)
  # Stacked leaves: one key for all layers (the batch semantics of decompose).
  st = p["stacked"]["kernel"]
  _same(f["stacked"]["kernel"],
        sc.decompose(st, key=_tree.leaf_key(KEY, "stacked/kernel"), width=6))
  # A different path gives a different key.
  assert _tree.leaf_key(KEY, "a/kernel") is not None
  assert not np.array_equal(jax.random.key_data(_tree.leaf_key(KEY, "a")),
                            jax.random.key_data(_tree.leaf_key(KEY, "b")))


def test_jit_compiles_once_and_equals_eager_and_leafwise():
  full = _params()
  p = {"mlp": full["blocks"][0]["mlp"], "stacked": full["stacked"], "embed": full["embed"],
       "norm": full["norm"]}
  traces = []

  def run(p):
    traces.append(1)
    return sc.decompose(p, key=KEY, width=8, skip=("embed",),
                        rules=[("stacked", sc.Budget(width=4, max_error=0.5))])

  jitted = jax.jit(run)
  a = jitted(p)
  p2 = jax.tree.map(lambda x: x * 1, p)
  b = jitted(p2)
  jitted(p2)
  assert len(traces) == 1  # the same shapes: traced (and compiled) once
  _same(a, b)
  eager = sc.decompose(p, key=KEY, width=8, skip=("embed",),
                       rules=[("stacked", sc.Budget(width=4, max_error=0.5))])
  _same(a, eager)
  leafwise = sc.decompose_leafwise(p, key=KEY, width=8, skip=("embed",), progress=False,
                                   rules=[("stacked", sc.Budget(width=4, max_error=0.5))])
  _same(a, leafwise)


def test_reconstruct_tree_and_nnx_state():
  model = nnx.Sequential(nnx.Linear(20, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 18, rngs=nnx.Rngs(1)))
  state = nnx.state(model)
  f = sc.decompose(state, key=KEY, rate=1.0)
  assert isinstance(cuts(f["layers"][0]["kernel"].get_value()), sc.SignedCut)
  r = sc.reconstruct(f)
  np.testing.assert_array_equal(r["layers"][1]["bias"][...], state["layers"][1]["bias"][...])
  dense = r["layers"][0]["kernel"][...]
  assert dense.shape == (20, 32)
  np.testing.assert_allclose(dense, sc.reconstruct(f["layers"][0]["kernel"].get_value()))
  err = jnp.linalg.norm(dense - state["layers"][0]["kernel"][...]) / jnp.linalg.norm(
      state["layers"][0]["kernel"][...])
  assert err < 0.5


def test_unused_rule_warns():
  p = {"mlp": {"kernel": _params()["head"], "bias": jnp.zeros(17)}}
  with pytest.warns(UserWarning, match=r"rules\[1\] \('nope'\)"):
    sc.decompose(p, key=KEY, rules=[("mlp", sc.Budget(width=3)), ("nope", sc.Budget(width=3))])
  with pytest.warns(UserWarning, match="bias"):  # only matches 1-D leaves: selects nothing
    sc.decompose(p, key=KEY, width=3, rules=[("bias", sc.Budget(width=3))])


@pytest.mark.parametrize("rules, match", [
    ([("(unclosed", sc.Budget(width=3))], r"rules\[0\] \('\(unclosed'\): bad regex"),
    ([("mlp", sc.Budget(rate=-1.0))], r"rules\[0\] \('mlp'\): rate must be"),
    ([("ok", {"width": 2}), ("mlp", sc.Budget(width=2, rate=0.5))],
     r"rules\[1\] \('mlp'\): exactly one of"),
    ([("mlp", {"widht": 3})], r"rules\[0\] \('mlp'\): unknown budget keys \['widht'\]"),
    ([("mlp", sc.Budget(width=0))], r"rules\[0\].*width must be an int >= 1, got 0"),
    ([("mlp", sc.Budget(width=4, max_error=0.0))], r"max_error must be"),
    ([("mlp", 3)], r"rules\[0\].*budget must be a Budget"),
    (["mlp"], r"rules\[0\] must be a \(regex, budget\) pair"),
    ("mlp", r"rules must be a list"),
])
def test_bad_rules(rules, match):
  with pytest.raises(ValueError, match=match):
    sc.decompose(_params(), key=KEY, rules=rules)


def test_bad_input():
  p = _params()
  p["blocks"][0]["mlp"]["kernel"] = p["blocks"][0]["mlp"]["kernel"].at[3, 4].set(jnp.nan)
  with pytest.raises(ValueError, match=r"leaf 'blocks/0/mlp/kernel' .*NaN/Inf.*\(3, 4\)"):
    sc.decompose(p, key=KEY, width=4)
  # The same NaN in a leaf the rules keep dense is fine.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sc.decompose(p, key=KEY, width=4, skip=("mlp",))
  with pytest.raises(ValueError, match="needs a budget"):
    sc.decompose(_params(), key=KEY)
  with pytest.raises(ValueError, match="needs a width, rate or bits_per_weight"):
    sc.decompose(_params(), key=KEY, max_error=0.1)
  with pytest.raises(ValueError, match="leaf 'head' of shape \\(24, 17\\): rate="):
    sc.decompose({"head": _params()["head"]}, key=KEY, rate=1e-4)
  with pytest.raises(ValueError, match="a bare array is one matrix"):
    sc.decompose(jnp.ones((20, 20)), key=KEY, width=2, rules=[("x", sc.Budget(width=1))])
  with pytest.raises(ValueError, match="ndim >= 2"):
    sc.decompose(jnp.ones(20), key=KEY, width=2)
  with pytest.raises(ValueError, match="skip\\[0\\].*bad regex"):
    sc.decompose(_params(), key=KEY, width=2, skip=("[",))
  with pytest.raises(ValueError, match="min_dim"):
    sc.decompose(_params(), key=KEY, width=2, min_dim=0)


def test_nested_list_of_numbers_is_still_one_matrix():
  f = sc.decompose([[1.0, 2.0], [3.0, -4.0]], key=KEY, width=2, outliers=0)
  assert isinstance(f, sc.SignedCut) and f.shape == (2, 2)
