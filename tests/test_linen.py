"""Linen SignedCutDense and convert_params, with an nn.scan-stacked block, for every method.

Tolerance as in test_nnx.py: |Δ| ≤ 1e-5 · max|y| + 1e-6 (f32 summation order).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc
from jax_signedcut.linen import COLLECTION, KERNEL, SignedCutDense, convert_params

KEY = jax.random.key(5)
D, L, W_IN, W_BLOCK = 40, 3, 48, 64
RULES = [("Dense_out", None), ("ScanBlock", sc.Budget(width=W_BLOCK)), ("inp", sc.Budget(width=W_IN))]


class Block(nn.Module):
  compressed: bool
  like: Any = None

  @nn.compact
  def __call__(self, h, _):
    if self.compressed:
      fc = SignedCutDense(D, **_init_from(self.like, W_BLOCK), name="fc")
    else:
      fc = nn.Dense(D, name="fc")
    return h + nn.tanh(fc(h)), None


class MLP(nn.Module):
  """A Dense, three nn.scan-stacked Blocks and a Dense head kept dense.

  Compressed, the layers init zero signed cuts of the widths below, or zeros
  of the structures ``inp_like`` / ``fc_like`` (one layer's kernel each).
  """

  compressed: bool
  inp_like: Any = None
  fc_like: Any = None

  @nn.compact
  def __call__(self, x):
    if self.compressed:
      inp = SignedCutDense(D, **_init_from(self.inp_like, W_IN), name="inp")
    else:
      inp = nn.Dense(D, name="inp")
    h = nn.relu(inp(x))
    stack = nn.scan(Block, variable_axes={"params": 0, COLLECTION: 0},
                    split_rngs={"params": True}, length=L)
    h, _ = stack(self.compressed, self.fc_like, name="ScanBlock")(h, None)
    return nn.Dense(20, name="Dense_out")(h)


def _init_from(like, width):
  return dict(width=width) if like is None else dict(like=like)


@functools.cache
def _setup():
  x0 = jnp.ones((2, 33))
  variables = MLP(False).init(jax.random.key(0), x0)
  f = sc.decompose(variables, key=KEY, rules=RULES)
  new = convert_params(variables, f, module=MLP(True), inputs=x0)
  ref = sc.reconstruct(f)  # dense kernels in the original layout
  return variables, f, new, ref


def _close(y, ref, rtol=1e-5):
  y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=0, atol=rtol * np.abs(ref).max() + 1e-6)


def test_stacked_kernel_is_a_batch_and_layout():
  variables, f, new, _ = _setup()
  k = f["params"]["ScanBlock"]["fc"]["kernel"]
  assert isinstance(k, sc.Sum) and k.batch_shape == (L,) and k.shape == (D, D)
  # The whole compressed kernel is one variable; outliers="auto" found no entries here,
  # so convert_params dropped the empty sparse part.
  held = new[COLLECTION]["ScanBlock"]["fc"]
  assert sorted(held) == [KERNEL] and isinstance(held[KERNEL], sc.SignedCut)
  assert held[KERNEL].s_bits.shape == (L, W_BLOCK, 2) and held[KERNEL].batch_shape == (L,)
  assert "kernel" not in new["params"]["inp"] and new["params"]["inp"]["bias"].shape == (D,)
  assert new["params"]["Dense_out"]["kernel"].shape == (D, 20)  # kept dense by rule


@pytest.mark.parametrize("batch", [(), (1,), (7,), (4, 5)])
def test_converted_equals_reconstructed(batch):
  _, _, new, ref = _setup()
  x = jax.random.normal(jax.random.key(1), (*batch, 33))
  want = MLP(False).apply(ref, x)
  _close(MLP(True).apply(new, x), want)
  _close(jax.jit(MLP(True).apply)(new, x), want)
  xs = jnp.stack([x, -x])
  got = jax.vmap(MLP(True).apply, in_axes=(None, 0))(new, xs)
  _close(got, jnp.stack([want, MLP(False).apply(ref, -x)]))


def test_grad_only_params():
  _, _, new, _ = _setup()
  x = jnp.ones((3, 33))
  g = jax.grad(lambda p: jnp.sum(MLP(True).apply({**new, "params": p}, x) ** 2))(new["params"])
  assert jax.tree.structure(g) == jax.tree.structure(new["params"])


def test_convert_params_decomposes_itself():
  variables, f, new, _ = _setup()
  again = convert_params(variables, key=KEY, rules=RULES)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a, b)


def test_bad_input():
  variables, f, new, _ = _setup()
  with pytest.raises(ValueError, match=r"signed_cut/ScanBlock/fc/kernel/s_bits: converted shape "
                                       r"\(3, 32, 2\), the module expects \(3, 64, 2\)"):
    g = sc.decompose(variables, key=KEY, rules=[("Dense_out", None),
                                                ("ScanBlock", sc.Budget(width=32)),
                                                ("inp", sc.Budget(width=W_IN))])
    convert_params(variables, g, module=MLP(True), inputs=jnp.ones((1, 33)))
  with pytest.raises(ValueError, match="x has last dim 70"):
    MLP(True).apply(new, jnp.ones((2, 70)))
  layer = SignedCutDense(D, width=W_IN, in_features=33)
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 33\).*got x shape \(2, 40\)"):
    layer.apply({COLLECTION: new[COLLECTION]["inp"], "params": new["params"]["inp"]},
                jnp.ones((2, 40)))
  with pytest.raises(ValueError, match="compressed Sum at 'params/emb/embedding'.*only "
                                       "params/…/kernel"):
    convert_params({"params": {"emb": {"embedding": f["params"]["inp"]["kernel"]}}},
                   {"params": {"emb": {"embedding": f["params"]["inp"]["kernel"]}}})


def test_sparse_part_of_heavy_tailed_kernels():
  """Factors that store entries apart need sparse_slots; the output then equals x·reconstruct."""
  class One(nn.Module):
    compressed: bool
    slots: int = 0

    @nn.compact
    def __call__(self, x):
      if self.compressed:
        return SignedCutDense(D, width=W_IN, sparse_slots=self.slots, name="fc")(x)
      return nn.Dense(D, name="fc")(x)

  x0 = jnp.ones((3, 33))
  variables = One(False).init(jax.random.key(0), x0)
  kernel = variables["params"]["fc"]["kernel"]
  heavy = kernel.at[3, 7].set(50.0).at[20, 1].set(-40.0)
  variables = {"params": {"fc": {"kernel": heavy, "bias": variables["params"]["fc"]["bias"]}}}
  f = sc.decompose(variables, key=KEY, width=W_IN)
  sparse = f["params"]["fc"]["kernel"].part(sc.Sparse)
  assert int(sparse.count) == 2
  slots = sparse.capacity
  with pytest.raises(ValueError, match=r"signed_cut/fc/kernel: converted Sum\(SignedCut, Sparse\) "
                                       r"of shape \(33, 40\), the module expects SignedCut(.|\n)*"
                                       r"signed_cut/fc/kernel/parts/1/idx: not in the module"):
    convert_params(variables, f, module=One(True), inputs=x0)
  new = convert_params(variables, f, module=One(True, slots), inputs=x0)
  x = jax.random.normal(jax.random.key(1), (3, 33))
  _close(One(True, slots).apply(new, x), x @ sc.reconstruct(f)["params"]["fc"]["kernel"])


# Every method's factors of the Dense kernels: the layer applies any compressed value.
METHODS = {
    "rtn": dict(method="rtn", bits_per_weight=4),
    "rtn_group": dict(method="rtn", bits_per_weight=6, options={"group_size": 20}),
    "lplr": dict(method="lplr", bits_per_weight=4),
    "cuts_only": dict(rate=0.5, outliers=0),
    "lowrank_cuts_sparse": dict(rate=0.5, outliers=0.02, lowrank=4),
}


def _template(f):
  """One layer's kernel structure (the first of a stack), as like= takes it."""
  return jax.eval_shape(lambda: jax.tree.map(lambda a: a[0] if f.batch_shape else a, f))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_any_method_equals_the_dense_model_of_its_reconstruction(name):
  x0 = jnp.ones((2, 33))
  variables = MLP(False).init(jax.random.key(0), x0)
  f = sc.decompose(variables, key=KEY, skip=["Dense_out"], **METHODS[name])
  new = convert_params(variables, f)
  held = new[COLLECTION]
  assert type(held["inp"][KERNEL]) is type(f["params"]["inp"]["kernel"])
  assert held["ScanBlock"]["fc"][KERNEL].batch_shape == (L,)
  # The kernels' structure is in the variables: applying needs no width or like ...
  x = jax.random.normal(jax.random.key(1), (5, 33))
  want = MLP(False).apply(sc.reconstruct(f), x)   # the dense model of the dequantized kernels
  _close(MLP(True).apply(new, x), want)
  _close(jax.jit(MLP(True).apply)(new, x), want)
  # ... init does: like= gives the structure of any method, and the check passes.
  model = MLP(True, _template(held["inp"][KERNEL]), _template(held["ScanBlock"]["fc"][KERNEL]))
  convert_params(variables, f, module=model, inputs=x0)
  zeros = model.init(jax.random.key(0), x0)
  assert jax.tree.structure(zeros[COLLECTION]) == jax.tree.structure(held)
  _close(model.apply(new, x), want)
  # flax.serialization round-trips the kernels into the structure init made.
  back = flax.serialization.from_bytes(zeros, flax.serialization.to_bytes(new))
  assert jax.tree.structure(back) == jax.tree.structure(new)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a, b)


def test_module_arguments_are_checked():
  with pytest.raises(ValueError, match="features must be an int >= 1, got 0"):
    SignedCutDense(0, width=4)
  with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
    SignedCutDense(4, width=0)
  layer = SignedCutDense(np.int64(4), width=np.int64(3))   # numpy ints (from a config array)
  params = layer.init(jax.random.key(0), jnp.ones((2, 5)))
  assert layer.apply(params, jnp.ones((2, 5))).shape == (2, 4)
  q = jax.eval_shape(lambda: sc.rtn(jnp.ones((8, 4)), bits=4))
  with pytest.raises(ValueError, match="not both"):
    SignedCutDense(4, width=2, like=q)
  with pytest.raises(ValueError, match=r"like must compress one \(in, 5\) kernel, got shape "
                                       r"\(8, 4\)"):
    SignedCutDense(5, like=q)
  with pytest.raises(TypeError, match="like must be a compressed matrix"):
    SignedCutDense(4, like=jnp.ones((8, 4)))
  with pytest.raises(ValueError, match="init needs width= .* or like="):
    SignedCutDense(4).init(jax.random.key(0), jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="x has last dim 9 but like compresses"):
    SignedCutDense(4, like=q).init(jax.random.key(0), jnp.ones((1, 9)))
  v = SignedCutDense(4, like=q).init(jax.random.key(0), jnp.ones((1, 8)))
  assert isinstance(v[COLLECTION][KERNEL], sc.QuantizedMatrix)


def test_second_call_compiles_nothing():
  _, _, new, _ = _setup()
  apply = jax.jit(MLP(True).apply)
  apply(new, jnp.ones((2, 33)))
  apply(jax.tree.map(jnp.copy, new), -jnp.ones((2, 33)))
  assert apply._cache_size() == 1  # noqa: SLF001


def test_check_names_kernel_types_and_static_fields():
  x = jnp.ones((1, 40))
  variables = nn.Sequential([nn.Dense(24)]).init(jax.random.key(0), x)
  q2 = sc.decompose(variables, key=KEY, method="rtn", bits_per_weight=4)   # 2-bit codes fit
  q6 = sc.decompose(variables, key=KEY, method="rtn", bits_per_weight=8,
                    options={"grid": "uniform"})
  like = jax.eval_shape(lambda: q6["params"]["layers_0"]["kernel"])
  module = nn.Sequential([SignedCutDense(24, like=like)])
  with pytest.raises(ValueError, match=r"kernel: converted QuantizedMatrix of shape \(40, 24\), the "
                                       r"module expects QuantizedMatrix of shape \(40, 24\) "
                                       r"\(bits 2 vs 6, grid 'int' vs 'uniform'\)"):
    convert_params(variables, q2, module=module, inputs=x)
  cuts = sc.decompose(variables, key=KEY, rate=0.5, outliers=0)
  with pytest.raises(ValueError, match=r"converted SignedCut of shape \(40, 24\), the module "
                                       r"expects QuantizedMatrix(.|\n)*kernel/codes: missing"):
    convert_params(variables, cuts, module=module, inputs=x)
  convert_params(variables, q6, module=module, inputs=x)
