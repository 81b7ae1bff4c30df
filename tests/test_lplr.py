"""LPLR, the DSVD baseline and their exact bit accounting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_signedcut as jsc


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


@pytest.mark.parametrize("shape,orthonormalize",
                         [((20, 12), False), ((12, 20), False), ((50, 9), False),
                          ((1, 5), False), ((5, 1), False), ((33, 33), True)])
def test_full_rank_float_factors_reconstruct_exactly(shape, orthonormalize):
  # With k = min(m, n) the sketch spans A's range, and 32-bit factors are
  # stored unquantized, so Z pinv(Z) A = A up to f32 rounding. (Square A S is
  # the product of two random square matrices, so its conditioning adds
  # error; orthonormalize=True removes that. 1e-5 held on the Intel CPUs; an AMD EPYC
  # without AVX-512, whose LAPACK/XLA kernels round differently, gave 1.45e-5 at 50×9.)
  m, n = shape
  a = jax.random.normal(jax.random.key(m * 100 + n), shape)
  f = jsc.lplr(a, key=jax.random.key(0), rank=min(m, n), bits=(32, 32),
               orthonormalize=orthonormalize)
  assert isinstance(f.u, jax.Array) and f.u.dtype == jnp.float32
  assert _rel(a, jsc.reconstruct_lowrank(f)) < 5e-5


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("scale", ["global", "per_column"])
def test_low_rank_matrix_with_16_bit_factors_within_bf16_error(extra, scale):
  m, n, r = 80, 61, 5
  a = jax.random.normal(jax.random.key(1), (m, r)) @ jax.random.normal(jax.random.key(2), (r, n))
  bf16_error = _rel(a, a.astype(jnp.bfloat16).astype(jnp.float32))
  f = jsc.lplr(a, key=jax.random.key(0), rank=r + extra, bits=(16, 16), scale=scale)
  assert isinstance(f.u, jsc.QuantizedMatrix) and f.u.bits == 16
  assert _rel(a, jsc.reconstruct_lowrank(f)) < bf16_error


@settings(derandomize=True, deadline=None, max_examples=60)
@given(m=st.integers(1, 3000), n=st.integers(1, 3000), bpw=st.sampled_from([0.5, 1, 2, 3.3, 8]),
       b1=st.sampled_from([1, 2, 3, 4, 8, 16, 32]), b2=st.sampled_from([1, 2, 5, 8, 32]),
       scale=st.sampled_from(["global", "per_column"]))
def test_rank_for_bits_is_the_largest_rank_in_budget(m, n, bpw, b1, b2, scale):
  budget_bits = bpw * m * n
  try:
    k = jsc.rank_for_bits(m, n, bpw, (b1, b2), scale)
  except ValueError:
    assert 8 * jsc.lowrank_nbytes(m, n, 1, (b1, b2), scale) > budget_bits
    return
  assert 1 <= k <= min(m, n)
  assert 8 * jsc.lowrank_nbytes(m, n, k, (b1, b2), scale) <= budget_bits
  if k < min(m, n):
    assert 8 * jsc.lowrank_nbytes(m, n, k + 1, (b1, b2), scale) > budget_bits


@pytest.mark.parametrize("method", ["lplr", "dsvd"])
@pytest.mark.parametrize("shape,bpw,bits,scale",
                         [((37, 101), 3, (3, 8), "per_column"), ((100, 33), 1, (2, 1), "global"),
                          ((40, 40), 6, (32, 8), "per_column")])
def test_budget_respected_exactly(method, shape, bpw, bits, scale):
  m, n = shape
  a = jax.random.normal(jax.random.key(3), shape)
  kw = dict(key=jax.random.key(0)) if method == "lplr" else {}
  f = getattr(jsc, method)(a, bits_per_weight=bpw, bits=bits, scale=scale, **kw)
  k = jsc.rank_for_bits(m, n, bpw, bits, scale)
  assert f.rank == k
  assert f.nbytes == jsc.lowrank_nbytes(m, n, k, bits, scale)
  assert 8 * f.nbytes <= bpw * m * n
  # The stored arrays are what the formula counts.
  leaves = jax.tree.leaves(f)
  assert f.nbytes == sum(x.size * x.dtype.itemsize for x in leaves)


def test_more_bits_less_error_and_dsvd_at_high_precision_is_svd():
  a = jax.random.normal(jax.random.key(4), (96, 64))
  errs = [_rel(a, jsc.reconstruct_lowrank(jsc.lplr(a, key=jax.random.key(0), rank=16, bits=(b, b))))
          for b in (1, 8)]
  assert errs == sorted(errs, reverse=True)
  u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  svd16 = (u[:, :16] * s[None, :16]) @ vt[:16]
  got = jsc.reconstruct_lowrank(jsc.dsvd(a, rank=16, bits=(16, 16)))
  assert _rel(svd16, got) < 1e-3


def test_jit_vmap_and_batch_agree():
  a = jax.random.normal(jax.random.key(5), (3, 30, 22))
  key = jax.random.key(9)
  cfg = dict(rank=6, bits=(4, 3), scale="per_column")
  eager = jnp.stack([jsc.reconstruct_lowrank(jsc.lplr(a[i], key=key, **cfg)) for i in range(3)])
  jitted = jax.jit(lambda x, k: jsc.reconstruct_lowrank(jsc.lplr(x, key=k, **cfg)))(a, key)
  vmapped = jax.vmap(lambda x: jsc.reconstruct_lowrank(jsc.lplr(x, key=key, **cfg)))(a)
  for out in (jitted, vmapped):
    np.testing.assert_allclose(out, eager, rtol=1e-5, atol=1e-5)
  # A batch of matrices with a batch of keys: one sketch per matrix.
  keys = jax.random.split(key, 3)
  per_key = jsc.reconstruct_lowrank(jsc.lplr(a, key=keys, **cfg))
  np.testing.assert_allclose(
      per_key[1], jsc.reconstruct_lowrank(jsc.lplr(a[1], key=keys[1], **cfg)), rtol=1e-5,
      atol=1e-5)
  d = jax.vmap(lambda x: jsc.reconstruct_lowrank(jsc.dsvd(x, rank=4, bits=(8, 8))))(a)
  np.testing.assert_allclose(d, jsc.reconstruct_lowrank(jsc.dsvd(a, rank=4, bits=(8, 8))),
                             rtol=1e-5, atol=1e-5)


def test_keys_and_dither():
  a = jax.random.normal(jax.random.key(6), (40, 30))
  r = lambda **kw: jsc.reconstruct_lowrank(jsc.lplr(a, rank=8, bits=(3, 3), **kw))  # noqa: E731
  np.testing.assert_array_equal(r(key=jax.random.key(0)), r(key=jax.random.key(0)))
  assert not np.allclose(r(key=jax.random.key(0)), r(key=jax.random.key(1)))
  assert not np.allclose(r(key=jax.random.key(0)), r(key=jax.random.key(0), dither=True))
  plain = _rel(a, r(key=jax.random.key(0)))
  assert _rel(a, r(key=jax.random.key(0), sketch="rademacher", power_iters=2)) < plain


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=4, bits=(0, 8)), ValueError, r"bits\[0\] must be in 1..16"),
    (dict(rank=4, bits=(8, 17)), ValueError, r"bits\[1\] must be in 1..16"),
    (dict(rank=4, bits=8), ValueError, r"bits must be a pair"),
    (dict(rank=0), ValueError, r"rank must be in 1..min\(m, n\) = 1..6"),
    (dict(rank=7), ValueError,
     r"rank must be in 1..min\(m, n\) = 1..6 for a matrix of shape \(6, 8\), got 7"),
    (dict(rank=2.0), TypeError, "rank must be an int"),
    (dict(), ValueError, "exactly one of rank, bits_per_weight"),
    (dict(rank=2, bits_per_weight=4), ValueError, "exactly one of rank, bits_per_weight"),
    (dict(bits_per_weight=0.01), ValueError, "do not pay for one component"),
    (dict(rank=2, scale="per_row"), ValueError, "scale must be one of"),
    (dict(rank=2, sketch="srht"), ValueError, "sketch must be one of"),
    (dict(rank=2, power_iters=-1), ValueError, "power_iters"),
])
def test_bad_arguments(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    jsc.lplr(jnp.ones((6, 8)), key=jax.random.key(0), **kwargs)


def test_bad_inputs():
  with pytest.raises(TypeError, match="dtype int32"):
    jsc.lplr(jnp.ones((4, 4), jnp.int32), key=jax.random.key(0), rank=2)
  with pytest.raises(ValueError, match="non-finite"):
    jsc.lplr(jnp.array([[1.0, jnp.inf], [0.0, 1.0]]), key=jax.random.key(0), rank=1)
  with pytest.raises(TypeError, match="key"):
    jsc.lplr(jnp.ones((4, 4)), key=None, rank=2)
  with pytest.raises(TypeError, match="key is required"):
    jsc.dsvd(jnp.ones((4, 4)), rank=2, dither=True)
  with pytest.raises(ValueError, match="key must have shape"):
    jsc.lplr(jnp.ones((2, 4, 4)), key=jax.random.split(jax.random.key(0), 3), rank=2)
