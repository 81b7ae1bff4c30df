"""Order-k tensor signed cuts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_signedcut as jsc
from jax_signedcut._signedcut import packing as _packing
from jax_signedcut._signedcut import tensor as _tensor

SHAPES = [(1, 33, 2), (9, 1, 4, 5), (2, 3, 2, 3, 2)]


def _rel_np(a, f, k):
  """Error of the first k cuts, reconstructed in NumPy (no compile per k)."""
  s = [_packing.unpack_signs_np(np.asarray(b[:k]), d).astype(np.float64)
       for b, d in zip(f.bits, f.shape)]
  rec = np.einsum("ja,jb,jc,j->abc", *s, np.asarray(f.c[:k], np.float64))
  a = np.asarray(a, np.float64)
  return float(np.linalg.norm(rec - a) / np.linalg.norm(a))


@pytest.mark.parametrize("shape", [(33, 3, 65), (3, 5, 7, 3)])
def test_one_signed_cut_is_recovered_with_one_cut(shape):
  # Odd lengths: a random start is never orthogonal to the planted signs, so
  # the first half-step already finds them (up to a sign per axis).
  keys = jax.random.split(jax.random.key(sum(shape)), len(shape))
  signs = [jnp.where(jax.random.bernoulli(k, 0.5, (d,)), 1.0, -1.0) for k, d in zip(keys, shape)]
  a = 2.5 * _outer(signs)
  f = jsc.decompose_tensor(a, key=jax.random.key(0), width=4, max_error=1e-6)
  assert int(f.num_cuts) == 1
  np.testing.assert_allclose(f.c, [2.5, 0, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(jsc.reconstruct_tensor(f), a)


def _outer(signs):
  out = signs[0]
  for s in signs[1:]:
    out = out[..., None] * s.reshape((1,) * out.ndim + s.shape)
  return out


def test_gaussian_error_decreases_with_width():
  a = jax.random.normal(jax.random.key(0), (10, 8, 7))
  f = jsc.decompose_tensor(a, key=jax.random.key(1), width=200)
  errs = [_rel_np(a, f, w) for w in (25, 50, 100, 200)]
  assert all(e1 > e0 for e0, e1 in zip(errs[1:], errs[:-1])), errs
  assert errs[-1] < 0.1, errs   # 0.048 measured
  # Prefix consistency: a shorter run is the truncation of a longer one.
  g = jsc.decompose_tensor(a, key=jax.random.key(1), width=25)
  np.testing.assert_array_equal(g.c, f.c[:25])
  for gb, fb in zip(g.bits, f.bits):
    np.testing.assert_array_equal(gb, fb[:25])


@pytest.mark.parametrize("shape", SHAPES)
def test_cuts_are_projections_and_bits_are_exact(shape):
  a = jax.random.normal(jax.random.key(len(shape)), shape)
  w = 12
  f = jsc.decompose_tensor(a, key=jax.random.key(2), width=w)
  n_total = math.prod(shape)
  # Each cut is the projection on its ±1 tensor, so ‖R_w‖² = ‖A‖² − N Σ c_j².
  r2 = float(jnp.sum(jnp.square(a - jsc.reconstruct_tensor(f))))
  expect = float(jnp.sum(jnp.square(a)) - n_total * jnp.sum(jnp.square(f.c)))
  assert r2 == pytest.approx(expect, rel=1e-4, abs=1e-4)
  assert bool(jnp.all(f.c >= 0))
  # Exact accounting, the layout and the tail bits.
  assert f.nbytes == w * jsc.tensor_bytes_per_cut(shape)
  assert f.nbytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(f)) - 4  # less num_cuts
  for b, d in zip(f.bits, shape):
    assert b.shape == (w, _packing.num_words(d)) and b.dtype == jnp.uint32
    assert not np.any(np.asarray(b[:, -1]) & ~np.uint32(_packing.tail_mask(d)))


def test_start_signs_follow_the_documented_derivation():
  key = jax.random.key(3)
  shape = (5, 40, 3)
  got = _tensor.start_signs(key, 7, shape)
  for a, d in enumerate(shape):
    words = jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, 7), a),
                            (_packing.num_words(d),), jnp.uint32)
    np.testing.assert_array_equal(got[a], _packing.unpack_signs_np(np.asarray(words), d))


def test_jit_vmap_keys():
  a = jax.random.normal(jax.random.key(4), (3, 4, 6, 5))
  key = jax.random.key(0)
  eager = [jsc.decompose_tensor(a[i], key=key, width=10) for i in range(3)]
  vm = jax.vmap(lambda x: jsc.decompose_tensor(x, key=key, width=10))(a)
  jt = jax.jit(lambda x, k: jsc.decompose_tensor(x, key=k, width=10))(a[1], key)
  for i in range(3):
    np.testing.assert_allclose(vm.c[i], eager[i].c, rtol=1e-5)
    for vb, eb in zip(vm.bits, eager[i].bits):
      np.testing.assert_array_equal(vb[i], eb)
  np.testing.assert_allclose(jt.c, eager[1].c, rtol=1e-5)
  np.testing.assert_allclose(jsc.reconstruct_tensor(vm)[2], jsc.reconstruct_tensor(eager[2]),
                             rtol=1e-5, atol=1e-5)
  other = jsc.decompose_tensor(a[0], key=jax.random.key(1), width=10)
  assert not all(np.array_equal(x, y) for x, y in zip(other.bits, eager[0].bits))


def test_zero_tensor_and_bf16():
  f = jsc.decompose_tensor(jnp.zeros((2, 3, 4)), key=jax.random.key(0), width=3)
  np.testing.assert_array_equal(f.c, 0)
  a = jax.random.normal(jax.random.key(5), (4, 5, 6)).astype(jnp.bfloat16)
  assert np.isfinite(np.asarray(jsc.decompose_tensor(a, key=jax.random.key(0), width=3).c)).all()


@pytest.mark.parametrize("a,kwargs,exc,match", [
    (jnp.ones((3, 4)), dict(width=2), ValueError, "order >= 3"),
    (jnp.ones((3, 0, 2)), dict(width=2), ValueError, "empty"),
    (jnp.ones((2, 2, 2), jnp.int32), dict(width=2), TypeError, "dtype int32"),
    (jnp.ones((2, 2, 2)).at[1, 0, 1].set(jnp.nan), dict(width=2), ValueError, r"a\[1, 0, 1\]"),
    (jnp.ones((2, 2, 2)), dict(width=0), ValueError, "width must be >= 1, got 0"),
    (jnp.ones((2, 2, 2)), dict(width=2.0), TypeError, "width must be an int"),
    (jnp.ones((2, 2, 2)), dict(width=2, max_error=0), ValueError, "max_error"),
])
def test_bad_arguments(a, kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jsc.decompose_tensor(a, key=jax.random.key(0), **kwargs)
