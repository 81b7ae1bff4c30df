"""A second call with the same shapes and configuration compiles nothing."""

from __future__ import annotations

import jax
import pytest
import jax.numpy as jnp

import jax_signedcut as jsc
from jax_signedcut._methods import attention as _attention
from jax_signedcut._methods import lp_lowrank as _lp_lowrank
from jax_signedcut._methods import lplr as _lplr
from jax_signedcut._methods import rtn as _quantize
from jax_signedcut._signedcut import tensor as _tensor


def _twice(jitted, call):
  call(0)
  before = jitted._cache_size()
  call(1)
  assert jitted._cache_size() == before


def test_second_call_does_not_recompile():
  a = jax.random.normal(jax.random.key(0), (2, 9, 7))
  _twice(_quantize._rtn, lambda i: jsc.rtn(a + i, bits=4, group_size=4))
  _twice(_lplr._lplr, lambda i: jsc.lplr(a + i, key=jax.random.key(i), rank=3, bits=(4, 4)))
  _twice(_lplr._dsvd, lambda i: jsc.dsvd(a + i, rank=3, bits=(4, 4)))
  _twice(_lp_lowrank._lp_lowrank, lambda i: jsc.lp_lowrank(a + i, rank=2, p=1.0, iters=2))
  t = jax.random.normal(jax.random.key(1), (3, 4, 5))
  _twice(_tensor._decompose_tensor,
         lambda i: jsc.decompose_tensor(t + i, key=jax.random.key(i), width=3))
  x = jnp.zeros((9, 9))
  _twice(_attention._fit, lambda i: jsc.fit_attention(a[0].T, a[1].T, a[1].T, a[0].T + i, x0=x,
                                                      y0=x, iters=1))


def test_bucketed_decompose_is_decompose_and_shares_compilations():
  """``decompose_bucketed``: the factors of ``decompose`` bit for bit, one compile per bucket."""
  from jax_signedcut._signedcut import decompose as _decompose  # noqa: PLC0415

  assert [_decompose.width_bucket(w) for w in (1, 16, 17, 45, 64, 65, 721, 1163)] == \
      [1, 16, 18, 48, 64, 72, 768, 1280]
  # Entries far out of the bulk, so that "auto" takes outliers and the budget limits the cuts.
  a = jax.random.normal(jax.random.key(0), (40, 36))
  a = jnp.where(jax.random.uniform(jax.random.key(1), a.shape) > 0.99, 10 * a, a)
  key = jax.random.key(2)
  for kw in (dict(width=45, outliers=0), dict(width=45), dict(bits_per_weight=3.0),
             dict(bits_per_weight=2.4, outliers=0)):
    f = jsc.decompose(a, key=key, **kw)
    g = _decompose.decompose_bucketed(a, key=key, **kw)
    assert jax.tree.structure(f) == jax.tree.structure(g), kw
    for x, y in zip(jax.tree.leaves(f), jax.tree.leaves(g)):
      assert x.shape == y.shape and x.dtype == y.dtype and bool(jnp.all(x == y)), kw
  # Budgets of one bucket (widths 21 and 22 of 22) compile once: the budget is traced.
  _decompose.decompose_bucketed(a, key=key, bits_per_weight=2.4)
  before = _decompose._decompose._cache_size()
  g = _decompose.decompose_bucketed(a, key=key, bits_per_weight=2.45)
  assert _decompose._decompose._cache_size() == before
  assert g.parts[0].c.shape == (jsc.decompose(a, key=key, bits_per_weight=2.45).parts[0].width,)
  with pytest.raises(ValueError, match="eagerly"):
    jax.jit(lambda x: _decompose.decompose_bucketed(x, key=key, width=4))(a)
