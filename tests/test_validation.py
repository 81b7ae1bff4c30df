"""Argument validation of the public functions: each bad input raises TypeError or
ValueError with a message that names the argument (or the field of a compressed value)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cuts, part

import jax_signedcut as sc

KEY = jax.random.key(0)
A = np.random.default_rng(0).standard_normal((20, 12)).astype(np.float32)


@pytest.fixture(scope="module")
def f():
  return sc.decompose(A, key=KEY, width=4, outliers=0.02)


@pytest.mark.parametrize("a,err,word", [
    (3.0, TypeError, "a must be an array"),
    ("abc", TypeError, "a must be an array"),
    (None, TypeError, "a must be an array"),
    ([[1.0, 2.0], [3.0]], ValueError, "rectangular"),
    (np.ones((4, 4), np.int32), TypeError, "dtype"),
    (np.ones(4, np.float32), ValueError, "ndim"),
    (np.ones((0, 4), np.float32), ValueError, "empty"),
    (np.array([[1.0, np.nan]] * 2, np.float32), ValueError, "non-finite"),
])
def test_decompose_bad_a(a, err, word):
  with pytest.raises(err, match=word):
    sc.decompose(a, key=KEY, width=2)


@pytest.mark.parametrize("kw,err,word", [
    (dict(key="abc", width=2), TypeError, "key"),
    (dict(key=3, width=2), TypeError, "key"),
    (dict(key=KEY, width=0), ValueError, "width"),
    (dict(key=KEY, width=2.5), TypeError, "width"),
    (dict(key=KEY, width=True), TypeError, "width"),
    (dict(key=KEY, width=2**31), ValueError, "width"),
    (dict(key=KEY, rate=float("nan")), ValueError, "rate"),
    (dict(key=KEY, width=2, max_error=-1), ValueError, "max_error"),
    (dict(key=KEY, width=2, backend="gpu"), ValueError, "backend"),
    (dict(key=KEY, width=2, outliers=2), ValueError, "outliers"),
])
def test_decompose_bad_arguments(kw, err, word):
  with pytest.raises(err, match=word):
    sc.decompose(A, **kw)


def test_huge_width_refused_before_allocating():
  with pytest.raises(ValueError, match=r"width=2147483647 needs [\d,]+ bytes"):
    sc.decompose(np.ones((256, 256), np.float32), key=KEY, width=2**31 - 1)


def test_integer_types_accepted(f):
  assert cuts(sc.truncate(f, np.int64(2))).width == 2
  g = sc.decompose(A, key=KEY, width=np.int64(3), outliers=0)
  assert g.width == 3
  with pytest.raises(ValueError, match="k must be"):
    sc.truncate(f, 5)
  with pytest.raises(ValueError, match="k must be"):
    sc.truncate(f, 1.5)


def _bad_variants(f):
  c = cuts(f)
  sp = part(f, sc.Sparse)
  yield "s_bits|c", f.replace_part(sc.SignedCut, dataclasses.replace(c, c=c.c[:3]))
  yield "s_bits", f.replace_part(sc.SignedCut, dataclasses.replace(c, s_bits=c.s_bits[:, :0]))
  yield "t_bits", f.replace_part(sc.SignedCut,
                                 dataclasses.replace(c, t_bits=c.t_bits.astype(jnp.int32)))
  yield "num_cuts", f.replace_part(sc.SignedCut, dataclasses.replace(c, num_cuts=jnp.int32(9)))
  yield "idx", f.replace_part(sc.Sparse, dataclasses.replace(sp, idx=sp.idx.at[0].set(-1)))
  yield "idx", f.replace_part(sc.Sparse, dataclasses.replace(sp, idx=sp.idx.at[0].set(10**6)))
  yield "count", f.replace_part(sc.Sparse, dataclasses.replace(sp, count=jnp.int32(99)))
  yield "val", f.replace_part(sc.Sparse, dataclasses.replace(sp, val=sp.val[:1]))


@pytest.mark.parametrize("use", ["reconstruct", "matmul", "apply", "relative_error", "check",
                                 "truncate"])
def test_malformed_factors_refused(f, use):
  x = jnp.ones((2, 20))
  calls = {
      "reconstruct": lambda g: sc.reconstruct(g),
      "matmul": lambda g: sc.matmul(x, g),
      "apply": lambda g: sc.apply_signed_cut(x, g),
      "relative_error": lambda g: sc.relative_error(A, g),
      "check": lambda g: g.check(),
      "truncate": lambda g: sc.truncate(g, 2),
  }
  for field, g in _bad_variants(f):
    with pytest.raises((TypeError, ValueError), match=field):
      calls[use](g)


def test_valid_factors_pass_check_under_jit(f):
  assert f.check() is f
  y = jax.jit(lambda g: sc.reconstruct(g))(f)
  np.testing.assert_allclose(np.asarray(y), np.asarray(sc.reconstruct(f)))


def test_relative_error_bad_a(f):
  with pytest.raises(ValueError, match="rectangular"):
    sc.relative_error([[1.0], [1.0, 2.0]], f)
  with pytest.raises(ValueError, match="shape"):
    sc.relative_error(A[:3], f)


@pytest.fixture(scope="module")
def q_and_lr():
  return sc.rtn(A, bits=4, group_size=8), sc.lplr(A, key=KEY, rank=3, bits=(8, 4))


def test_quantized_and_low_rank_check(q_and_lr):
  q, lr = q_and_lr
  assert q.check() is q and lr.check() is lr
  fu = sc.dsvd(A, rank=3, bits=(32, 32))    # float factors
  assert fu.check() is fu
  bad = [
      (dataclasses.replace(q, codes=q.codes[:, :1]), ValueError, r"f\.codes must have shape"),
      (dataclasses.replace(q, codes=q.codes.astype(jnp.int32)), TypeError, "f.codes must have"),
      (dataclasses.replace(q, scale=q.scale[:, :1]), ValueError, r"f\.scale must have shape"),
      (dataclasses.replace(q, bits=0), ValueError, "f: bits"),
      (dataclasses.replace(q, group_size=0), ValueError, "f.group_size"),
      (dataclasses.replace(q, shape=(20,)), ValueError, r"f\.shape must be \(r, c\)"),
      (dataclasses.replace(lr, v=dataclasses.replace(lr.v, shape=(3, 40))), ValueError,
       r"f\.v\.codes must have shape"),
      (dataclasses.replace(lr, shape=(20, 13)), ValueError, "f.v must have 13 columns"),
      (dataclasses.replace(fu, u=fu.u[:2]), ValueError, "one batch shape and rank"),
      (dataclasses.replace(fu, u=fu.u.astype(jnp.int32)), TypeError, "f.u must have a float"),
      (dataclasses.replace(fu, v="x"), TypeError, "f.v must be a float array"),
  ]
  for g, err, match in bad:
    with pytest.raises(err, match=match):
      g.check()
  with pytest.raises(ValueError, match=r"tree\.scale must have shape"):
    sc.reconstruct(bad[2][0])
