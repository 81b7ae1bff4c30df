"""Linen SignedCutDense and convert_params, with an nn.scan-stacked block.

Tolerance as in test_nnx.py: |Δ| ≤ 1e-5 · max|y| + 1e-6 (f32 summation order).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as sc
from jax_signedcut.linen import COLLECTION, SignedCutDense, convert_params

KEY = jax.random.key(5)
D, L, W_IN, W_BLOCK = 40, 3, 48, 64
RULES = [("Dense_out", None), ("ScanBlock", sc.Budget(width=W_BLOCK)), ("inp", sc.Budget(width=W_IN))]


class Block(nn.Module):
  compressed: bool

  @nn.compact
  def __call__(self, h, _):
    fc = SignedCutDense(D, width=W_BLOCK, name="fc") if self.compressed else nn.Dense(D, name="fc")
    return h + nn.tanh(fc(h)), None


class MLP(nn.Module):
  compressed: bool

  @nn.compact
  def __call__(self, x):
    inp = SignedCutDense(D, width=W_IN, name="inp") if self.compressed else nn.Dense(D, name="inp")
    h = nn.relu(inp(x))
    stack = nn.scan(Block, variable_axes={"params": 0, COLLECTION: 0},
                    split_rngs={"params": True}, length=L)
    h, _ = stack(self.compressed, name="ScanBlock")(h, None)
    return nn.Dense(20, name="Dense_out")(h)


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
  assert isinstance(k, sc.SignedCut) and k.batch_shape == (L,) and k.shape == (D, D)
  assert new[COLLECTION]["ScanBlock"]["fc"]["s_bits"].shape == (L, W_BLOCK, 2)
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
  with pytest.raises(ValueError, match=r"signed_cut/ScanBlock/fc/s_bits: converted shape "
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
  with pytest.raises(ValueError, match="only params/…/kernel"):
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
  assert int(f["params"]["fc"]["kernel"].num_sparse) == 2
  slots = f["params"]["fc"]["kernel"].sparse_idx.shape[-1]
  with pytest.raises(ValueError, match="sparse_idx"):
    convert_params(variables, f, module=One(True), inputs=x0)
  new = convert_params(variables, f, module=One(True, slots), inputs=x0)
  x = jax.random.normal(jax.random.key(1), (3, 33))
  _close(One(True, slots).apply(new, x), x @ sc.reconstruct(f)["params"]["fc"]["kernel"])
