"""NNX SignedCutDense and swap_linears: converted model == model with reconstructed kernels.

Every method's factors (signed cuts alone or summed with sparse and low-rank
parts, RTN, LPLR, DSVD) go through the same checks.

Tolerance: the factored product (for cuts ((x·S)∘c)·Tᵀ, for LPLR (x·U)·V) and
x·reconstruct(f) sum the same terms in a different order in f32, so they agree to a few f32 ulps of the
largest partial sums: |Δ| ≤ 1e-5 · max|y| (+ 1e-6) for f32 activations. bf16
activations round the output once: |Δ| ≤ 1e-2 · max|y|.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_signedcut as sc
from jax_signedcut.nnx import PackedFactor, SignedCutDense, swap_linears

KEY = jax.random.key(3)
RULES = [("head", None), ("layers/0", sc.Budget(width=40)), (".*", sc.Budget(rate=0.5))]


class MLP(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(33, 48, rngs=rngs), nnx.Linear(48, 40, rngs=rngs)])
    self.norm = nnx.LayerNorm(40, rngs=rngs)
    self.head = nnx.Linear(40, 17, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.gelu(layer(x))
    return self.head(self.norm(x))


@functools.cache
def _models():
  """(converted model, reference model); built once per session: tests only read them."""
  model = MLP(rngs=nnx.Rngs(0))
  f = sc.decompose(nnx.state(model, nnx.Param), key=KEY, rules=RULES)
  ref = nnx.clone(model)
  # The reference: the same model with the reconstructed dense kernels.
  nnx.update(ref, sc.reconstruct(f))
  swap_linears(model, f)
  return model, ref


def _close(y, ref, rtol=1e-5):
  y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=0, atol=rtol * np.abs(ref).max() + 1e-6)


def test_swap_selects_by_rules_and_filters():
  model, _ = _models()
  assert isinstance(model.layers[0], SignedCutDense) and model.layers[0].width == 40
  assert model.layers[1].width == sc.width_for_rate(48, 40, 0.5)
  assert type(model.head) is nnx.Linear
  packed = nnx.state(model, PackedFactor)
  # One Variable per layer holding the whole compressed kernel, at the kernel's path;
  # outliers="auto" (the default) gives the cuts and a sparse part.
  assert sorted(packed["layers"][0].keys()) == ["kernel"]
  f = packed["layers"][0]["kernel"].get_value()
  assert [type(p) for p in f.parts] == [sc.SignedCut, sc.Sparse]
  assert jax.tree.structure(model.layers[0].factors) == jax.tree.structure(f)
  params = nnx.state(model, nnx.Param)
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(params))
  assert sorted(params["layers"][0].keys()) == ["bias"]


def test_packed_state_swaps_into_a_fresh_model():
  """nnx.state(model, PackedFactor) is itself a factors tree for swap_linears."""
  model, _ = _models()
  fresh = MLP(rngs=nnx.Rngs(0))  # the same biases, norm and head as the model's
  swap_linears(fresh, nnx.state(model, PackedFactor))
  x = jax.random.normal(jax.random.key(8), (3, 33))
  np.testing.assert_array_equal(fresh(x), model(x))


# Every method's factors of the Linear kernels: the layer holds any compressed value.
METHODS = {
    "rtn": dict(method="rtn", bits_per_weight=4),
    "rtn_group": dict(method="rtn", bits_per_weight=5, options={"group_size": 16}),
    "lplr": dict(method="lplr", bits_per_weight=4),
    "dsvd": dict(method="dsvd", bits_per_weight=4),
    "cuts_only": dict(rate=0.5, outliers=0),
    "lowrank_cuts_sparse": dict(rate=0.5, outliers=0.02, lowrank=4),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_any_method_equals_the_dense_model_of_its_reconstruction(name):
  model = MLP(rngs=nnx.Rngs(0))
  f = sc.decompose(nnx.state(model, nnx.Param), key=KEY, skip=["head"], **METHODS[name])
  ref = nnx.clone(model)
  nnx.update(ref, sc.reconstruct(f))   # the dense model holding the dequantized kernels
  swap_linears(model, f)
  held = model.layers[0].factors
  assert sc.is_compressed(held) and type(held) is type(f["layers"][0]["kernel"].get_value())
  x = jax.random.normal(jax.random.key(1), (5, 33))
  want = ref(x)
  _close(model(x), want)
  graphdef, state = nnx.split(model)
  _close(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), want)
  _close(nnx.jit(lambda m, x: m(x))(model, x), want)
  h = jax.random.normal(jax.random.key(2), (2, 48))
  _close(model.layers[1].to_linear()(h), ref.layers[1](h))


@pytest.mark.parametrize("batch", [(), (1,), (7,), (4, 5)])
def test_converted_equals_reconstructed_eager_jit_vmap(batch):
  model, ref = _models()
  x = jax.random.normal(jax.random.key(1), (*batch, 33))
  ref_fn = nnx.jit(lambda m, x: m(x))  # the reference, jitted to keep the suite fast
  want = ref_fn(ref, x)
  _close(model(x), want)                                            # eager
  graphdef, state = nnx.split(model)
  _close(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), want)  # jit
  xs = jnp.stack([x, 2 * x])
  got = jax.vmap(lambda x: nnx.merge(graphdef, state)(x))(xs)       # vmap
  _close(got, jnp.stack([want, ref_fn(ref, 2 * x)]))


def test_bf16_activations_and_dense_option():
  model, ref = _models()
  x = jax.random.normal(jax.random.key(2), (5, 33))
  layer = model.layers[0]
  yb = layer(x.astype(jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16
  want = ref.layers[0](x.astype(jnp.bfloat16).astype(jnp.float32))
  _close(yb, want, rtol=1e-2)
  dense = SignedCutDense.from_factors(layer.factors, layer.bias[...], dense=True)
  _close(dense(x), layer(x))


def test_grad_touches_only_params():
  model, _ = _models()
  x = jnp.ones((2, 33))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  assert not jax.tree.leaves(nnx.state(grads, PackedFactor))
  assert jax.tree.leaves(nnx.state(grads, nnx.Param))


def test_random_init_layer_and_from_factors_roundtrip():
  layer = SignedCutDense(70, 9, width=30, rngs=nnx.Rngs(0))
  f = layer.factors
  assert f.s_bits.shape == (30, 3) and f.t_bits.shape == (30, 1)
  assert int(f.s_bits[:, -1].max()) < 2 ** 6 and int(f.t_bits.max()) < 2 ** 9  # tail bits clear
  x = jax.random.normal(jax.random.key(0), (3, 70))
  _close(layer(x), x @ sc.reconstruct(f) + layer.bias[...][None, :])


def test_bad_input():
  model = MLP(rngs=nnx.Rngs(0))
  f = sc.decompose(nnx.state(model, nnx.Param), key=KEY, rules=RULES)
  f2 = sc.decompose(jnp.ones((48, 33)), key=KEY, width=4)
  with pytest.raises(ValueError, match=r"shape \(48, 33\) but the Linear's kernel has shape "
                                       r"\(33, 48\)"):
    SignedCutDense.from_linear(model.layers[0], f2)
  with pytest.raises(TypeError, match="f must be a compressed matrix .* got ArrayImpl"):
    SignedCutDense.from_factors(jnp.ones((33, 48)))
  with pytest.raises(ValueError, match=r"bias must have shape \(33,\)"):
    SignedCutDense.from_factors(f2, jnp.ones(3))
  bad = jax.tree.map(lambda x: x, f, is_leaf=sc.is_compressed)
  bad["layers"][0]["kernel"].set_value(sc.rtn(jnp.ones((48, 33)), bits=4))
  with pytest.raises(ValueError, match="Linear's kernel has shape"):
    swap_linears(MLP(rngs=nnx.Rngs(0)), bad)
  with pytest.raises(ValueError, match="not the kernel of an nnx.Linear in the model: "
                                       "layers/7/kernel, norm/scale$"):
    swap_linears(MLP(rngs=nnx.Rngs(0)), {"norm": {"scale": f2}, "layers": {7: {"kernel": f2}}})
  layer = SignedCutDense.from_factors(f2)
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 48\).*got x shape \(2, 33\)"):
    layer(jnp.ones((2, 33)))
  with pytest.raises(TypeError, match="float"):
    layer(jnp.ones((2, 48), jnp.int32))
  with pytest.raises(ValueError, match="width must be an int >= 1"):
    SignedCutDense(3, 4, width=0)
  np_layer = SignedCutDense(np.int64(3), np.int64(4), width=np.int64(2), rngs=nnx.Rngs(0))
  assert np_layer(jnp.ones((2, 3))).shape == (2, 4) and type(np_layer.in_features) is int
  stacked = SignedCutDense.from_factors(sc.rtn(jnp.ones((3, 48, 33)), bits=4))
  with pytest.raises(ValueError, match="nnx.scan"):
    stacked(jnp.ones((2, 48)))
  with pytest.raises(ValueError, match=r"to_linear needs one matrix, got a stack of batch shape "
                                       r"\(3,\)"):
    stacked.to_linear()


def test_to_linear_expands_once():
  model, _ = _models()
  layer = model.layers[1]
  x = jax.random.normal(jax.random.key(4), (3, 48))
  _close(layer.to_linear()(x), layer(x))


class ScanStack(nnx.Module):
  """Three Linear layers stacked by nnx.vmap and applied with nnx.scan: kernels (3, 32, 32)."""

  def __init__(self, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(32, 32, rngs=rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(block, x):
      return x + jnp.tanh(block(x))

    return step(self.blocks, x)


@pytest.mark.parametrize("batch,budget", [((), dict(width=50)), ((7,), dict(width=50)),
                                          ((7,), METHODS["rtn"]), ((7,), METHODS["lplr"]),
                                          ((7,), METHODS["lowrank_cuts_sparse"])])
def test_nnx_scan_stacked_linears(batch, budget):
  model = ScanStack(rngs=nnx.Rngs(0))
  f = sc.decompose(nnx.state(model, nnx.Param), key=KEY, **budget)
  assert f["blocks"]["kernel"].get_value().batch_shape == (3,)
  ref = nnx.clone(model)
  nnx.update(ref, sc.reconstruct(f))
  swap_linears(model, f)
  assert isinstance(model.blocks, SignedCutDense)
  x = jax.random.normal(jax.random.key(1), (*batch, 32))
  _close(nnx.jit(lambda m, x: m(x))(model, x), ref(x))
  assert model.blocks.factors.batch_shape == (3,)


def test_swap_linears_decomposes_itself():
  model, _ = _models()
  fresh = MLP(rngs=nnx.Rngs(0))
  swap_linears(fresh, key=KEY, rules=RULES)
  for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="only used when factors is None"):
    swap_linears(fresh, {}, key=KEY)


@pytest.mark.parametrize("name", ["rtn", "lowrank_cuts_sparse"])
def test_second_call_compiles_nothing(name):
  model = MLP(rngs=nnx.Rngs(0))
  swap_linears(model, sc.decompose(nnx.state(model, nnx.Param), key=KEY, skip=["head"],
                                   **METHODS[name]))
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  step(state, jnp.ones((2, 33)))
  # New activations, and new arrays of the same structure in the layers.
  step(jax.tree.map(jnp.copy, state), -jnp.ones((2, 33)))
  assert step._cache_size() == 1  # noqa: SLF001
